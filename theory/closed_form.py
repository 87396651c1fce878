"""Closed-form variance of the standardized thought advantage (claims 1-6 in theory/README.md).

Setting. Thought k has true value mu_k and answer-reward variance sigma_k^2; its M answers are independent
given the thought, so the thought value x_k = V_k = mean of M rewards has mean mu_k and variance
v_k = sigma_k^2/M.
The trainer's thought advantage is

    A_k = (x_k - xbar) / (s(x) + eps),     s(x)^2 = sum_j (x_j - xbar)^2 / (K - ddof)

(`grpo_ma.ma_advantages`). Every variance here is Var[A_k | mu]: the noise that the M answers put into
thought k's advantage, for fixed thought values mu (one prompt).

Three approximations, from crude to accurate:

- `leading_order_variance`: the delta method, linear in the noise around x = mu. Exactly prop. to 1/M.
- `inflated_std_variance`: the same, but linearised around the inflated spread E[s(x)^2] = s_mu^2 + mean(v)
  (ddof=1). Simple, has the right large-K limit, but 10-20% off at K = 4.
- `finite_m_variance`: second-order delta method V1 + V2 (every 1/M^2 term, including the skewness of the
  answers), resummed as the Pade [1/1] approximant V1^2 / (V1 - V2). Its large-K limit is
  sigma_k^2 / (M sigma_theta^2 + E[sigma^2]) (claim 5; `theory.symbolic` takes the limit).

Two exact references for Bernoulli answers, by enumerating the success counts: `two_thought_exact_variance`
(K = 2, where A_k = +-(1/sqrt(2)) * sign(x_1 - x_2) is locally constant, so every order of the delta method
gives 0) and `bernoulli_exact_variance` (any small K and M).

Arrays: mu, sigma2 have shape (K,); every variance function returns shape (K,) (one value per thought).
"""

from __future__ import annotations

import numpy as np
from scipy import stats


# ------------------------------------------------------------------------------------------------
# The setting: thought values drawn from a Beta, Bernoulli answers
# ------------------------------------------------------------------------------------------------
def beta_parameters(ratio: float, mean: float = 0.5) -> tuple[float, float]:
    """(a, b) = (mean*ratio, (1-mean)*ratio): the Beta of the thought values, E[sigma^2]/sigma_theta^2 =
    ratio."""
    return mean * ratio, (1 - mean) * ratio


def beta_thought_values(
    thoughts: int,
    ratio: float,
    mean: float = 0.5,
    *,
    draw: str = "quantile",
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """Thought values mu_k ~ Beta(a, b) with a = mean*ratio, b = (1-mean)*ratio.

    For Bernoulli answers E[sigma^2] / sigma_theta^2 = a + b, so `ratio` is exactly the within/between thought
    variance ratio (sigma_theta^2 = Var[mu], E[sigma^2] = E[mu(1-mu)]).
    draw='quantile': mu_k = Beta quantile at (k + 1/2)/K, a fixed, evenly spread draw whose spread s_mu tends
    to sigma_theta as K grows (used for every table and figure); draw='random': K independent draws from rng.
    Returns shape (K,), sorted for 'quantile'."""
    a, b = beta_parameters(ratio, mean)
    if draw == "quantile":
        return stats.beta.ppf((np.arange(thoughts) + 0.5) / thoughts, a, b)
    if draw == "random":
        return (rng or np.random.default_rng()).beta(a, b, size=thoughts)
    raise ValueError(f"draw must be 'quantile' or 'random', got {draw!r}")


def beta_moments(ratio: float, mean: float = 0.5) -> tuple[float, float]:
    """(sigma_theta^2, E[sigma^2]) of Bernoulli answers whose thought values are
    Beta(mean*ratio, (1-mean)*ratio): sigma_theta^2 = m(1-m)/(ratio+1),
    E[mu(1-mu)] = m(1-m) - sigma_theta^2."""
    between = mean * (1 - mean) / (ratio + 1)
    return between, mean * (1 - mean) - between


def bernoulli_variance(mu: np.ndarray) -> np.ndarray:
    """sigma_k^2 = mu_k (1 - mu_k): variance of one 0/1 answer reward. (K,) -> (K,)."""
    return mu * (1 - mu)


def bernoulli_third_cumulant(mu: np.ndarray) -> np.ndarray:
    """kappa3_k = mu_k (1 - mu_k)(1 - 2 mu_k): third cumulant of one 0/1 answer reward. (K,) -> (K,).
    The mean of M answers has third cumulant kappa3/M^2; it enters the variance at order 1/M^2."""
    return mu * (1 - mu) * (1 - 2 * mu)


def _spread(mu: np.ndarray, ddof: int) -> tuple[np.ndarray, float, float]:
    """Centred values c = mu - mean(mu), their sum of squares S, and s^2 = S/(K - ddof)."""
    centred = mu - mu.mean()
    sum_squares = float((centred**2).sum())
    return centred, sum_squares, sum_squares / (len(mu) - ddof)


def linearised_variance(centred, sigma2, answers, s2, *, ddof: int = 1, eps: float = 0.0):
    """The delta method for f_k(x) = (x_k - xbar)/(s + eps), linear in the noise, with spread s = sqrt(s2):

        df_k/dx_j = (delta_jk - 1/K - beta c_k c_j) / (s + eps),   beta = 1 / ((K - ddof) s (s + eps))
        Var[A_k] ~= sum_j (sigma_j^2 / M) (df_k/dx_j)^2

    With s2 = s_mu^2 this is the exact gradient at x = mu (eps included); with s2 = E[s(x)^2] it is the
    inflated-spread version. The square is expanded so the sum costs O(K): with T_r = sum_j sigma_j^2 c_j^r,

        sum_j sigma_j^2 (delta_jk - 1/K - beta c_k c_j)^2
            = sigma_k^2 (1 - 2/K - 2 beta c_k^2) + T_0/K^2 + 2 beta c_k T_1/K + beta^2 c_k^2 T_2.

    centred, sigma2: (K,); answers and s2 broadcast against them (e.g. shape (n_M, 1) gives (n_M, K))."""
    thoughts = len(centred)
    std = np.sqrt(s2)
    beta = 1 / ((thoughts - ddof) * std * (std + eps))
    t0 = sigma2.sum()
    t1 = (sigma2 * centred).sum()
    t2 = (sigma2 * centred**2).sum()
    own = sigma2 * (1 - 2 / thoughts - 2 * beta * centred**2)
    shared = t0 / thoughts**2 + 2 * beta * centred * t1 / thoughts + beta**2 * centred**2 * t2
    return (own + shared) / (answers * (std + eps) ** 2)


# ------------------------------------------------------------------------------------------------
# 1. Leading order: the delta method around mu
# ------------------------------------------------------------------------------------------------
def leading_order_jacobian(mu: np.ndarray, *, ddof: int = 1) -> np.ndarray:
    """dg_k/dx_j at x = mu for g_k(x) = (x_k - xbar)/s(x) (eps = 0):

        dg_k/dx_j = (delta_jk - (1 + z_k z_j)/K) / s_mu,    z = (mu - mean mu) / s_pop   (population z-score)

    with s_mu the ddof std. ddof only changes the prefactor: with z' = c/s_mu (ddof z-score) the bracket reads
    delta_jk - 1/K - z'_k z'_j/(K - ddof), the same number. (K,) -> (K, K), row k = gradient of g_k."""
    thoughts = len(mu)
    centred, sum_squares, s2 = _spread(mu, ddof)
    z_pop = centred / np.sqrt(sum_squares / thoughts)
    return (np.eye(thoughts) - (1 + np.outer(z_pop, z_pop)) / thoughts) / np.sqrt(s2)


def leading_order_variance(
    mu: np.ndarray, sigma2: np.ndarray, answers: int | float, *, ddof: int = 1, eps: float = 0.0
) -> np.ndarray:
    """The delta method around mu (claim 1 in theory/README.md); for eps = 0

        Var[A_k] ~= (1/(M s_mu^2)) * sum_j sigma_j^2 (delta_jk - (1 + z_k z_j)/K)^2,

    and for eps > 0 the exact gradient of (x_k - xbar)/(s(x) + eps) at mu (`linearised_variance` with
    s2 = s_mu^2). mu, sigma2: (K,) -> (K,). Exactly proportional to 1/M."""
    centred, sum_squares, s2 = _spread(mu, ddof)
    if sum_squares == 0:
        raise ValueError(
            "all thought values are equal: the standardized advantage has no delta-method expansion"
        )
    return linearised_variance(centred, sigma2, answers, s2, ddof=ddof, eps=eps)


# ------------------------------------------------------------------------------------------------
# 2. The simple finite-M correction: linearise around the inflated spread
# ------------------------------------------------------------------------------------------------
def expected_sample_variance(mu: np.ndarray, sigma2: np.ndarray, answers, *, ddof: int = 1):
    """E[s(x)^2] = s_mu^2 + (1 - 1/K)/(K - ddof) * sum_j sigma_j^2/M  (exact; = s_mu^2 + mean(sigma^2)/M for
    ddof=1): answer noise inflates the spread of the thought values. answers may be an array."""
    thoughts = len(mu)
    return _spread(mu, ddof)[2] + (1 - 1 / thoughts) / (thoughts - ddof) * sigma2.sum() / answers


def inflated_std_variance(
    mu: np.ndarray, sigma2: np.ndarray, answers: int | float, *, ddof: int = 1, eps: float = 0.0
) -> np.ndarray:
    """The leading-order formula with s_mu^2 replaced by s~^2 = E[s(x)^2] (also inside the z-scores):

        Var[A_k] ~= (1/(M s~^2)) sum_j sigma_j^2 (delta_jk - 1/K - z~_k z~_j/(K - ddof))^2,  z~ = c/s~

    (eps = 0).

    This is the linear term of A_k expanded around the expected norm of the centred values (eps enters as in
    `linearised_variance`). Large-K limit: sigma_k^2/(M sigma_theta^2 + E[sigma^2]). (K,) -> (K,)."""
    centred = mu - mu.mean()
    s2_inflated = expected_sample_variance(mu, sigma2, answers, ddof=ddof)
    return linearised_variance(centred, sigma2, answers, s2_inflated, ddof=ddof, eps=eps)


# ------------------------------------------------------------------------------------------------
# 3. Second order in 1/M, resummed
# ------------------------------------------------------------------------------------------------
def second_order_sums(p, y, t, v, kappa, n, root_n, thoughts, total):
    """The delta method to order 1/M^2 for h_k(x) = u_k / sqrt(n), u = x - xbar, n = |u|^2
    (A_k = sqrt(K-ddof) h_k).

    With x = mu + e, e_i independent with variance v_i and third cumulant kappa_i,

        Var[h_k] = V1 + (a + b + c) + O(M^-3)
        V1 = sum_i h_i^2 v_i                              (the leading order)
        a  = sum_i h_i h_ii kappa_i                       (skewness of the answers)
        b  = 1/2 sum_ij h_ij^2 v_i v_j                    (curvature)
        c  = sum_ij h_i h_ijj v_i v_j                     (third derivative x linear term)

    where h_i, h_ij, h_ijl are the derivatives of h_k at mu. In the unit vector y = u/sqrt(n), t = y_k and
    p_i = P_ki = delta_ki - 1/K (the centring matrix), with q = 1 - 1/K:
        sqrt(n)   h_i   = p_i - t y_i
        n         h_ij  = -p_i y_j - p_j y_i - t P_ij + 3 t y_i y_j
        n^(3/2)   h_ijl = -(p_i P_jl + p_j P_il + p_l P_ij) + 3(p_i y_j y_l + p_j y_i y_l + p_l y_i y_j)
                          + 3t(P_ij y_l + P_il y_j + P_jl y_i) - 15 t y_i y_j y_l
    Every sum over i, j is reduced to single sums over thoughts, so this function only multiplies, adds and
    calls `total` (sum over the thought index i). That lets one code path run on numpy arrays
    (rows = thought k, columns = i; `theory.closed_form`) and on sympy symbols for a generic thought i
    (`theory.symbolic`, which takes the K -> infinity limit). Returns (V1, a, b, c)."""
    q = 1 - 1 / thoughts
    d = p - t * y  # sqrt(n) h_i
    v1 = total(v * d * d) / n
    a = total(kappa * d * (-2 * p * y - t * q + 3 * t * y * y)) / (n * root_n)
    # b: n h_ij = C_ij - t delta_ij with C = -(p y' + y p') + 3t y y' + (t/K) 1 1', a sum of rank-one terms
    # alpha_r a_r b_r', so sum_ij v_i v_j C_ij^2 = sum_rs alpha_r alpha_s <v a_r a_s> <v b_r b_s>.
    one = 1 + 0 * y
    rank_one = [(-1, p, y), (-1, y, p), (3 * t, y, y), (t / thoughts, one, one)]
    vcc = 0
    for alpha_r, a_r, b_r in rank_one:
        for alpha_s, a_s, b_s in rank_one:
            vcc = vcc + alpha_r * alpha_s * total(v * a_r * a_s) * total(v * b_r * b_s)
    c_diag = -2 * p * y + 3 * t * y * y + t / thoughts
    b = (vcc - 2 * t * total(v * v * c_diag) + t * t * total(v * v)) / (2 * n * n)
    # c: R_i = n^(3/2) sum_j v_j h_ijj
    v_sum = total(v)
    vp = total(v * p)
    vy = total(v * y)
    vpy = total(v * p * y)
    vyy = total(v * y * y)
    r = (
        -q * v_sum * p
        - 2 * (v * p - vp / thoughts)
        + 3 * p * vyy
        + 6 * y * vpy
        + 6 * t * (v * y - vy / thoughts)
        + 3 * t * q * v_sum * y
        - 15 * t * y * vyy
    )
    c = total(v * d * r) / (n * n)
    return v1, a, b, c


def _row_sums(x: np.ndarray) -> np.ndarray:
    """`total` for the numpy path of `second_order_sums`: the sum over thoughts i, the last axis."""
    return x.sum(-1, keepdims=True)


def variance_coefficients(
    mu: np.ndarray, sigma2: np.ndarray, kappa3: np.ndarray | None = None, *, ddof: int = 1, block: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """(C1, C2) with Var[A_k] = C1/M + C2/M^2 + O(M^-3) (second-order delta method, eps = 0).

    v = sigma^2/M and kappa = kappa3/M^2 (kappa3: third cumulant of ONE answer; default Bernoulli
    mu(1-mu)(1-2mu)), so C1 = (K-ddof) V1 M and C2 = (K-ddof)(a+b+c) M^2 do not depend on M.
    Thoughts are processed in blocks of rows so memory stays O(block * K). (K,) -> (K,), (K,)."""
    thoughts = len(mu)
    kappa3 = bernoulli_third_cumulant(mu) if kappa3 is None else kappa3
    centred = mu - mu.mean()
    n = float((centred**2).sum())
    if n == 0:
        raise ValueError(
            "all thought values are equal: the standardized advantage has no delta-method expansion"
        )
    y = (centred / np.sqrt(n))[None, :]
    v = sigma2[None, :]  # M = 1; rescaled below
    kappa = kappa3[None, :]
    c1 = np.empty(thoughts)
    c2 = np.empty(thoughts)
    for start in range(0, thoughts, block):
        rows = np.arange(start, min(start + block, thoughts))
        p = (rows[:, None] == np.arange(thoughts)[None, :]) - 1 / thoughts
        t = y[0, rows][:, None]
        v1, a, b, c = second_order_sums(p, y, t, v, kappa, n, np.sqrt(n), thoughts, _row_sums)
        c1[rows] = (thoughts - ddof) * v1[:, 0]
        c2[rows] = (thoughts - ddof) * (a + b + c)[:, 0]
    return c1, c2


def pade_variance(c1: np.ndarray, c2: np.ndarray, answers: int | float) -> np.ndarray:
    """Resum V1 + V2 = C1/M + C2/M^2 as the Pade [1/1] approximant V1^2/(V1 - V2) = C1/(M - C2/C1).

    Same 1/M and 1/M^2 terms as the series; where C2 < 0 (the norm-inflation term dominates, the usual case)
    it sums the geometric series 1 - r + r^2 ... exactly, which the large-K limit needs. Where C2 > 0 the
    approximant has a pole, so the plain series C1/M + C2/M^2 is used there."""
    series = c1 / answers + c2 / answers**2
    with np.errstate(divide="ignore", invalid="ignore"):
        pade = c1 / (answers - c2 / c1)
    return np.where((c2 < 0) & (c1 > 0), pade, series)


def finite_m_variance(
    mu: np.ndarray,
    sigma2: np.ndarray,
    answers: int | float,
    *,
    kappa3: np.ndarray | None = None,
    ddof: int = 1,
    eps: float = 0.0,
) -> np.ndarray:
    """Var[A_k] beyond the leading order: Pade [1/1] of the second-order delta method
    (see `second_order_sums`).

        Var[A_k] ~= V1^2 / (V1 - V2),   V1 = C1/M (the leading order),  V2 = C2/M^2 (all 1/M^2 terms)

    Large K: V1 -> sigma_k^2/(M s^2), V2 -> -V1 * E[sigma^2]/(M s^2), so
    Var -> sigma_k^2/(M s^2 + E[sigma^2]).
    eps enters through `linearised_variance` with and without eps at the inflated spread s~^2 = E[s(x)^2]:
    where eps lowers it, the Pade value is scaled by their ratio; where eps raises it (a thought whose linear
    term nearly vanishes without eps), their difference is added. Either way the formula tends to the leading
    order with eps, exactly, as M grows. With eps = 0.1, a third of the spread of the thought values, it is
    within 4% of the exact variance at K = 3, 4 and M = 16, 32, and within 8% at M = 8; without the eps terms
    it would be 50-70% too high there.

    Accuracy for Bernoulli answers (Beta(1, 1) quantile thought values; theory/README.md has the tables):
    averaged over the K thoughts, within 2.5/M^2 of the exact variance for K = 3..5, M >= 8, and within 1.5%
    of Monte Carlo for K = 4..64, M >= 8. Per thought it is worse at small K: at K = 4 the outer thoughts are
    5.0% low and the inner ones 2.9% high at M = 8 (12% and 10% at M = 4); per thought it is within 6/M^2 for
    K = 3..5, M >= 8. At K = 3..5 and M <= 2 it fails (13-91% too high averaged over thoughts).
    (K,) -> (K,)."""
    c1, c2 = variance_coefficients(mu, sigma2, kappa3, ddof=ddof)
    return finite_m_from_coefficients(mu, sigma2, c1, c2, answers, ddof=ddof, eps=eps)


def finite_m_from_coefficients(
    mu: np.ndarray,
    sigma2: np.ndarray,
    c1: np.ndarray,
    c2: np.ndarray,
    answers,
    *,
    ddof: int = 1,
    eps: float = 0.0,
) -> np.ndarray:
    """`finite_m_variance` from precomputed (C1, C2), which do not depend on M: answers may be an array of
    shape (n_M, 1) against (K,) coefficients, giving (n_M, K)."""
    centred = mu - mu.mean()
    s2_inflated = expected_sample_variance(mu, sigma2, answers, ddof=ddof)
    with_eps = linearised_variance(centred, sigma2, answers, s2_inflated, ddof=ddof, eps=eps)
    without_eps = linearised_variance(centred, sigma2, answers, s2_inflated, ddof=ddof)
    pade = pade_variance(c1, c2, answers)
    shrinks = with_eps <= without_eps
    # eps lowers the linear term (the usual case): scale by the ratio; eps raises it (a thought whose linear
    # term nearly vanishes without eps, e.g. K = 2): add the difference. The two agree where the ratio is 1.
    ratio = with_eps / np.where(without_eps > 0, without_eps, 1.0)
    return np.where(shrinks, pade * np.where(without_eps > 0, ratio, 1.0), pade + with_eps - without_eps)


# ------------------------------------------------------------------------------------------------
# 4. Exact variances for Bernoulli answers, by enumeration
# ------------------------------------------------------------------------------------------------
def two_thought_distribution(
    mu: np.ndarray, answers: int, *, ddof: int = 1, eps: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Exact distribution of A_1 for K = 2 thoughts with Bernoulli answers: (values, probabilities), both
    ((M+1)^2,), one entry per pair of success counts.

    With D = x_1 - x_2: s = |D|/sqrt(2(2-ddof)), so A_1 = (D/2)/(s + eps) = -A_2: a sign of D, scaled by
    1/sqrt(2) (ddof=1) when eps = 0, and exactly 0 on ties. x_k = Binomial(M, mu_k)/M."""
    counts = np.arange(answers + 1)
    p1 = stats.binom.pmf(counts, answers, mu[0])
    p2 = stats.binom.pmf(counts, answers, mu[1])
    diff = (counts[:, None] - counts[None, :]) / answers
    std = np.abs(diff) / np.sqrt(2 * (2 - ddof))
    with np.errstate(invalid="ignore", divide="ignore"):
        adv = np.where(diff == 0, 0.0, (diff / 2) / (std + eps))
    return adv.ravel(), (p1[:, None] * p2[None, :]).ravel()


def two_thought_exact_variance(
    mu: np.ndarray, answers: int, *, ddof: int = 1, eps: float = 0.0
) -> np.ndarray:
    """Exact Var[A_k] for K = 2 (Bernoulli answers), summed over the (M+1)^2 outcomes of
    `two_thought_distribution`. The delta method gives 0 at every order here: A_k does not move under small
    changes of x, only when the order of x_1, x_2 flips or ties. mu: (2,) -> (2,) (A_2 = -A_1)."""
    values, probs = two_thought_distribution(mu, answers, ddof=ddof, eps=eps)
    mean = (probs * values).sum()
    return np.full(2, (probs * (values - mean) ** 2).sum())


def bernoulli_exact_variance(
    mu: np.ndarray, answers: int, *, ddof: int = 1, eps: float = 0.0, max_outcomes: float = 5e7
) -> np.ndarray:
    """Exact Var[A_k | mu] for K thoughts with M Bernoulli(mu_k) answers each, summed over all (M+1)^K
    vectors of success counts (x_k = count_k / M, independent binomials):

        A_k = (x_k - xbar) / (s(x) + eps), exactly 0 when all x_k are equal (as in the trainer).

    Written out here independently of `grpo_ma`; the cost is (M+1)^K, so it is refused beyond max_outcomes.
    The sum runs over the first thought's count in an outer loop. (K,) -> (K,)."""
    thoughts = len(mu)
    if (answers + 1) ** thoughts > max_outcomes:
        raise ValueError(f"(M+1)^K = {(answers + 1) ** thoughts:.3g} outcomes is more than {max_outcomes:g}")
    counts = np.arange(answers + 1)
    pmf = [stats.binom.pmf(counts, answers, value) for value in mu]
    grids = np.meshgrid(*([counts] * (thoughts - 1)), indexing="ij")
    rest = np.stack([g.ravel() for g in grids], axis=1)  # (outcomes of thoughts 2..K, K-1)
    rest_prob = np.ones(len(rest))
    for j in range(thoughts - 1):
        rest_prob = rest_prob * pmf[j + 1][rest[:, j]]
    first_moment = np.zeros(thoughts)
    second_moment = np.zeros(thoughts)
    for count in counts:
        x = np.column_stack([np.full(len(rest), count), rest]) / answers
        prob = pmf[0][count] * rest_prob
        centred = x - x.mean(1, keepdims=True)
        std = np.sqrt((centred**2).sum(1, keepdims=True) / (thoughts - ddof))
        constant = x.max(1, keepdims=True) == x.min(1, keepdims=True)
        adv = np.where(constant, 0.0, centred / np.where(constant, 1.0, std + eps))
        first_moment += prob @ adv
        second_moment += prob @ (adv * adv)
    return second_moment - first_moment**2


def large_k_floor(sigma2_k, answers, between_var, mean_within_var, *, finite_m: bool = True):
    """K -> infinity limit of Var[A_k] (claims 4 and 5 in theory/README.md):
    leading order: sigma_k^2 / (M sigma_theta^2)       (claim 4)
    finite M:      sigma_k^2 / (M sigma_theta^2 + E[sigma^2])   (claim 5: noise inflates s)"""
    if finite_m:
        return sigma2_k / (answers * between_var + mean_within_var)
    return sigma2_k / (answers * between_var)
