"""Monte Carlo of the thought-advantage variance, through the trainer's own `grpo_ma.ma_advantages`.

One simulation = one prompt: thought values mu (fixed for the setting), M Bernoulli(mu_k) answers per thought,
a rewards tensor (n_sims, K, M), and `grpo_ma.ma_advantages` on it (the simulations are the batch dimension),
so the code that trains is the code measured. The estimate is Var[A_k | mu] over the answer noise.

Confidence intervals. A_k is not normal (at small M it takes few values), so the chi-square interval for a
variance, which assumes normal data, has the wrong width by the kurtosis factor. We use the distribution-free
large-sample interval instead: the sample variance is the mean of q_i = (A_ik - mean_k)^2 * n/(n-1), so by the
central limit theorem it is normal with standard error std(q)/sqrt(n) (the delta-method interval built on the
sample fourth moment, which is what a bootstrap of the variance converges to). The same holds for the mean
over thoughts of the per-thought variances, with q_i averaged over k.

Mirror pooling. When thought K-1-k is the mirror image of thought k (mu_{K-1-k} = 1 - mu_k, as for the
symmetric Beta quantiles of `theory.checks`), 1 - R is again Bernoulli and A_{K-1-k} has the distribution of
-A_k, so the two variances are equal. `pool_mirror=True` estimates each per-thought variance from
(q_ik + q_i,K-1-k)/2, which uses both thoughts' samples; its interval is built the same way, so the
correlation between the two thoughts of one simulation is accounted for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats

import grpo_ma


def bernoulli_rewards(mu: np.ndarray, answers: int, sims: int, rng: np.random.Generator) -> torch.Tensor:
    """R[n, k, m] ~ Bernoulli(mu_k), independent: (K,) -> (sims, K, M) float64 tensor of 0/1."""
    uniform = rng.random((sims, len(mu), answers), dtype=np.float32)
    return torch.from_numpy(uniform < mu.astype(np.float32)[None, :, None]).to(torch.float64)


def simulate_thought_advantages(
    mu: np.ndarray,
    answers: int,
    sims: int,
    *,
    seed: int = 0,
    ddof: int = 1,
    eps: float = 1e-4,
    chunk_elements: int = 2**18,
) -> np.ndarray:
    """Thought advantages of `sims` simulated prompts: (K,) -> (sims, K).

    Rewards are drawn and fed to `grpo_ma.ma_advantages` in chunks of about `chunk_elements` rewards: the
    whole tensor would not fit in cache (or memory), and small chunks are an order of magnitude faster."""
    rng = np.random.default_rng(seed)
    per_chunk = max(1, chunk_elements // (len(mu) * answers))
    out = []
    for start in range(0, sims, per_chunk):
        rewards = bernoulli_rewards(mu, answers, min(per_chunk, sims - start), rng)
        thought_adv, _ = grpo_ma.ma_advantages(rewards, ddof=ddof, eps=eps)
        out.append(thought_adv.numpy())
    return np.concatenate(out)


@dataclass
class VarianceEstimate:
    """Var[A_k] estimated from n simulations, with a `level` confidence interval (half widths)."""

    per_thought: np.ndarray  # (K,)
    per_thought_half_width: np.ndarray  # (K,)
    mean: float  # mean over thoughts of Var[A_k]
    mean_half_width: float
    sims: int
    level: float

    def interval(self) -> tuple[float, float]:
        return self.mean - self.mean_half_width, self.mean + self.mean_half_width


def estimate_variance(
    advantages: np.ndarray, level: float = 0.99, *, pool_mirror: bool = False
) -> VarianceEstimate:
    """Per-thought and thought-averaged variance of advantages (n, K), with CLT intervals (module docstring):

        Var_k = mean_i q_ik,  q_ik = (A_ik - Abar_k)^2 n/(n-1),
        half width = z_{(1+level)/2} std_i(q_ik)/sqrt(n).

    pool_mirror: estimate Var_k from (q_ik + q_i,K-1-k)/2 (thought K-1-k mirrors thought k; see the module
    docstring)."""
    sims = advantages.shape[0]
    squared = (advantages - advantages.mean(0)) ** 2 * sims / (sims - 1)
    z = stats.norm.ppf(0.5 + level / 2)
    per_prompt = squared.mean(1)  # thought-averaged, one value per simulated prompt
    per_thought = (squared + squared[:, ::-1]) / 2 if pool_mirror else squared
    return VarianceEstimate(
        per_thought=per_thought.mean(0),
        per_thought_half_width=z * per_thought.std(0, ddof=1) / np.sqrt(sims),
        mean=float(per_prompt.mean()),
        mean_half_width=float(z * per_prompt.std(ddof=1) / np.sqrt(sims)),
        sims=sims,
        level=level,
    )


def monte_carlo_variance(
    mu: np.ndarray,
    answers: int,
    sims: int,
    *,
    seed: int = 0,
    ddof: int = 1,
    eps: float = 1e-4,
    level: float = 0.99,
    pool_mirror: bool = False,
) -> VarianceEstimate:
    """`simulate_thought_advantages` then `estimate_variance`."""
    advantages = simulate_thought_advantages(mu, answers, sims, seed=seed, ddof=ddof, eps=eps)
    return estimate_variance(advantages, level, pool_mirror=pool_mirror)
