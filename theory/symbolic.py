"""The delta method done by sympy: derivatives, the closed form, and the M -> oo and K -> oo limits.

The claims are numbered as in theory/README.md. Three derivations, each independent of the numpy code it
checks:

1. `leading_order_difference(K, ddof)`: g_k(x) = (x_k - xbar)/s(x) as a sympy expression in K symbols,
   its gradient at x = mu, grad' Sigma grad with Sigma = diag(sigma_j^2/M), minus the closed form typed in
   by hand; the difference is simplified to 0 for K = 2..5 (claim 1). `leading_order_function` compiles the
   same quadratic form with eps in the denominator, for comparisons at points where eps matters.
2. `derivative_tensors(K, ddof)`: the first three derivatives of g at mu, lambdified, so the second-order
   terms of `theory.closed_form.second_order_sums` can be checked against their definitions at any point.
3. `generic_thought_variance(ddof)`: the same `second_order_sums` evaluated on symbols for a generic thought
   i, the thought k, and the moments E[z^a sigma^2b kappa3^c] over thoughts, which is exact for every K; then
   `large_k_limits` takes K -> oo (claims 4 and 5) and `large_m_limits` M -> oo (claim 3).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import sympy as sp

from theory.closed_form import second_order_sums


# ------------------------------------------------------------------------------------------------
# 1. Leading order, K = 2..5: gradient of g versus the closed form
# ------------------------------------------------------------------------------------------------
def standardized_advantage(x: list[sp.Symbol], k: int, ddof: int, eps: sp.Expr = 0) -> sp.Expr:
    """g_k(x) = (x_k - xbar) / (s(x) + eps), s(x)^2 = sum_j (x_j - xbar)^2/(K - ddof)."""
    thoughts = len(x)
    mean = sum(x) / thoughts
    return (x[k] - mean) / (sp.sqrt(sum((xi - mean) ** 2 for xi in x) / (thoughts - ddof)) + eps)


def closed_form_expression(
    mu: list[sp.Symbol], sigma: list[sp.Symbol], answers: sp.Symbol, k: int, ddof: int
) -> sp.Expr:
    """Claim 1 as written: (1/(M s_mu^2)) sum_j sigma_j^2 (delta_jk - (1 + z_k z_j)/K)^2, z = population
    z-score of mu, s_mu^2 = sum_j (mu_j - mean)^2/(K - ddof)."""
    thoughts = len(mu)
    mean = sum(mu) / thoughts
    sum_squares = sum((m - mean) ** 2 for m in mu)
    z = [(m - mean) / sp.sqrt(sum_squares / thoughts) for m in mu]
    bracket = [sp.KroneckerDelta(j, k) - (1 + z[k] * z[j]) / thoughts for j in range(thoughts)]
    return sum(sigma[j] ** 2 * bracket[j] ** 2 for j in range(thoughts)) / (
        answers * sum_squares / (thoughts - ddof)
    )


def thought_symbols(thoughts: int) -> tuple[tuple, tuple, sp.Symbol]:
    """Symbols for K thought values mu_k, answer standard deviations sigma_k, and the answer count M."""
    return (
        sp.symbols(f"mu1:{thoughts + 1}", real=True),
        sp.symbols(f"sigma1:{thoughts + 1}", positive=True),
        sp.Symbol("M", positive=True),
    )


def delta_method_variance(
    mu: tuple, variances: Sequence[sp.Expr], answers: sp.Symbol, k: int, ddof: int, eps: sp.Expr = 0
) -> sp.Expr:
    """Var[A_k] ~= grad g_k' diag(variances / M) grad g_k, the gradient taken by sympy."""
    gradient = [sp.diff(standardized_advantage(list(mu), k, ddof, eps), m) for m in mu]
    return sum(g**2 * v / answers for g, v in zip(gradient, variances))


def leading_order_difference(thoughts: int, ddof: int) -> list[sp.Expr]:
    """grad g_k' diag(sigma^2/M) grad g_k - closed form, for every k, simplified (a list of K zeros when the
    closed form is right). Both sides contain sqrt(S) only squared, so `cancel` reduces them to rational
    functions of mu and decides the identity exactly."""
    mu, sigma, answers = thought_symbols(thoughts)
    variances = [s**2 for s in sigma]
    return [
        sp.cancel(
            sp.together(
                delta_method_variance(mu, variances, answers, k, ddof)
                - closed_form_expression(mu, sigma, answers, k, ddof)
            )
        )
        for k in range(thoughts)
    ]


def leading_order_expression(thoughts: int, ddof: int) -> tuple[sp.Expr, tuple, tuple, sp.Symbol]:
    """Var[A_0] ~= grad g_0' diag(sigma^2/M) grad g_0 as a sympy expression; returns (expr, mu, sigma, M)."""
    mu, sigma, answers = thought_symbols(thoughts)
    return delta_method_variance(mu, [s**2 for s in sigma], answers, 0, ddof), mu, sigma, answers


@functools.cache
def leading_order_function(thoughts: int, ddof: int):
    """Numeric f(mu, sigma2, M, eps=0) -> (K,) from sympy's gradient of (x_k - xbar)/(s(x) + eps) at x = mu
    (for comparisons at random points, eps included)."""
    mu, _, answers = thought_symbols(thoughts)
    sigma2 = sp.symbols(f"v1:{thoughts + 1}", positive=True)
    eps = sp.Symbol("eps", nonnegative=True)
    rows = [delta_method_variance(mu, sigma2, answers, k, ddof, eps) for k in range(thoughts)]
    compiled = sp.lambdify((mu, sigma2, answers, eps), rows, "numpy", cse=True)

    def evaluate(mu_values, sigma2_values, answers_value, eps_value=0.0) -> np.ndarray:
        return np.asarray(
            compiled(tuple(mu_values), tuple(sigma2_values), answers_value, eps_value), dtype=float
        )

    return evaluate


# ------------------------------------------------------------------------------------------------
# 2. Derivatives up to third order, for the second-order terms
# ------------------------------------------------------------------------------------------------
@functools.cache
def derivative_tensors(thoughts: int, ddof: int):
    """Numeric mu -> (J, H, T): J[k,i] = dg_k/dx_i, H[k,i,j], T[k,i,j,l] at x = mu, from sympy's derivatives.

    Only g_0 is differentiated: g is symmetric in the other coordinates, so g_k(x) = g_0(x[pi]) with pi the
    transposition of 0 and k, and the derivatives of g_k are those of g_0 at mu[pi] with every index mapped
    through pi."""
    x = sp.symbols(f"x1:{thoughts + 1}", real=True)
    g = standardized_advantage(list(x), 0, ddof)
    grad = [sp.diff(g, xi) for xi in x]
    hess = [[sp.diff(gi, xj) for xj in x] for gi in grad]
    third = [[[sp.diff(hij, xl) for xl in x] for hij in row] for row in hess]
    compiled = sp.lambdify([x], [grad, hess, third], "numpy", cse=True)

    def evaluate(mu: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        jac = np.empty((thoughts, thoughts))
        hessian = np.empty((thoughts,) * 3)
        third_tensor = np.empty((thoughts,) * 4)
        for k in range(thoughts):
            perm = np.arange(thoughts)
            perm[[0, k]] = [k, 0]
            j0, h0, t0 = (np.asarray(a, dtype=float) for a in compiled(tuple(np.asarray(mu)[perm])))
            jac[k] = j0[perm]
            hessian[k] = h0[np.ix_(perm, perm)]
            third_tensor[k] = t0[np.ix_(perm, perm, perm)]
        return jac, hessian, third_tensor

    return evaluate


def second_order_from_derivatives(
    mu: np.ndarray, sigma2: np.ndarray, kappa3: np.ndarray, answers: float, ddof: int
) -> tuple[np.ndarray, np.ndarray]:
    """(V1, V2) straight from the definitions, v = sigma2/M, kappa = kappa3/M^2:
    V1 = sum_i J_ki^2 v_i,
    V2 = sum_i J_ki H_kii kappa_i + 1/2 sum_ij H_kij^2 v_i v_j + sum_ij J_ki T_kijj v_i v_j.  (K,), (K,)"""
    jac, hess, third = derivative_tensors(len(mu), ddof)(mu)
    v = sigma2 / answers
    kappa = kappa3 / answers**2
    v1 = jac**2 @ v
    skew = np.einsum("ki,kii,i->k", jac, hess, kappa)
    curvature = 0.5 * np.einsum("kij,i,j->k", hess**2, v, v)
    third_term = np.einsum("ki,kijj,i,j->k", jac, third, v, v)
    return v1, skew + curvature + third_term


# ------------------------------------------------------------------------------------------------
# 3. Any K: the same sums on symbols for a generic thought, then the limits
# ------------------------------------------------------------------------------------------------
K, M = sp.symbols("K M", positive=True)
S_THETA = sp.Symbol("s_mu", positive=True)  # population std of the thought values
Z, V, KAPPA, P = sp.symbols("z v kappa p", real=True)  # a generic thought i: z-score, v_i, kappa_i, P_ki
Z_K, V_K, KAPPA_K = sp.symbols("z_k v_k kappa_k", real=True)


def _moment_name(z_power: int, v_power: int, kappa_power: int, v: str = "v", kappa: str = "kappa") -> str:
    factors = [
        f"{name}^{power}" if power > 1 else name
        for name, power in ((v, v_power), (kappa, kappa_power), ("z", z_power))
        if power
    ]
    return "E[" + " ".join(factors) + "]"


_MOMENTS: dict[tuple[int, int, int], sp.Expr] = {
    (0, 0, 0): sp.Integer(1),
    (1, 0, 0): sp.Integer(0),
    (2, 0, 0): sp.Integer(1),
}


def moment(z_power: int, v_power: int, kappa_power: int) -> sp.Expr:
    """E_i[z^a v^b kappa^c], the mean over the K thoughts; z is the population z-score, so E[z] = 0 and
    E[z^2] = 1."""
    key = (z_power, v_power, kappa_power)
    if key not in _MOMENTS:
        _MOMENTS[key] = sp.Symbol(_moment_name(*key), real=True)
    return _MOMENTS[key]


def total_over_thoughts(expr: sp.Expr) -> sp.Expr:
    """sum_i f(i) for f a polynomial in the generic thought's (z, v, kappa, p), exactly for every K:

    sum_i f(i) = f(k) + sum_{i != k} f(i) = f(k)|_{p=1-1/K} + K * E[f|_{p=-1/K}] - f(k)|_{p=-1/K}"""
    at_k = {Z: Z_K, V: V_K, KAPPA: KAPPA_K}
    off = sp.expand(expr.subs(P, -1 / K))
    on_k = expr.subs(P, 1 - 1 / K).subs(at_k, simultaneous=True)
    mean = sum(coeff * moment(*powers) for powers, coeff in sp.Poly(off, Z, V, KAPPA).terms())
    return on_k + K * mean - off.subs(at_k, simultaneous=True)


@functools.cache
def generic_thought_variance(ddof: int) -> tuple[sp.Expr, sp.Expr]:
    """(C1, C2): Var[A_k] = C1 + C2 + O(M^-3) with v, kappa already divided by M, M^2 (i.e. V1 and V2 times
    K - ddof), in K, z_k, v_k, kappa_k, s_mu and the thought moments. y_i = z_i/sqrt(K), n = K s_mu^2."""
    root_k = sp.sqrt(K)
    v1, a, b, c = second_order_sums(
        P, Z / root_k, Z_K / root_k, V, KAPPA, K * S_THETA**2, root_k * S_THETA, K, total_over_thoughts
    )
    return sp.expand((K - ddof) * v1), sp.expand((K - ddof) * (a + b + c))


def moment_values(mu: np.ndarray, sigma2: np.ndarray, kappa3: np.ndarray, answers: float, k: int) -> dict:
    """Numbers for every symbol of `generic_thought_variance` from a concrete setting (v = sigma2/M ...)."""
    centred = mu - mu.mean()
    s_pop = np.sqrt((centred**2).mean())
    z = centred / s_pop
    v = sigma2 / answers
    kappa = kappa3 / answers**2
    values = {K: len(mu), S_THETA: s_pop, Z_K: z[k], V_K: v[k], KAPPA_K: kappa[k]}
    for a in range(5):
        for b in range(3):
            for c in range(2):
                symbol = moment(a, b, c)
                if isinstance(symbol, sp.Symbol):
                    values[symbol] = float((z**a * v**b * kappa**c).mean())
    return values


SIGMA2_K, KAPPA3_K = sp.symbols("sigma_k^2 kappa3_k", positive=True)


def answer_moment(z_power: int, sigma2_power: int, kappa3_power: int) -> sp.Expr:
    """E_i[z^a sigma^2b kappa3^c] over thoughts, in the per-answer quantities (sigma^2, kappa3 of ONE
    answer)."""
    if sigma2_power == kappa3_power == 0:
        return moment(z_power, 0, 0)
    return sp.Symbol(
        _moment_name(z_power, sigma2_power, kappa3_power, v="sigma^2", kappa="kappa3"), real=True
    )


def _per_answer(expr: sp.Expr) -> sp.Expr:
    """Write v = sigma^2/M and kappa = kappa3/M^2 (thought k and every moment), so that M appears
    explicitly."""
    subs = {V_K: SIGMA2_K / M, KAPPA_K: KAPPA3_K / M**2}
    subs.update(
        {
            symbol: answer_moment(*key) / M ** (key[1] + 2 * key[2])
            for key, symbol in _MOMENTS.items()
            if isinstance(symbol, sp.Symbol) and (key[1] or key[2])
        }
    )
    return expr.subs(subs, simultaneous=True)


def large_k_limits(ddof: int = 1) -> dict[str, sp.Expr]:
    """K -> oo with the thought moments held fixed (the thoughts are draws from one distribution):
    leading order C1           -> sigma_k^2/(M s^2)                 (claim 4)
    C2 / C1                    -> -E[sigma^2]/(M s^2)
    Pade C1^2/(C1 - C2)        -> sigma_k^2/(M s^2 + E[sigma^2])    (claim 5)."""
    c1, c2 = (_per_answer(c) for c in generic_thought_variance(ddof))
    lead = sp.simplify(sp.limit(c1, K, sp.oo))
    ratio = sp.simplify(sp.limit(c2 / c1, K, sp.oo))
    # the Pade approximant C1^2/(C1 - C2) = C1/(1 - C2/C1); both factors have finite limits
    pade = sp.simplify(lead / (1 - ratio))
    mean_sigma2 = answer_moment(0, 1, 0)
    return {
        "leading": lead,
        "ratio C2/C1": ratio,
        "pade": pade,
        "claim 4: sigma_k^2/(M s^2)": SIGMA2_K / (M * S_THETA**2),
        "claim 5: sigma_k^2/(M s^2 + E[sigma^2])": SIGMA2_K / (M * S_THETA**2 + mean_sigma2),
    }


def large_m_limits(thoughts: int = 3, ddof: int = 1) -> dict[str, sp.Expr]:
    """Claim 3 on the K-specific derivation: M * Var_lead does not depend on M (d/dM = 0), Var_lead -> 0 as
    M -> oo; and the Pade form tends to the leading order: M * Pade -> C1 * M as M -> oo."""
    expr, _, _, answers = leading_order_expression(thoughts, ddof)
    c1, c2 = (_per_answer(c) for c in generic_thought_variance(ddof))
    pade = c1**2 / (c1 - c2)
    return {
        "d/dM (M Var_lead)": sp.simplify(sp.diff(answers * expr, answers)),
        "lim Var_lead": sp.limit(expr, answers, sp.oo),
        "lim M Pade - M C1": sp.simplify(
            sp.limit(sp.expand(M * c1), M, sp.oo) - sp.limit(M * pade, M, sp.oo)
        ),
    }
