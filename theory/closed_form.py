"""Closed-form variance of the standardized thought advantage (SPEC §3).

Setting. Thought k has true value mu_k and answer-reward variance sigma_k^2; its M answers are independent
given the thought, so the thought value x_k = V_k = mean of M rewards has mean mu_k and variance v_k = sigma_k^2/M.
The trainer's thought advantage is

    A_k = g_k(x) = (x_k - xbar) / s(x),     s(x)^2 = sum_j (x_j - xbar)^2 / (K - ddof)

(`grpo_ma.ma_advantages`, with + eps in the denominator). Every variance here is Var[A_k | mu]: the noise that
the M answers put into thought k's advantage, for fixed thought values mu (one prompt).

Three approximations, from crude to accurate:

- `leading_order_variance`: the SPEC's delta method, linear in the noise around x = mu. Exactly prop. to 1/M.
- `inflated_std_variance`: the same, but linearised around the inflated spread E[s(x)^2] = s_mu^2 + mean(v)
  (ddof=1). Simple, has the right large-K limit, but 10-20% off at K = 4.
- `finite_m_variance`: second-order delta method V1 + V2 (every 1/M^2 term, including the skewness of the
  answers), resummed as the Pade [1/1] approximant V1^2 / (V1 - V2). Its large-K limit is
  sigma_k^2 / (M sigma_theta^2 + E[sigma^2]) (SPEC §3 claim 5; `theory.symbolic` takes the limit).

K = 2 is special: A_k = +-(1/sqrt(2)) * sign(x_1 - x_2) (ddof=1) is locally constant, so every order of the
delta method gives 0. `two_thought_exact_variance` enumerates the Bernoulli outcomes instead.

Arrays: mu, sigma2 have shape (K,); every variance function returns shape (K,) (one value per thought).
"""
from __future__ import annotations

import numpy as np
from scipy import stats


# ------------------------------------------------------------------------------------------------
# The setting: thought values drawn from a Beta, Bernoulli answers
# ------------------------------------------------------------------------------------------------
def beta_thought_values(thoughts: int, ratio: float, mean: float = 0.5, *, draw: str = "quantile",
                        rng: np.random.Generator | None = None) -> np.ndarray:
    """Thought values mu_k ~ Beta(a, b) with a = mean*ratio, b = (1-mean)*ratio.

    For Bernoulli answers E[sigma^2] / sigma_theta^2 = a + b, so `ratio` is exactly the within/between thought
    variance ratio (sigma_theta^2 = Var[mu], E[sigma^2] = E[mu(1-mu)]).
    draw='quantile': mu_k = Beta quantile at (k + 1/2)/K, a fixed, evenly spread draw whose spread s_mu tends to
    sigma_theta as K grows (used for every table and figure); draw='random': K independent draws from rng.
    Returns shape (K,), sorted for 'quantile'."""
    a, b = mean * ratio, (1 - mean) * ratio
    if draw == "quantile":
        return stats.beta.ppf((np.arange(thoughts) + 0.5) / thoughts, a, b)
    if draw == "random":
        return (rng or np.random.default_rng()).beta(a, b, size=thoughts)
    raise ValueError(f"draw must be 'quantile' or 'random', got {draw!r}")


def beta_moments(ratio: float, mean: float = 0.5) -> tuple[float, float]:
    """(sigma_theta^2, E[sigma^2]) of Bernoulli answers whose thought values are Beta(mean*ratio, (1-mean)*ratio):
    sigma_theta^2 = m(1-m)/(ratio+1), E[mu(1-mu)] = m(1-m) - sigma_theta^2."""
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
    sum_squares = float((centred ** 2).sum())
    return centred, sum_squares, sum_squares / (len(mu) - ddof)


def _eps_factor(std: float, eps: float) -> float:
    """The trainer divides by s + eps, not s: the variance shrinks by (s/(s+eps))^2 (first order in eps/s)."""
    return (std / (std + eps)) ** 2


# ------------------------------------------------------------------------------------------------
# 1. Leading order: the SPEC's delta method
# ------------------------------------------------------------------------------------------------
def leading_order_jacobian(mu: np.ndarray, *, ddof: int = 1) -> np.ndarray:
    """dg_k/dx_j at x = mu:

        dg_k/dx_j = (delta_jk - (1 + z_k z_j)/K) / s_mu,    z = (mu - mean mu) / s_pop   (population z-score)

    with s_mu the ddof std. ddof only changes the prefactor: with z' = c/s_mu (ddof z-score) the bracket reads
    delta_jk - 1/K - z'_k z'_j/(K - ddof), the same number. (K,) -> (K, K), row k = gradient of g_k."""
    thoughts = len(mu)
    centred, sum_squares, s2 = _spread(mu, ddof)
    z_pop = centred / np.sqrt(sum_squares / thoughts)
    return (np.eye(thoughts) - (1 + np.outer(z_pop, z_pop)) / thoughts) / np.sqrt(s2)


def leading_order_variance(mu: np.ndarray, sigma2: np.ndarray, answers: int | float, *, ddof: int = 1,
                           eps: float = 0.0) -> np.ndarray:
    """SPEC §3, delta method around mu:

        Var[A_k] ~= (1/(M s_mu^2)) * sum_j sigma_j^2 (delta_jk - (1 + z_k z_j)/K)^2

    computed in O(K) per thought by expanding the square (b_kj = (1 + z_k z_j)/K):
        sum_j sigma_j^2 (delta_jk - b_kj)^2 = sigma_k^2 (1 - 2 b_kk) + (S0 + 2 z_k S1 + z_k^2 S2)/K^2,
        S_r = sum_j sigma_j^2 z_j^r.
    mu, sigma2: (K,) -> (K,). Exactly proportional to 1/M."""
    thoughts = len(mu)
    centred, sum_squares, s2 = _spread(mu, ddof)
    if sum_squares == 0:
        raise ValueError("all thought values are equal: the standardized advantage has no delta-method expansion")
    z = centred / np.sqrt(sum_squares / thoughts)
    s0, s1, s2_moment = sigma2.sum(), (sigma2 * z).sum(), (sigma2 * z * z).sum()
    b_kk = (1 + z * z) / thoughts
    bracket = sigma2 * (1 - 2 * b_kk) + (s0 + 2 * z * s1 + z * z * s2_moment) / thoughts ** 2
    return bracket / (answers * s2) * _eps_factor(np.sqrt(s2), eps)


# ------------------------------------------------------------------------------------------------
# 2. The simple finite-M correction: linearise around the inflated spread
# ------------------------------------------------------------------------------------------------
def expected_sample_variance(mu: np.ndarray, sigma2: np.ndarray, answers: int | float, *, ddof: int = 1) -> float:
    """E[s(x)^2] = s_mu^2 + (1 - 1/K)/(K - ddof) * sum_j sigma_j^2/M  (exact; = s_mu^2 + mean(sigma^2)/M for
    ddof=1): answer noise inflates the spread of the thought values."""
    thoughts = len(mu)
    return _spread(mu, ddof)[2] + (1 - 1 / thoughts) / (thoughts - ddof) * sigma2.sum() / answers


def inflated_std_variance(mu: np.ndarray, sigma2: np.ndarray, answers: int | float, *, ddof: int = 1,
                          eps: float = 0.0) -> np.ndarray:
    """The leading-order formula with s_mu^2 replaced by s~^2 = E[s(x)^2] (also inside the z-scores):

        Var[A_k] ~= (1/(M s~^2)) sum_j sigma_j^2 (delta_jk - 1/K - z~_k z~_j/(K - ddof))^2,  z~ = c/s~.

    This is the linear term of A_k expanded around the expected norm of the centred values. Large-K limit:
    sigma_k^2/(M sigma_theta^2 + E[sigma^2]). (K,) -> (K,)."""
    thoughts = len(mu)
    centred = mu - mu.mean()
    s2_inflated = expected_sample_variance(mu, sigma2, answers, ddof=ddof)
    z = centred / np.sqrt(s2_inflated)
    bracket = np.eye(thoughts) - 1 / thoughts - np.outer(z, z) / (thoughts - ddof)
    return (bracket ** 2 @ sigma2) / (answers * s2_inflated) * _eps_factor(np.sqrt(s2_inflated), eps)


# ------------------------------------------------------------------------------------------------
# 3. Second order in 1/M, resummed
# ------------------------------------------------------------------------------------------------
def second_order_sums(p, y, t, v, kappa, n, root_n, thoughts, total):
    """The delta method to order 1/M^2 for h_k(x) = u_k / sqrt(n), u = x - xbar, n = |u|^2 (A_k = sqrt(K-ddof) h_k).

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
    calls `total` (sum over the thought index i). That lets one code path run on numpy arrays (rows = thought k,
    columns = i; `theory.closed_form`) and on sympy symbols for a generic thought i (`theory.symbolic`, which
    takes the K -> infinity limit). Returns (V1, a, b, c)."""
    q = 1 - 1 / thoughts
    d = p - t * y                                                    # sqrt(n) h_i
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
    v_sum, vp, vy, vpy, vyy = total(v), total(v * p), total(v * y), total(v * p * y), total(v * y * y)
    r = (-q * v_sum * p - 2 * (v * p - vp / thoughts) + 3 * p * vyy + 6 * y * vpy
         + 6 * t * (v * y - vy / thoughts) + 3 * t * q * v_sum * y - 15 * t * y * vyy)
    c = total(v * d * r) / (n * n)
    return v1, a, b, c


def variance_coefficients(mu: np.ndarray, sigma2: np.ndarray, kappa3: np.ndarray | None = None, *,
                          ddof: int = 1, block: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(C1, C2) with Var[A_k] = C1/M + C2/M^2 + O(M^-3) (second-order delta method, eps = 0).

    v = sigma^2/M and kappa = kappa3/M^2 (kappa3: third cumulant of ONE answer; default Bernoulli
    mu(1-mu)(1-2mu)), so C1 = (K-ddof) V1 M and C2 = (K-ddof)(a+b+c) M^2 do not depend on M.
    Thoughts are processed in blocks of rows so memory stays O(block * K). (K,) -> (K,), (K,)."""
    thoughts = len(mu)
    kappa3 = bernoulli_third_cumulant(mu) if kappa3 is None else kappa3
    centred = mu - mu.mean()
    n = float((centred ** 2).sum())
    if n == 0:
        raise ValueError("all thought values are equal: the standardized advantage has no delta-method expansion")
    y = (centred / np.sqrt(n))[None, :]
    v, kappa = sigma2[None, :], kappa3[None, :]                      # M = 1; rescaled below
    c1, c2 = np.empty(thoughts), np.empty(thoughts)
    for start in range(0, thoughts, block):
        rows = np.arange(start, min(start + block, thoughts))
        p = (rows[:, None] == np.arange(thoughts)[None, :]) - 1 / thoughts
        t = y[0, rows][:, None]
        v1, a, b, c = second_order_sums(p, y, t, v, kappa, n, np.sqrt(n), thoughts,
                                        lambda x: x.sum(-1, keepdims=True))
        c1[rows] = (thoughts - ddof) * v1[:, 0]
        c2[rows] = (thoughts - ddof) * (a + b + c)[:, 0]
    return c1, c2


def pade_variance(c1: np.ndarray, c2: np.ndarray, answers: int | float) -> np.ndarray:
    """Resum V1 + V2 = C1/M + C2/M^2 as the Pade [1/1] approximant V1^2/(V1 - V2) = C1/(M - C2/C1).

    Same 1/M and 1/M^2 terms as the series; where C2 < 0 (the norm-inflation term dominates, the usual case) it
    sums the geometric series 1 - r + r^2 ... exactly, which the large-K limit needs. Where C2 > 0 the
    approximant has a pole, so the plain series C1/M + C2/M^2 is used there."""
    series = c1 / answers + c2 / answers ** 2
    with np.errstate(divide="ignore", invalid="ignore"):
        pade = c1 / (answers - c2 / c1)
    return np.where((c2 < 0) & (c1 > 0), pade, series)


def finite_m_variance(mu: np.ndarray, sigma2: np.ndarray, answers: int | float, *, kappa3: np.ndarray | None = None,
                      ddof: int = 1, eps: float = 0.0) -> np.ndarray:
    """Var[A_k] beyond the leading order: Pade [1/1] of the second-order delta method (see `second_order_sums`).

        Var[A_k] ~= V1^2 / (V1 - V2),   V1 = C1/M (SPEC leading order),  V2 = C2/M^2 (all 1/M^2 terms)

    Large K: V1 -> sigma_k^2/(M s^2), V2 -> -V1 * E[sigma^2]/(M s^2), so Var -> sigma_k^2/(M s^2 + E[sigma^2]).
    eps enters as (s~/(s~+eps))^2 with s~^2 = E[s(x)^2]. (K,) -> (K,)."""
    c1, c2 = variance_coefficients(mu, sigma2, kappa3, ddof=ddof)
    return finite_m_from_coefficients(mu, sigma2, c1, c2, answers, ddof=ddof, eps=eps)


def finite_m_from_coefficients(mu: np.ndarray, sigma2: np.ndarray, c1: np.ndarray, c2: np.ndarray, answers, *,
                               ddof: int = 1, eps: float = 0.0) -> np.ndarray:
    """`finite_m_variance` from precomputed (C1, C2), which do not depend on M: answers may be an array of shape
    (n_M, 1) against (K,) coefficients, giving (n_M, K)."""
    s_inflated = np.sqrt(expected_sample_variance(mu, sigma2, answers, ddof=ddof))
    return pade_variance(c1, c2, answers) * _eps_factor(s_inflated, eps)


# ------------------------------------------------------------------------------------------------
# 4. K = 2: exact, by enumeration
# ------------------------------------------------------------------------------------------------
def two_thought_distribution(mu: np.ndarray, answers: int, *, ddof: int = 1,
                             eps: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Exact distribution of A_1 for K = 2 thoughts with Bernoulli answers: (values, probabilities), both
    ((M+1)^2,), one entry per pair of success counts.

    With D = x_1 - x_2: s = |D|/sqrt(2(2-ddof)), so A_1 = (D/2)/(s + eps) = -A_2: a sign of D, scaled by
    1/sqrt(2) (ddof=1) when eps = 0, and exactly 0 on ties. x_k = Binomial(M, mu_k)/M."""
    counts = np.arange(answers + 1)
    p1, p2 = stats.binom.pmf(counts, answers, mu[0]), stats.binom.pmf(counts, answers, mu[1])
    diff = (counts[:, None] - counts[None, :]) / answers
    std = np.abs(diff) / np.sqrt(2 * (2 - ddof))
    with np.errstate(invalid="ignore", divide="ignore"):
        adv = np.where(diff == 0, 0.0, (diff / 2) / (std + eps))
    return adv.ravel(), (p1[:, None] * p2[None, :]).ravel()


def two_thought_exact_variance(mu: np.ndarray, answers: int, *, ddof: int = 1, eps: float = 0.0) -> np.ndarray:
    """Exact Var[A_k] for K = 2 (Bernoulli answers), summed over the (M+1)^2 outcomes of
    `two_thought_distribution`. The delta method gives 0 at every order here: A_k does not move under small
    changes of x, only when the order of x_1, x_2 flips or ties. mu: (2,) -> (2,) (A_2 = -A_1)."""
    values, probs = two_thought_distribution(mu, answers, ddof=ddof, eps=eps)
    mean = (probs * values).sum()
    return np.full(2, (probs * (values - mean) ** 2).sum())


def large_k_floor(sigma2_k, answers, between_var, mean_within_var, *, finite_m: bool = True):
    """K -> infinity limit of Var[A_k] (SPEC §3 claims 4 and 5):
        leading order: sigma_k^2 / (M sigma_theta^2)       (claim 4)
        finite M:      sigma_k^2 / (M sigma_theta^2 + E[sigma^2])   (claim 5: noise inflates s)"""
    if finite_m:
        return sigma2_k / (answers * between_var + mean_within_var)
    return sigma2_k / (answers * between_var)
