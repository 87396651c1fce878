"""Budget allocation: which tree T{K}A{M} minimises the thought-advantage variance for a token budget?

Cost of one prompt's rollouts: K thoughts of L_t tokens and K*M answers of L_a tokens,

    cost(K, M) = K L_t + K M L_a          (T4A4: 4 L_t + 16 L_a;  T16A1: 16 (L_t + L_a))

Objective: the thought-averaged Var[A_k] from `closed_form.finite_m_variance` (Pade-resummed second-order
delta method), with thought values at the Beta quantiles whose within/between variance ratio is `ratio`
(`closed_form.beta_thought_values`). K = 2 is left out by default: there A_k = +-1/sqrt(2) is a sign, its
variance is a tie/flip probability that the delta method sets to 0 at every order, and a low variance of a
sign says nothing about how well it ranks the thoughts (with min_thoughts=2 it is scored by exact
enumeration).

The objective is per-thought noise, which rises with K towards its floor (claim 4 in theory/README.md): at a
fixed budget it always prefers the fewest thoughts and the most answers. It does not count the gain of
training on more thoughts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from theory import closed_form as cf


def config_name(thoughts: int, answers: int) -> str:
    """T{K}A{M}, the paper's name for K thoughts x M answers."""
    return f"T{thoughts}A{answers}"


def token_cost(thoughts: int, answers: int, thought_len: float, answer_len: float) -> float:
    """K L_t + K M L_a: tokens generated for one prompt (each thought once, every answer)."""
    return thoughts * thought_len + thoughts * answers * answer_len


@functools.lru_cache(maxsize=4096)
def _coefficients(
    thoughts: int, ratio: float, mean: float, ddof: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mu, C1, C2) of the quantile setting; Var[A_k] = Pade(C1/M, C2/M^2) for every M, so one pass per K."""
    mu = cf.beta_thought_values(thoughts, ratio, mean)
    c1, c2 = cf.variance_coefficients(mu, cf.bernoulli_variance(mu), ddof=ddof)
    return mu, c1, c2


def mean_thought_variance(
    thoughts: int, answers, ratio: float, *, mean: float = 0.5, ddof: int = 1, eps: float = 1e-4
):
    """mean_k Var[A_k] for T{K}A{M} (finite-M formula, Beta-quantile thought values, Bernoulli answers); K = 2
    by exact enumeration (`closed_form.two_thought_exact_variance`), where the delta method gives 0.
    answers: an int, or an array of M values (one variance per M)."""
    mu, c1, c2 = _coefficients(thoughts, float(ratio), float(mean), ddof)
    sigma2 = cf.bernoulli_variance(mu)
    answers_arr = np.atleast_1d(np.asarray(answers))
    if thoughts == 2:
        out = np.array(
            [cf.two_thought_exact_variance(mu, int(m), ddof=ddof, eps=eps)[0] for m in answers_arr]
        )
    else:
        m = answers_arr[:, None].astype(float)  # (n_M, 1) against (K,) coefficients
        out = cf.finite_m_from_coefficients(mu, sigma2, c1, c2, m, ddof=ddof, eps=eps).mean(-1)
    return float(out[0]) if np.ndim(answers) == 0 else out


@dataclass
class Allocation:
    thoughts: int
    answers: int
    tokens: float
    variance: float

    @property
    def name(self) -> str:
        return config_name(self.thoughts, self.answers)


def allocations(
    budget: float,
    thought_len: float,
    answer_len: float,
    ratio: float,
    *,
    mean: float = 0.5,
    ddof: int = 1,
    min_thoughts: int = 3,
    max_thoughts: int = 1024,
) -> list[Allocation]:
    """Every (K, M) with K L_t + K M L_a <= budget, min_thoughts <= K <= max_thoughts, M >= 1, sorted by the
    thought-averaged variance (best first)."""
    rows = []
    for thoughts in range(max(min_thoughts, 2), max_thoughts + 1):
        max_answers = int((budget / thoughts - thought_len) // answer_len)
        if max_answers < 1:
            continue
        # K = 2 is enumerated exactly, O(M^2) per M: only its largest M (the variance falls with M)
        answers = np.arange(1, max_answers + 1) if thoughts > 2 else np.array([max_answers])
        variances = mean_thought_variance(thoughts, answers, ratio, mean=mean, ddof=ddof)
        rows += [
            Allocation(thoughts, int(m), token_cost(thoughts, int(m), thought_len, answer_len), float(v))
            for m, v in zip(answers, variances)
        ]
    return sorted(rows, key=lambda row: row.variance)


def best_allocation(
    budget: float, thought_len: float, answer_len: float, ratio: float, **kwargs
) -> Allocation:
    """The (K, M) of least thought-advantage variance within the budget; raises if nothing fits."""
    rows = allocations(budget, thought_len, answer_len, ratio, **kwargs)
    if not rows:
        raise ValueError(
            f"no T{{K}}A{{M}} with K >= {kwargs.get('min_thoughts', 3)} fits in {budget} tokens "
            f"(L_t={thought_len}, L_a={answer_len})"
        )
    return rows[0]


def budget_report(
    budget: float,
    thought_len: float,
    answer_len: float,
    ratio: float,
    *,
    mean: float = 0.5,
    ddof: int = 1,
    min_thoughts: int = 3,
    max_thoughts: int = 1024,
    rows_shown: int = 8,
) -> str:
    """The answer to the budget question as text: for each K the largest M that fits (variance falls with M),
    the best of them, plain GRPO (the largest T{K}A1 that fits), and the paper's T4A4 / T16A1 for
    reference."""
    rows = allocations(
        budget,
        thought_len,
        answer_len,
        ratio,
        mean=mean,
        ddof=ddof,
        min_thoughts=min_thoughts,
        max_thoughts=max_thoughts,
    )
    if not rows:
        return (
            f"nothing fits: even {config_name(min_thoughts, 1)} costs "
            f"{token_cost(min_thoughts, 1, thought_len, answer_len):g} tokens > budget {budget:g}"
        )
    best_per_k = {}
    for row in rows:  # rows are sorted best first: keep the first row of each K
        best_per_k.setdefault(row.thoughts, row)
    best = rows[0]
    lines = [
        f"budget {budget:g} tokens per prompt, L_t = {thought_len:g}, L_a = {answer_len:g}, "
        f"E[sigma^2]/sigma_theta^2 = {ratio:g} "
        f"(thought values at Beta({mean * ratio:g}, {(1 - mean) * ratio:g}) quantiles, Bernoulli answers), "
        f"ddof = {ddof}",
        "objective: mean_k Var[A_k] of the thought advantage (finite-M formula); tokens = K*L_t + K*M*L_a",
        f"{'K':>5}  {'best tree':>10}  {'tokens':>8}  {'mean_k Var[A_k]':>15}  {'x best':>7}",
    ]
    shown = sorted(best_per_k.values(), key=lambda row: row.thoughts)
    if len(shown) > rows_shown:  # the smallest K, then a geometric spread of the rest
        keep = np.unique(np.geomspace(1, len(shown), rows_shown).astype(int) - 1)
        shown = [shown[i] for i in keep]
    for row in shown:
        lines.append(
            f"{row.thoughts:>5}  {row.name:>10}  {row.tokens:>8g}  {row.variance:>15.4g}  "
            f"{row.variance / best.variance:>7.3g}"
        )
    for thoughts, answers, label in (
        (max((r.thoughts for r in rows if r.answers == 1), default=0), 1, "plain GRPO within budget"),
        (4, 4, "paper's T4A4"),
        (16, 1, "paper's T16A1"),
    ):
        if thoughts < 2:
            continue
        tokens = token_cost(thoughts, answers, thought_len, answer_len)
        variance = mean_thought_variance(thoughts, answers, ratio, mean=mean, ddof=ddof)
        fits = "fits" if tokens <= budget else "over budget"
        lines.append(
            f"{label}: {config_name(thoughts, answers)}, {tokens:g} tokens ({fits}), variance "
            f"{variance:.4g} = {variance / best.variance:.3g} x the best"
        )
    lines.append(
        "note: Var[A_k] rises with K towards its floor (claim 4 in theory/README.md), so this objective "
        "always prefers the fewest thoughts and spends the rest on answers; it measures the noise in each "
        "thought's advantage, not how many thoughts are trained on."
    )
    lines.append(f"best: {best.name} ({best.tokens:g} tokens, mean_k Var[A_k] = {best.variance:.4g})")
    return "\n".join(lines)
