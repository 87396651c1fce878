"""The signal-to-noise ratio of one prompt's policy gradient, as a function of the tree T{K}A{M} (claim 7 in
theory/README.md). This is what the budget planner ranks trees by (`theory.budget`).

The model. Thought values mu_k ~ Beta(a, b) independently (a = mean*ratio, b = (1-mean)*ratio, so
E[sigma^2]/sigma_theta^2 = ratio, as in `closed_form.beta_thought_values`), answers R_km ~ Bernoulli(mu_k).
The trainer's advantages (`grpo_ma.ma_advantages`, ddof = 1): A_k over the K thought values, B_km over all
K*M answers. Each sampled sequence y has a score s(y) = grad log pi(y) in R^D, modelled as

    thought k:  s_k  = (mu_k - mu_pop) h_T + sqrt(L_t) xi_k        (L_t tokens)
    answer km:  u_km = (R_km - mu_k)   h_A + sqrt(L_a) eta_km      (L_a tokens)

with xi, eta independent, mean 0, covariance I_D (every token adds unit noise) and a signal along h_T, h_A
proportional to the sequence's TRUE advantage: its thought's value for a thought, its reward minus its
thought's value for an answer (the policy gradient theorem then gives the true gradient
sigma_theta^2 h_T + E[sigma^2] h_A). The token-mean loss weighs every token alike, so up to one normaliser
the step's gradient for the prompt is

    g = sum_k A_k s_k + sum_km B_km u_km.

With h_T orthogonal to h_A and |h_T| = |h_A| = h (one unit of true advantage moves a score as much at
either level), and D much larger than the signal terms,

    SNR = |E g|^2 / E|g - E g|^2 = (h^2/D) (S_T^2 + S_A^2) / (L_t N_T + L_a N_A)

    S_T = E sum_k A_k (mu_k - mu_pop)       thought signal: how well the advantages rank the thoughts
    S_A = E sum_km B_km (R_km - mu_k)       answer signal
    N_T = E sum_k A_k^2 = (K - 1)(1 - P_T)  P_T: all K thought values equal (no thought signal)
    N_A = E sum_km B_km^2 = (KM - 1)(1 - P_A)   P_A: all K*M rewards equal

Averaging n prompts multiplies the SNR by n, and a token budget B buys B / (K L_t + K M L_a) prompts, so the
objective is the SNR per generated token, SNR / (K L_t + K M L_a) (`gradient_snr`).

What the objective counts that the variance of `closed_form` does not: more thoughts are more thought
samples (S_T grows like K - 1) and fewer all-equal groups (P_T falls); more answers make each thought's
advantage more reliable (S_T grows with the reliability sigma_theta^2/(sigma_theta^2 + E[sigma^2]/M)) and add
answer samples (S_A grows like K M - 1).

Repeated texts (`Repeats`). A peaked policy samples the same text again, and the same text has the same
score: copies add their weights before squaring, so N_T and N_A grow, and more answers per thought stop
adding samples once the right answer is always the same string. The noise sums then run over pairs of
identical sequences (`thought_noise`, `answer_noise`); repeated thoughts also share their value.

It does not model: how much either level's gradient is worth to held-out accuracy (h_T vs h_A are taken
equal); identical answers under identical thoughts; optimisation (clipping, KL, Adam).
`monte_carlo_terms` estimates S_T, S_A, N_T, N_A through the trainer's code, and `vector_monte_carlo_snr`
simulates g itself in R^D.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sympy as sp
import torch
from scipy import special, stats

import grpo_ma
from theory import closed_form as cf


# ------------------------------------------------------------------------------------------------
# Repeated sequences: identical text, identical score
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Repeats:
    """How often two sampled sequences are the same text, so their scores are one vector, not two
    independent ones (a peaked policy writes the right answer to a thought the same way every time).

    thought:      P(two thoughts of one prompt are identical)
    right_answer: P(two right answers of one thought are identical)
    wrong_answer: P(two wrong answers of one thought are identical)
    All 0: every sequence is distinct (the model of the module docstring). Measured from rollouts by
    `paper_figures.planner`."""

    thought: float = 0.0
    right_answer: float = 0.0
    wrong_answer: float = 0.0


NO_REPEATS = Repeats()


# ------------------------------------------------------------------------------------------------
# Exact for Beta thought values and Bernoulli answers: the zero-signal shares and the answer noise
# ------------------------------------------------------------------------------------------------
def right_count_pmf(answers: int, ratio: float, mean: float) -> np.ndarray:
    """P(a thought has c right answers of M), c = 0..M: Beta-binomial(M, a, b). (M+1,)."""
    a, b = cf.beta_parameters(ratio, mean)
    return stats.betabinom.pmf(np.arange(answers + 1), answers, a, b)


def zero_signal_thought_share(thoughts: int, answers: int, ratio: float, mean: float) -> float:
    """P_T = P(V_1 = ... = V_K): every thought has the same number c of right answers. A thought's count is
    Beta-binomial(M, a, b) and the thoughts are independent, so

        P_T = sum_{c=0..M} BetaBinomial(c; M, a, b)^K.

    Such a group has A_k = 0 for every thought: no thought-level gradient. (Independent thoughts: with
    repeated thoughts it is larger.)"""
    return float((right_count_pmf(answers, ratio, mean) ** thoughts).sum())


def zero_signal_answer_share(thoughts: int, answers: int, ratio: float, mean: float) -> float:
    """P_A = P(all K M rewards equal) = (E[mu^M])^K + (E[(1-mu)^M])^K, with the Beta moment
    E[mu^M] = prod_{i<M} (a + i)/(a + b + i). Such a group has B_km = 0: no answer-level gradient."""
    a, b = cf.beta_parameters(ratio, mean)
    steps = np.arange(answers)
    all_right = np.exp(np.log((a + steps) / (a + b + steps)).sum())
    all_wrong = np.exp(np.log((b + steps) / (a + b + steps)).sum())
    return float(all_right**thoughts + all_wrong**thoughts)


def copy_counts(thoughts: int, thought_repeat: float) -> tuple[np.ndarray, np.ndarray]:
    """J, the thoughts that are copies of the prompt's one repeated thought, and P(J): Binomial(K, q) with
    q = sqrt(c_T), so that two thoughts are the same text with probability c_T (`simulate_prompts`)."""
    copies = np.arange(thoughts + 1)
    return copies, stats.binom.pmf(copies, thoughts, np.sqrt(thought_repeat))


def thought_sums_of_squares(thoughts: int, copies, between_var: float, noise_var: float):
    """E[sum_k (V_k - Vbar)^2] and E[sum_k (mu_k - mubar)^2] when J = `copies` thoughts share one value and
    the other K - J have their own (Var mu = sigma_theta^2 = between_var, Var(V | mu) = E[sigma^2]/M =
    noise_var), and D = E[(Vbar_copies - Vbar_others)^2]:

        E SS_V  = (J - 1) v + (K - J - 1)(sigma_theta^2 + v) + J (K - J)/K D
        E SS_mu = (K - J - 1) sigma_theta^2 + J (K - J)/K sigma_theta^2 (1 + 1/(K - J))
        D       = sigma_theta^2 (1 + 1/(K - J)) + v (1/J + 1/(K - J))

    J = 0 or 1 is K distinct thoughts; J = K: one value, E SS_V = (K - 1) v, E SS_mu = 0. copies: (n,)
    array. Returns (SS_V, SS_mu, D), each (n,)."""
    copies = np.asarray(copies, dtype=float)
    alone = np.maximum(thoughts - copies, 1)  # K - J; D and the J(K-J) terms vanish at J = K anyway
    shared = np.maximum(copies, 1)
    gap = between_var * (1 + 1 / alone) + noise_var * (1 / shared + 1 / alone)
    mixed = copies * (thoughts - copies) / thoughts
    some = copies >= 2  # J = 1: one copy is a thought like the others
    ss_value = np.where(
        some,
        (copies - 1) * noise_var + (thoughts - copies - 1) * (between_var + noise_var) + mixed * gap,
        (thoughts - 1) * (between_var + noise_var),
    )
    ss_mu = np.where(
        some,
        (thoughts - copies - 1) * between_var + mixed * between_var * (1 + 1 / alone),
        (thoughts - 1) * between_var,
    )
    everything = copies == thoughts
    ss_value = np.where(everything, (thoughts - 1) * noise_var, ss_value)
    ss_mu = np.where(everything, 0.0, ss_mu)
    return ss_value, ss_mu, gap


def thought_noise(
    thoughts: int,
    answers: int,
    ratio: float,
    mean: float,
    repeats: Repeats = NO_REPEATS,
) -> float:
    """N_T = E sum over pairs of thoughts with the same text of A_k A_j (a thought with itself included).

    Distinct thoughts (c_T = 0): exactly (K - 1)(1 - P_T), since a standardized group (ddof 1) has
    sum_k A_k^2 = K - 1 (eps = 0) and an all-equal group 0. With J copies of one thought (probability
    from `copy_counts`) their advantages add before squaring, which adds
    (sum_copies A_k)^2 - sum_copies A_k^2 = (K - 1) (J^2 - J)((K-J)/K)^2 D - (J - 1) v) / SS_V
    (ratio of expectations, `thought_sums_of_squares`; J = K adds -(K - 1): one text whose advantages sum
    to 0)."""
    between_var, within_var = cf.beta_moments(ratio, mean)
    share = 1 - zero_signal_thought_share(thoughts, answers, ratio, mean)
    if repeats.thought == 0:
        return (thoughts - 1) * share
    copies, probability = copy_counts(thoughts, repeats.thought)
    noise_var = within_var / answers
    ss_value, _, gap = thought_sums_of_squares(thoughts, copies, between_var, noise_var)
    spread = ((thoughts - copies) / thoughts) ** 2
    added = (copies**2 - copies) * spread * gap - (copies - 1) * noise_var
    added = np.where(copies >= 2, (thoughts - 1) * added / ss_value, 0.0)
    added = np.where(copies == thoughts, -(thoughts - 1), added)
    return float((thoughts - 1 + probability @ added) * share)


def answer_noise(
    thoughts: int,
    answers: int,
    ratio: float,
    mean: float,
    repeats: Repeats = NO_REPEATS,
) -> float:
    """N_A = E sum over pairs of answers with the same text of B_km B_km' (an answer with itself included);
    exact for Beta thought values and Bernoulli answers when repeats only join answers of one thought:

        N_A = (KM - 1)(1 - P_A) + K E[ n (n - 1) c_1 B_1^2 + (M - n)(M - n - 1) c_0 B_0^2 ]

    n: the right answers of one thought; C = n + (right answers of the other K - 1 thoughts);
    B_1^2 = (KM - 1)(KM - C)/(KM C), B_0^2 = (KM - 1) C/(KM (KM - C)) are the squared pooled advantages of
    a right and a wrong answer (0 when C = 0 or KM); c_1, c_0 = repeats.right_answer, wrong_answer. The
    expectation sums over n (Beta-binomial) and the others' count (its (K-1)-fold convolution)."""
    pool = thoughts * answers
    distinct = (pool - 1) * (1 - zero_signal_answer_share(thoughts, answers, ratio, mean))
    if repeats.right_answer == 0 and repeats.wrong_answer == 0:
        return distinct
    own = right_count_pmf(answers, ratio, mean)  # (M+1,)
    others = np.ones(1)
    for _ in range(thoughts - 1):
        others = np.convolve(others, own)  # ((K-1)M+1,): the other thoughts' right answers
    n = np.arange(answers + 1)[:, None]
    total = n + np.arange(len(others))[None, :]  # C
    inside = (total > 0) & (total < pool)
    safe_total = np.where(inside, total, 1)
    right_sq = np.where(inside, (pool - 1) * (pool - total) / (pool * safe_total), 0.0)
    wrong_sq = np.where(inside, (pool - 1) * total / (pool * np.where(inside, pool - total, 1)), 0.0)
    pairs = repeats.right_answer * n * (n - 1) * right_sq
    pairs = pairs + repeats.wrong_answer * (answers - n) * (answers - n - 1) * wrong_sq
    return distinct + thoughts * float(own @ pairs @ others)


# ------------------------------------------------------------------------------------------------
# Exact for Gaussian thought values and Gaussian answer noise: the signal terms
# ------------------------------------------------------------------------------------------------
def c4(size) -> np.ndarray:
    """E[s]/sigma for the sample std (ddof 1) of `size` normal values:
    c4(n) = sqrt(2/(n-1)) Gamma(n/2) / Gamma((n-1)/2); real n allowed (c4(2) = 0.798, c4(16) = 0.983)."""
    size = np.asarray(size, dtype=float)
    return np.sqrt(2 / (size - 1)) * np.exp(special.gammaln(size / 2) - special.gammaln((size - 1) / 2))


def thought_signal(thoughts: int, answers, between_var: float, within_var: float):
    """S_T = E sum_k A_k (mu_k - mu_pop) ~= (K - 1) c4(K) s_w^2 / sqrt(s_w^2 + E[sigma^2]/M),
    with s_w^2 = `between_var` the spread of the thought values within a prompt.

    Derivation (exact when mu_k and the answer noise of V_k are normal and independent): sum_k A_k = 0, so
    sum_k A_k mu_k = sum_k (V_k - Vbar) mu_k / s_V. Regress mu on V: mu_k - mean = beta (V_k - mean) + r_k
    with
    beta = s_w^2 / (s_w^2 + E[sigma^2]/M) (the reliability of a thought value) and r independent of V, so
    E[sum A mu | V] = beta sum (V - Vbar)^2 / s_V = beta (K - 1) s_V, and
    E[s_V] = c4(K) sqrt(s_w^2 + E[sigma^2]/M). answers may be an array."""
    answers = np.asarray(answers, dtype=float)
    value_var = between_var + within_var / answers
    return (thoughts - 1) * c4(thoughts) * between_var / np.sqrt(value_var)


def thought_signal_with_repeats(thoughts: int, answers: int, between_var: float, within_var: float, repeat):
    """S_T when each thought is a copy of the prompt's one repeated thought with probability sqrt(c_T):
    the expectation over J (`copy_counts`) of c4(K - J + 1) E SS_mu / sqrt(E SS_V / (K - 1)) (the
    distinct-thought formula of `thought_signal` with the sums of squares of `thought_sums_of_squares`; the
    Jensen factor counts the distinct values). between_var: sigma_theta^2 of the Beta (not the within-prompt
    spread)."""
    if repeat == 0:
        return thought_signal(thoughts, answers, between_var, within_var)
    copies, probability = copy_counts(thoughts, repeat)
    ss_value, ss_mu, _ = thought_sums_of_squares(thoughts, copies, between_var, within_var / answers)
    distinct = np.where(copies >= 2, thoughts - copies + 1, thoughts)
    with np.errstate(invalid="ignore", divide="ignore"):
        value = np.where(
            distinct >= 2, c4(np.maximum(distinct, 2)) * ss_mu / np.sqrt(ss_value / (thoughts - 1)), 0.0
        )
    return float(probability @ value)


def answer_signal(thoughts: int, answers, between_var: float, within_var: float):
    """S_A = E sum_km B_km (R_km - mu_k) ~= (KM - 1) c E[sigma^2] / sqrt(E[s_R^2]).

    Normal model: R_km = mu_k + e_km. Given the rewards, E[e_km - ebar_k] = R_km - V_k and
    E[ebar_k - mean | V] = gamma (V_k - Vbar), gamma = (E[sigma^2]/M) / (s_w^2 + E[sigma^2]/M), so
    sum B e has mean (SS_within + gamma SS_between)/s_R, whose expectation is (KM - 1) E[sigma^2] / s_R on
    average. E[s_R^2] = (M (K-1) s_w^2 + (KM - 1) E[sigma^2]) / (KM - 1), and the Jensen factor
    c = c4(nu + 1) of a chi-square with Satterthwaite's nu degrees of freedom for
    SS_R = E[sigma^2] chi2_{K(M-1)} + (M s_w^2 + E[sigma^2]) chi2_{K-1} (c = c4(K) at M = 1, which
    is then exact). s_w^2 = `between_var`."""
    answers = np.asarray(answers, dtype=float)
    pool = thoughts * answers
    within_scale = within_var
    between_scale = answers * between_var + within_var
    within_df = thoughts * (answers - 1)
    between_df = thoughts - 1
    expected_ss = within_scale * within_df + between_scale * between_df
    dof = expected_ss**2 / (within_scale**2 * within_df + between_scale**2 * between_df)
    expected_var = expected_ss / (pool - 1)
    return (pool - 1) * c4(dof + 1) * within_var / np.sqrt(expected_var)


@dataclass
class GradientSNR:
    """The gradient objective of one tree, with the terms that explain it (units: h^2/D)."""

    thoughts: int
    answers: int
    snr: float  # (S_T^2 + S_A^2) / (L_t N_T + L_a N_A)
    per_token: float  # snr / tokens: the planner's objective
    tokens: float  # K L_t + K M L_a
    thought_signal: float  # S_T
    answer_signal: float  # S_A
    thought_noise: float  # N_T
    answer_noise: float  # N_A
    zero_signal_thought: float  # P_T
    zero_signal_answer: float  # P_A

    @property
    def thought_share(self) -> float:
        """The thought level's share of the signal, S_T^2 / (S_T^2 + S_A^2)."""
        return self.thought_signal**2 / (self.thought_signal**2 + self.answer_signal**2)


def snr_from_terms(thought_signal, answer_signal, thought_noise, answer_noise, thought_len, answer_len):
    """SNR = (S_T^2 + S_A^2) / (L_t N_T + L_a N_A), in units of h^2/D; 0 where no group carries signal."""
    noise = thought_len * thought_noise + answer_len * answer_noise
    return (thought_signal**2 + answer_signal**2) / noise if noise > 0 else 0.0


def gradient_snr(
    thoughts: int,
    answers: int,
    thought_len: float,
    answer_len: float,
    ratio: float,
    mean: float = 0.5,
    repeats: Repeats = NO_REPEATS,
) -> GradientSNR:
    """The objective of the planner: the gradient's SNR per generated token for T{K}A{M}, from the closed
    forms above (Beta(mean*ratio, (1-mean)*ratio) thought values, Bernoulli answers, `repeats`)."""
    between_var, within_var = cf.beta_moments(ratio, mean)
    spread = (1 - repeats.thought) * between_var  # repeated thoughts share their value
    terms = {
        "thought_signal": thought_signal_with_repeats(
            thoughts, answers, between_var, within_var, repeats.thought
        ),
        "answer_signal": float(answer_signal(thoughts, answers, spread, within_var)),
        "thought_noise": thought_noise(thoughts, answers, ratio, mean, repeats),
        "answer_noise": answer_noise(thoughts, answers, ratio, mean, repeats),
    }
    snr = snr_from_terms(*terms.values(), thought_len, answer_len)
    tokens = thoughts * thought_len + thoughts * answers * answer_len
    return GradientSNR(
        thoughts,
        answers,
        snr,
        snr / tokens,
        tokens,
        **terms,
        zero_signal_thought=zero_signal_thought_share(thoughts, answers, ratio, mean),
        zero_signal_answer=zero_signal_answer_share(thoughts, answers, ratio, mean),
    )


# ------------------------------------------------------------------------------------------------
# sympy: the best M for the thought term, and the large-K limit
# ------------------------------------------------------------------------------------------------
def best_answers_for_thought_term() -> tuple[sp.Expr, sp.Expr]:
    """At large K the thought term per token is prop. to beta(M) / (L_t + M L_a), beta = M / (M + ratio) the
    reliability of a thought value. sympy sets its M-derivative to 0: (the positive root, the expression).
    The root is sqrt(ratio L_t / L_a), Cochran's optimal second-stage sample of two-stage sampling."""
    m, ratio, thought_len, answer_len = sp.symbols("M ratio L_t L_a", positive=True)
    per_token = (m / (m + ratio)) / (thought_len + m * answer_len)
    roots = [r for r in sp.solve(sp.diff(per_token, m), m) if r.is_positive is not False]
    return sp.simplify(roots[0]), per_token


def thought_term_large_k_limit() -> sp.Expr:
    """lim_{K->oo} of the thought term per token, S_T^2 / (L_t N_T) / (K L_t + K M L_a), with P_T -> 0 and
    c4(K) -> 1: sigma_theta^2 beta(M) / (L_t (L_t + M L_a)). A positive constant, so the thought term keeps
    rising with K towards it, where the per-thought variance of `closed_form` rises towards its floor."""
    k, m, between, within, thought_len, answer_len = sp.symbols("K M s2 E L_t L_a", positive=True)
    signal = (k - 1) * between / sp.sqrt(between + within / m)
    per_token = signal**2 / (thought_len * (k - 1)) / (k * thought_len + k * m * answer_len)
    return sp.simplify(sp.limit(per_token, k, sp.oo))


# ------------------------------------------------------------------------------------------------
# Monte Carlo of the same model through the trainer's ma_advantages
# ------------------------------------------------------------------------------------------------
@dataclass
class TermEstimate:
    """Monte Carlo means of the four terms, each with its `level` CLT half width."""

    values: dict[str, float]
    half_widths: dict[str, float]
    sims: int


def simulate_prompts(
    thoughts: int,
    answers: int,
    ratio: float,
    mean: float,
    sims: int,
    rng: np.random.Generator,
    repeats: Repeats = NO_REPEATS,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sims prompts of the two-level model, with repeated sequences drawn as copies of one text:

    each thought is, with probability sqrt(c_T), a copy of the prompt's one repeated thought (sharing its
    value), else a thought of its own; each right (wrong) answer is, with probability sqrt(c_1)
    (sqrt(c_0)), the thought's one repeated right (wrong) answer, else an answer of its own. So two
    thoughts (two right answers, two wrong answers of one thought) are the same text with probability c.
    Returns mu (sims, K), rewards R (sims, K, M) ~ Bernoulli(mu_k), thought_copy (sims, K) and
    answer_copy (sims, K, M) booleans."""
    a, b = cf.beta_parameters(ratio, mean)
    thought_copy = rng.random((sims, thoughts)) < np.sqrt(repeats.thought)
    own_value = rng.beta(a, b, size=(sims, thoughts))
    shared_value = rng.beta(a, b, size=(sims, 1))
    mu = np.where(thought_copy, shared_value, own_value)
    rewards = (rng.random((sims, thoughts, answers)) < mu[..., None]).astype(np.float64)
    join = np.where(rewards == 1, np.sqrt(repeats.right_answer), np.sqrt(repeats.wrong_answer))
    answer_copy = rng.random((sims, thoughts, answers)) < join
    return mu, rewards, thought_copy, answer_copy


def repeated_sum_of_squares(weights: np.ndarray, copy: np.ndarray, groups: np.ndarray | None = None):
    """sum over distinct texts of (sum of the weights of the sequences with that text)^2: each sequence not
    a copy stands alone; the copies of one group (its `groups` label; default one group) add up first.
    weights, copy: (sims, n) -> (sims,)."""
    alone = (np.where(copy, 0.0, weights) ** 2).sum(-1)
    if groups is None:
        return alone + np.where(copy, weights, 0.0).sum(-1) ** 2
    copied = 0.0
    for label in np.unique(groups):
        members = copy & (groups == label)
        copied = copied + np.where(members, weights, 0.0).sum(-1) ** 2
    return alone + copied


def per_prompt_terms(
    mu: np.ndarray,
    rewards: np.ndarray,
    mean: float,
    thought_copy: np.ndarray | None = None,
    answer_copy: np.ndarray | None = None,
    eps: float = 1e-4,
) -> np.ndarray:
    """(sims, 4): sum_k A_k (mu_k - mean), sum_km B_km (R_km - mu_k), and the noise sums of A and of B over
    pairs of identical sequences (sum A_k^2, sum B_km^2 without copies), of each simulated prompt, with A, B
    from `grpo_ma.ma_advantages` (the code that trains)."""
    thought_adv, answer_adv = grpo_ma.ma_advantages(torch.from_numpy(rewards), eps=eps)
    thought_adv = thought_adv.numpy()
    answer_adv = answer_adv.numpy()
    sims, thoughts, answers = rewards.shape
    if thought_copy is None:
        thought_copy = np.zeros((sims, thoughts), dtype=bool)
    if answer_copy is None:
        answer_copy = np.zeros(rewards.shape, dtype=bool)
    # an answer's copy group: its thought and its reward (a thought's right answers repeat one text)
    groups = (2 * np.arange(thoughts)[None, :, None] + rewards).reshape(sims, -1)
    return np.stack(
        [
            (thought_adv * (mu - mean)).sum(-1),
            (answer_adv * (rewards - mu[..., None])).sum((-2, -1)),
            repeated_sum_of_squares(thought_adv, thought_copy),
            repeated_sum_of_squares(answer_adv.reshape(sims, -1), answer_copy.reshape(sims, -1), groups),
        ],
        axis=-1,
    )


TERMS = ("thought_signal", "answer_signal", "thought_noise", "answer_noise")


def monte_carlo_terms(
    thoughts: int,
    answers: int,
    ratio: float,
    mean: float,
    sims: int,
    *,
    seed: int = 0,
    level: float = 0.999,
    repeats: Repeats = NO_REPEATS,
    eps: float = 1e-4,
    chunk_elements: int = 2**18,
) -> TermEstimate:
    """S_T, S_A, N_T, N_A by simulation of the two-level model, in chunks of about chunk_elements rewards."""
    rng = np.random.default_rng(seed)
    per_chunk = max(1, chunk_elements // (thoughts * answers))
    parts = []
    for start in range(0, sims, per_chunk):
        drawn = simulate_prompts(thoughts, answers, ratio, mean, min(per_chunk, sims - start), rng, repeats)
        parts.append(per_prompt_terms(*drawn[:2], mean, *drawn[2:], eps=eps))
    terms = np.concatenate(parts)
    z = stats.norm.ppf(0.5 + level / 2)
    half = z * terms.std(0, ddof=1) / np.sqrt(sims)
    return TermEstimate(dict(zip(TERMS, terms.mean(0))), dict(zip(TERMS, half)), sims)


def shared_noise(copy: np.ndarray, groups: np.ndarray, dim: int, rng: np.random.Generator) -> np.ndarray:
    """Unit noise vectors (sims, n, dim), one per sequence, except that the copies of one group share the
    vector of their group (the same text has the same score)."""
    sims, count = copy.shape
    noise = rng.standard_normal((sims, count, dim))
    group_noise = rng.standard_normal((sims, int(groups.max()) + 1, dim))
    shared = np.take_along_axis(group_noise, groups[..., None].astype(int), axis=1)
    return np.where(copy[..., None], shared, noise)


def vector_monte_carlo_snr(
    thoughts: int,
    answers: int,
    thought_len: float,
    answer_len: float,
    ratio: float,
    mean: float,
    *,
    dim: int,
    sims: int,
    signal: float = 1.0,
    seed: int = 0,
    repeats: Repeats = NO_REPEATS,
) -> tuple[float, float, float, float]:
    """The model simulated as written: scores in R^dim (h_T = signal e_1, h_A = signal e_2, unit noise per
    token, one score per distinct text), g = sum_k A_k s_k + sum_km B_km u_km for each of `sims` prompts.
    Returns (|E g|^2, its standard error, E|g - E g|^2, its standard error). |E g|^2 is the squared mean
    minus its own noise, trace(Cov)/sims; its standard error is the delta method's
    sqrt(sum_d 4 mean_d^2 var_d / n + 2 var_d^2 / n^2)."""
    rng = np.random.default_rng(seed)
    mu, rewards, thought_copy, answer_copy = simulate_prompts(
        thoughts, answers, ratio, mean, sims, rng, repeats
    )
    thought_adv, answer_adv = grpo_ma.ma_advantages(torch.from_numpy(rewards))
    thought_adv = thought_adv.numpy()
    answer_adv = answer_adv.numpy().reshape(sims, -1)
    answer_groups = (2 * np.arange(thoughts)[None, :, None] + rewards).reshape(sims, -1)
    thought_scores = np.sqrt(thought_len) * shared_noise(thought_copy, np.zeros_like(thought_adv), dim, rng)
    answer_scores = np.sqrt(answer_len) * shared_noise(answer_copy.reshape(sims, -1), answer_groups, dim, rng)
    gradient = np.einsum("nk,nkd->nd", thought_adv, thought_scores)
    gradient += np.einsum("na,nad->nd", answer_adv, answer_scores)
    gradient[:, 0] += signal * (thought_adv * (mu - mean)).sum(-1)
    gradient[:, 1] += signal * (answer_adv * (rewards - mu[..., None]).reshape(sims, -1)).sum(-1)
    variances = gradient.var(0, ddof=1)
    means = gradient.mean(0)
    noise = float(variances.sum())
    signal_error = np.sqrt((4 * means**2 * variances / sims + 2 * variances**2 / sims**2).sum())
    squared_norms = (gradient - means) ** 2
    noise_error = float(squared_norms.sum(-1).std(ddof=1) / np.sqrt(sims))
    return float((means**2).sum() - noise / sims), float(signal_error), noise, noise_error
