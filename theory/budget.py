"""Budget allocation: which tree T{K}A{M} should a token budget buy?

Cost of one prompt's rollouts: K thoughts of L_t tokens and K*M answers of L_a tokens,

    cost(K, M) = K L_t + K M L_a          (T4A4: 4 L_t + 16 L_a;  T16A1: 16 (L_t + L_a))

Two objectives (`allocations(..., objective=...)`, `python -m theory budget --objective ...`):

- 'gradient' (the default): the signal-to-noise ratio of the prompt's policy gradient per generated token,
  `theory.gradient.gradient_snr` (claim 7 in theory/README.md). A budget B buys B / cost prompts and the SNR
  of their mean gradient is B * SNR / cost, so the tree of largest SNR / cost trains with the least noisy
  gradient for the budget. It counts what more thoughts buy (more thought samples, fewer all-equal groups)
  against what more answers buy (more reliable thought values, more answer samples).
- 'variance': the thought-averaged Var[A_k] from `closed_form.finite_m_variance` (Pade-resummed
  second-order delta method), with thought values at the Beta quantiles whose within/between variance ratio
  is `ratio` (`closed_form.beta_thought_values`). It is per-thought noise, which rises with K towards its
  floor (claim 4), so at a fixed budget it always prefers the fewest thoughts and the most answers: it does
  not count the gain of training on more thoughts. K = 2 is left out by default here: there A_k = +-1/sqrt(2)
  is a sign, its variance is a tie/flip probability that the delta method sets to 0 at every order, and a
  low variance of a sign says nothing about how well it ranks the thoughts (with min_thoughts=2 it is scored
  by exact enumeration).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from theory import closed_form as cf
from theory import gradient as gr

OBJECTIVES = ("gradient", "variance")


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
    variance: float  # mean_k Var[A_k]: lower is better under the variance objective
    gradient: gr.GradientSNR  # its per_token: higher is better under the gradient objective

    @property
    def name(self) -> str:
        return config_name(self.thoughts, self.answers)

    @property
    def snr_per_token(self) -> float:
        return self.gradient.per_token


def _smallest_thoughts(objective: str, min_thoughts: int | None) -> int:
    """K = 2 is a fine tree for the gradient objective, but a sign whose variance misleads (module docstring):
    by default the variance objective starts at K = 3."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if min_thoughts is not None:
        return max(min_thoughts, 2)
    return 2 if objective == "gradient" else 3


def allocations(
    budget: float,
    thought_len: float,
    answer_len: float,
    ratio: float,
    *,
    mean: float = 0.5,
    ddof: int = 1,
    objective: str = "gradient",
    repeats: gr.Repeats = gr.NO_REPEATS,
    min_thoughts: int | None = None,
    max_thoughts: int = 1024,
) -> list[Allocation]:
    """Every (K, M) with K L_t + K M L_a <= budget, min_thoughts <= K <= max_thoughts, M >= 1, sorted best
    first by `objective`: largest gradient SNR per token, or least thought-averaged variance. min_thoughts:
    2 for 'gradient', 3 for 'variance' unless given."""
    rows = []
    for thoughts in range(_smallest_thoughts(objective, min_thoughts), max_thoughts + 1):
        max_answers = int((budget / thoughts - thought_len) // answer_len)
        if max_answers < 1:
            continue
        answers = np.arange(1, max_answers + 1)
        if thoughts == 2 and objective == "variance":
            # K = 2 is enumerated exactly, O(M^2) per M: only its largest M (the variance falls with M)
            answers = answers[-1:]
        variances = np.atleast_1d(mean_thought_variance(thoughts, answers, ratio, mean=mean, ddof=ddof))
        for m, variance in zip(answers, variances):
            shape = (thoughts, int(m), thought_len, answer_len, ratio)
            gradient = gr.gradient_snr(*shape, mean=mean, repeats=repeats)
            tokens = token_cost(thoughts, int(m), thought_len, answer_len)
            rows.append(Allocation(thoughts, int(m), tokens, float(variance), gradient))
    if objective == "gradient":
        return sorted(rows, key=lambda row: -row.snr_per_token)
    return sorted(rows, key=lambda row: row.variance)


def best_allocation(
    budget: float, thought_len: float, answer_len: float, ratio: float, **kwargs
) -> Allocation:
    """The best (K, M) within the budget under kwargs' objective (default 'gradient'); raises if nothing
    fits."""
    rows = allocations(budget, thought_len, answer_len, ratio, **kwargs)
    if not rows:
        smallest = _smallest_thoughts(kwargs.get("objective", "gradient"), kwargs.get("min_thoughts"))
        raise ValueError(
            f"no T{{K}}A{{M}} with K >= {smallest} fits in {budget} tokens "
            f"(L_t={thought_len}, L_a={answer_len})"
        )
    return rows[0]


def why_gradient(
    best: Allocation,
    rows: list[Allocation],
    budget: float,
    ratio: float,
    thought_len: float,
    answer_len: float,
) -> list[str]:
    """Lines that say why the gradient objective prefers `best`: its signal split, its all-equal groups, the
    reliability of its thought values, and what the neighbours in K give up."""
    g = best.gradient
    reliability = best.answers / (best.answers + ratio)
    lines = [
        f"why {best.name}: S_T^2 share {g.thought_share:.0%} (thought level) vs {1 - g.thought_share:.0%} "
        f"(answer level); {g.zero_signal_thought:.1%} of its groups have all K thought values equal "
        f"(no thought signal), {g.zero_signal_answer:.1%} all K*M rewards equal; thought-value reliability "
        f"sigma_theta^2/(sigma_theta^2 + E[sigma^2]/M) = {reliability:.2f}",
    ]
    fewer = [r for r in rows if r.thoughts < best.thoughts]
    more = [r for r in rows if r.thoughts > best.thoughts]
    if fewer:
        other = max(fewer, key=lambda r: r.snr_per_token)
        lines.append(
            f"  fewer thoughts, best {other.name}: {other.snr_per_token / best.snr_per_token:.2f} x the SNR "
            f"per token (thought signal S_T {other.gradient.thought_signal:.3g} vs {g.thought_signal:.3g}, "
            f"all-equal groups {other.gradient.zero_signal_thought:.1%})"
        )
    if more:
        other = max(more, key=lambda r: r.snr_per_token)
        lines.append(
            f"  more thoughts, best {other.name}: {other.snr_per_token / best.snr_per_token:.2f} x the SNR "
            f"per token (answer signal S_A {other.gradient.answer_signal:.3g} vs {g.answer_signal:.3g}, "
            f"{other.tokens:g} tokens)"
        )
    lines.append(
        f"  the thought term alone would take M* = sqrt(ratio L_t/L_a) = "
        f"{np.sqrt(ratio * thought_len / answer_len):.2g} answers per thought (Cochran's two-stage optimum); "
        "the answer term moves the best M: up while answers are distinct texts, down where right answers "
        "repeat one text"
    )
    lines.append(
        f"  per token: a tree of {best.tokens:g} tokens buys {budget / best.tokens:.3g} prompts of the "
        "budget (the SNR of their mean gradient adds up over prompts), so a small tree on more prompts can "
        "beat one large tree"
    )
    return lines


def budget_report(
    budget: float,
    thought_len: float,
    answer_len: float,
    ratio: float,
    *,
    mean: float = 0.5,
    ddof: int = 1,
    objective: str = "gradient",
    repeats: gr.Repeats = gr.NO_REPEATS,
    min_thoughts: int | None = None,
    max_thoughts: int = 1024,
    rows_shown: int = 8,
) -> str:
    """The answer to the budget question as text: for each K its best M under `objective`, the best tree and
    why, plain GRPO (the largest T{K}A1 that fits), and the paper's T4A4 / T16A1 for reference. Both
    objectives are shown in every row; `objective` decides the ranking."""
    rows = allocations(
        budget,
        thought_len,
        answer_len,
        ratio,
        mean=mean,
        ddof=ddof,
        objective=objective,
        repeats=repeats,
        min_thoughts=min_thoughts,
        max_thoughts=max_thoughts,
    )
    smallest = _smallest_thoughts(objective, min_thoughts)
    if not rows:
        return (
            f"nothing fits: even {config_name(smallest, 1)} costs "
            f"{token_cost(smallest, 1, thought_len, answer_len):g} tokens > budget {budget:g}"
        )
    best_per_k = {}
    for row in rows:  # rows are sorted best first: keep the first row of each K
        best_per_k.setdefault(row.thoughts, row)
    best = rows[0]
    ranked_by = {
        "gradient": "gradient SNR per token of the prompt's policy gradient (claim 7; higher is better)",
        "variance": "mean_k Var[A_k] of the thought advantage (finite-M formula; lower is better)",
    }[objective]
    lines = [
        f"budget {budget:g} tokens per prompt, L_t = {thought_len:g}, L_a = {answer_len:g}, "
        f"E[sigma^2]/sigma_theta^2 = {ratio:g} "
        f"(thought values from Beta({mean * ratio:g}, {(1 - mean) * ratio:g}): drawn for the gradient, at "
        f"its quantiles for the variance; Bernoulli answers), ddof = {ddof}, "
        f"repeated texts: thoughts {repeats.thought:g}, right answers {repeats.right_answer:g}, "
        f"wrong answers {repeats.wrong_answer:g}",
        f"objective: {ranked_by}; tokens = K*L_t + K*M*L_a",
        f"{'K':>5}  {'best tree':>10}  {'tokens':>8}  {'SNR/token':>10}  {'x best':>7}  "
        f"{'thought share':>13}  {'mean_k Var[A_k]':>15}",
    ]
    shown = sorted(best_per_k.values(), key=lambda row: row.thoughts)
    if len(shown) > rows_shown:  # the smallest K, then a geometric spread of the rest
        keep = np.unique(np.geomspace(1, len(shown), rows_shown).astype(int) - 1)
        shown = [shown[i] for i in keep]

    def versus_best(row: Allocation) -> float:
        if objective == "gradient":
            return row.snr_per_token / best.snr_per_token
        return row.variance / best.variance

    for row in shown:
        lines.append(
            f"{row.thoughts:>5}  {row.name:>10}  {row.tokens:>8g}  {row.snr_per_token:>10.4g}  "
            f"{versus_best(row):>7.3g}  {row.gradient.thought_share:>13.0%}  {row.variance:>15.4g}"
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
        shape = (thoughts, answers, thought_len, answer_len, ratio)
        gradient = gr.gradient_snr(*shape, mean=mean, repeats=repeats)
        row = Allocation(thoughts, answers, tokens, float(variance), gradient)
        fits = "fits" if tokens <= budget else "over budget"
        lines.append(
            f"{label}: {row.name}, {tokens:g} tokens ({fits}), SNR/token {row.snr_per_token:.4g}, variance "
            f"{variance:.4g}: {versus_best(row):.3g} x the best"
        )
    if objective == "gradient":
        lines += why_gradient(best, rows, budget, ratio, thought_len, answer_len)
    else:
        lines.append(
            "note: Var[A_k] rises with K towards its floor (claim 4 in theory/README.md), so this objective "
            "always prefers the fewest thoughts and spends the rest on answers; it measures the noise in "
            "each thought's advantage, not how many thoughts are trained on (--objective gradient counts "
            "that)."
        )
    score = (
        f"SNR/token = {best.snr_per_token:.4g}"
        if objective == "gradient"
        else f"mean_k Var[A_k] = {best.variance:.4g}"
    )
    lines.append(f"best: {best.name} ({best.tokens:g} tokens, {score})")
    return "\n".join(lines)
