"""Tests of theory/ (claims 1-6 in theory/README.md): the closed forms against sympy and exact enumeration,
their scaling, and Monte Carlo through the trainer's `ma_advantages` against them. Monte Carlo examples are
derandomized and bounded in number."""

import contextlib
import functools
import io
import itertools
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import sympy as sp
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from scipy import stats

from theory import budget as bd
from theory import checks
from theory import closed_form as cf
from theory import gradient as gr
from theory import symbolic as sy
from theory.__main__ import main as theory_main
from theory.monte_carlo import estimate_variance, monte_carlo_variance

REPO = Path(__file__).resolve().parents[1]

FAST = settings(max_examples=25, deadline=None)
MONTE_CARLO = settings(max_examples=4, deadline=None, derandomize=True)


@st.composite
def settings_(draw, min_thoughts=2, max_thoughts=5):
    """Thought values mu (spread apart), per-answer variances sigma^2, M and ddof."""
    thoughts = draw(st.integers(min_thoughts, max_thoughts))
    mu = np.array(draw(st.lists(st.floats(0.02, 0.98), min_size=thoughts, max_size=thoughts)))
    assume(np.ptp(mu) > 0.05)
    sigma2 = np.array(draw(st.lists(st.floats(1e-3, 0.25), min_size=thoughts, max_size=thoughts)))
    return mu, sigma2, draw(st.integers(1, 1000)), draw(st.sampled_from([0, 1]))


def leading_scale(mu, sigma2, answers, ddof):
    """The size of Var[A_k], to make absolute differences relative (for K = 2 the variance itself is 0)."""
    return sigma2.mean() / (answers * np.var(mu, ddof=ddof))


def enumerate_outcomes(mu, answers):
    """Every vector of success counts of K thoughts with M Bernoulli(mu_k) answers, and its probability:
    (x of shape (outcomes, K) with x_k = count_k / M, probabilities (outcomes,))."""
    counts = np.array(list(itertools.product(range(answers + 1), repeat=len(mu))))
    pmf = np.prod([stats.binom.pmf(counts[:, k], answers, m) for k, m in enumerate(mu)], axis=0)
    return counts / answers, pmf


def quantile_setting(thoughts):
    """The setting of `python -m theory`: Beta(1, 1) quantile thought values, Bernoulli answer variances."""
    mu = checks.thought_values(thoughts)
    return mu, cf.bernoulli_variance(mu)


# ------------------------------------------------------------------------------------------------
# closed form vs sympy
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("thoughts", [2, 3, 4])
@pytest.mark.parametrize("ddof", [0, 1])
def test_sympy_gradient_quadratic_form_equals_closed_form(thoughts, ddof):
    assert sy.leading_order_difference(thoughts, ddof) == [0] * thoughts


@FAST
@given(setting=settings_(), eps_over_spread=st.sampled_from([0.0, 0.01, 0.3, 1.0, 3.0]))
def test_closed_form_equals_sympy_gradient_with_eps_at_random_points(setting, eps_over_spread):
    """The leading order with eps in the denominator is sympy's gradient of (x_k - xbar)/(s(x) + eps) at mu,
    also where eps is as large as the spread of the thought values (there dropping eps changes the variance
    4x)."""
    mu, sigma2, answers, ddof = setting
    eps = eps_over_spread * np.std(mu, ddof=ddof)
    ours = cf.leading_order_variance(mu, sigma2, answers, ddof=ddof, eps=eps)
    theirs = sy.leading_order_function(len(mu), ddof)(mu, sigma2, answers, eps)
    assert np.abs(ours - theirs).max() <= 1e-10 * leading_scale(mu, sigma2, answers, ddof)


@FAST
@given(setting=settings_(3, 3))
def test_leading_order_jacobian_equals_sympy_gradient(setting):
    """dg_k/dx_j = (delta_jk - (1 + z_k z_j)/K)/s_mu (claim 1) is the gradient sympy takes of g_k."""
    mu, _, _, ddof = setting
    jacobian = sy.derivative_tensors(3, ddof)(mu)[0]
    assert np.allclose(cf.leading_order_jacobian(mu, ddof=ddof), jacobian, rtol=1e-10, atol=1e-12)


@FAST
@given(setting=settings_(3, 3))
def test_second_order_terms_equal_sympy_derivatives(setting):
    """The O(K) sums of `second_order_sums` equal the definitions
    sum J H kappa + 1/2 sum H^2 v v + sum J T v v."""
    mu, sigma2, answers, ddof = setting
    kappa3 = cf.bernoulli_third_cumulant(mu)
    v1, v2 = sy.second_order_from_derivatives(mu, sigma2, kappa3, answers, ddof)
    c1, c2 = cf.variance_coefficients(mu, sigma2, kappa3, ddof=ddof)
    scale = leading_scale(mu, sigma2, answers, ddof)  # a thought at an extreme of the circle has V1 = 0
    assert np.allclose(c1 / answers, v1, rtol=1e-9, atol=1e-12 * scale)
    assert np.allclose(c2 / answers**2, v2, rtol=1e-8, atol=1e-12 * scale**2)


@functools.cache
def generic_functions(ddof):
    """The symbolic (C1, C2) of a generic thought, compiled: values dict -> float."""
    return [compile_expression(expr) for expr in sy.generic_thought_variance(ddof)]


def compile_expression(expr):
    """A sympy expression as a function of a dict {symbol: number}."""
    symbols = sorted(expr.free_symbols, key=lambda x: x.name)
    compiled = sp.lambdify(symbols, expr, "math")

    def evaluate(values):
        return float(compiled(*(values[x] for x in symbols)))

    return evaluate


@FAST
@given(setting=settings_(3, 8), k=st.integers(0, 7))
def test_generic_thought_sums_equal_numpy_sums(setting, k):
    """The symbolic any-K expression, evaluated at the setting's moments, is the numpy result: the K -> oo
    limit is taken of the same function that computes the numbers."""
    mu, sigma2, answers, ddof = setting
    k = k % len(mu)
    kappa3 = cf.bernoulli_third_cumulant(mu)
    c1_sym, c2_sym = generic_functions(ddof)
    values = sy.moment_values(mu, sigma2, kappa3, answers, k)
    c1, c2 = cf.variance_coefficients(mu, sigma2, kappa3, ddof=ddof)
    scale = leading_scale(mu, sigma2, answers, ddof)
    assert np.isclose(c1_sym(values), c1[k] / answers, rtol=1e-9, atol=1e-12 * scale)
    assert np.isclose(c2_sym(values), c2[k] / answers**2, rtol=1e-7, atol=1e-10 * scale**2)


def test_large_k_limits_are_the_floors_of_claims_4_and_5():
    limits = sy.large_k_limits(1)
    assert sp.simplify(limits["leading"] - limits["claim 4: sigma_k^2/(M s^2)"]) == 0
    assert sp.simplify(limits["pade"] - limits["claim 5: sigma_k^2/(M s^2 + E[sigma^2])"]) == 0


# ------------------------------------------------------------------------------------------------
# scaling and limits, numerically
# ------------------------------------------------------------------------------------------------
@FAST
@given(setting=settings_(2, 40))
def test_leading_order_scales_exactly_as_inverse_m(setting):
    mu, sigma2, answers, ddof = setting
    one = cf.leading_order_variance(mu, sigma2, 1, ddof=ddof)
    assert np.allclose(
        cf.leading_order_variance(mu, sigma2, answers, ddof=ddof) * answers,
        one,
        rtol=1e-12,
        atol=1e-15 * leading_scale(mu, sigma2, 1, ddof),
    )


@FAST
@given(setting=settings_(3, 40))
def test_ddof_only_rescales_the_variance(setting):
    """A_k(ddof=0) = sqrt(K/(K-1)) A_k(ddof=1) for eps = 0, so Var(ddof=0) = Var(ddof=1) * K/(K-1): for all
    three formulas, at every K (the difference is largest at small K)."""
    mu, sigma2, answers, _ = setting
    thoughts = len(mu)
    for formula in (cf.leading_order_variance, cf.inflated_std_variance, cf.finite_m_variance):
        with_ddof_0 = formula(mu, sigma2, answers, ddof=0) * (thoughts - 1)
        with_ddof_1 = formula(mu, sigma2, answers, ddof=1) * thoughts
        assert np.allclose(with_ddof_0, with_ddof_1, rtol=1e-9)


@pytest.mark.parametrize("thoughts, answers", [(2, 1), (2, 5), (3, 2), (3, 4)])
@pytest.mark.parametrize("ddof", [0, 1])
def test_expected_sample_variance_equals_enumerated_mean_of_s_squared(thoughts, answers, ddof):
    """E[s(x)^2], with which the inflated-std formula replaces s_mu^2, is the mean of s(x)^2 over every
    outcome of the Bernoulli answers (small K, where ddof changes it most)."""
    mu = np.linspace(0.2, 0.7, thoughts)
    x, prob = enumerate_outcomes(mu, answers)
    enumerated = prob @ x.var(1, ddof=ddof)
    expected = cf.expected_sample_variance(mu, cf.bernoulli_variance(mu), answers, ddof=ddof)
    assert np.isclose(expected, enumerated, rtol=1e-12)


@FAST
@given(setting=settings_(3, 40), eps_over_spread=st.sampled_from([0.0, 0.1, 1.0]))
@example(setting=(np.array([0.5] * 20 + [0.25]), np.full(21, 0.25), 1, 0), eps_over_spread=0.1)
def test_finite_m_formula_tends_to_leading_order_as_m_grows(setting, eps_over_spread):
    """At large M the finite-M formula is the leading order, with eps too: where eps is as large as the
    spread, the leading order with eps is 4x smaller than without. The example is a thought alone at one of
    two values, whose linear term vanishes without eps and is created by eps."""
    mu, sigma2, _, ddof = setting
    big = 1e7
    eps = eps_over_spread * np.std(mu, ddof=ddof)
    finite = cf.finite_m_variance(mu, sigma2, big, ddof=ddof, eps=eps)
    gap = finite - cf.leading_order_variance(mu, sigma2, big, ddof=ddof, eps=eps)
    assert np.abs(gap).max() <= 1e-4 * leading_scale(mu, sigma2, big, ddof)


@pytest.mark.parametrize("thoughts", [3, 4])
@pytest.mark.parametrize("answers", [16, 32])
def test_finite_m_formula_with_large_eps_matches_exact_enumeration(thoughts, answers):
    """With eps = 0.1, a third of the spread of the thought values, the eps factor of the finite-M formula
    lowers the variance by 35-40%; with it the formula is within 4% of the exact variance for every
    thought."""
    mu, sigma2 = quantile_setting(thoughts)
    exact = cf.bernoulli_exact_variance(mu, answers, eps=0.1)
    formula = cf.finite_m_variance(mu, sigma2, answers, eps=0.1)
    assert np.abs(formula / exact - 1).max() <= 0.04


@pytest.mark.parametrize("thoughts, answer_counts", [(3, (8, 16, 32)), (4, (8, 16, 32)), (5, (8, 16))])
def test_finite_m_formula_within_stated_accuracy_of_exact_enumeration(thoughts, answer_counts):
    """theory/README.md, claim 2: for K = 3..5 and M >= 8 the finite-M formula is within 2.5/M^2 of the exact
    variance averaged over thoughts, and within 6/M^2 for each thought (no sampling noise here)."""
    mu, sigma2 = quantile_setting(thoughts)
    for answers in answer_counts:
        exact = cf.bernoulli_exact_variance(mu, answers, eps=checks.EPS)
        formula = cf.finite_m_variance(mu, sigma2, answers, eps=checks.EPS)
        assert abs(formula.mean() / exact.mean() - 1) <= checks.EXACT_MEAN_COEFFICIENT / answers**2
        assert np.abs(formula / exact - 1).max() <= checks.PER_THOUGHT_COEFFICIENT / answers**2


@pytest.mark.parametrize("ddof", [0, 1])
@pytest.mark.parametrize("eps", [0.0, 1e-4, 0.2])
def test_exact_enumeration_equals_direct_sum_over_outcomes(ddof, eps):
    """`bernoulli_exact_variance` against the definition, summed here over itertools' outcomes, and against
    the closed-form K = 2 distribution."""
    mu = np.array([0.15, 0.4, 0.45, 0.8])
    x, prob = enumerate_outcomes(mu, 3)
    centred = x - x.mean(1, keepdims=True)
    std = x.std(1, ddof=ddof, keepdims=True)
    adv = np.where(np.ptp(x, 1, keepdims=True) == 0, 0.0, centred / np.maximum(std + eps, 1e-300))
    direct = prob @ adv**2 - (prob @ adv) ** 2
    assert np.allclose(cf.bernoulli_exact_variance(mu, 3, ddof=ddof, eps=eps), direct, rtol=1e-12, atol=1e-15)
    two = np.array([0.3, 0.6])
    assert np.allclose(
        cf.bernoulli_exact_variance(two, 7, ddof=ddof, eps=eps),
        cf.two_thought_exact_variance(two, 7, ddof=ddof, eps=eps),
        rtol=1e-12,
    )


@pytest.mark.parametrize("ratio", [0.5, 2.0, 8.0])
def test_finite_m_formula_reaches_claim_5_floor_at_large_k(ratio):
    between, within = cf.beta_moments(ratio)
    mu = cf.beta_thought_values(1024, ratio)
    sigma2 = cf.bernoulli_variance(mu)
    c1, c2 = cf.variance_coefficients(mu, sigma2)
    for answers in (1, 4, 16):
        mean_var = cf.finite_m_from_coefficients(mu, sigma2, c1, c2, answers).mean()
        assert np.isclose(mean_var, within / (answers * between + within), rtol=0.01)


def test_beta_ratio_is_within_over_between_variance():
    for ratio, mean in ((0.5, 0.5), (2.0, 0.3), (6.0, 0.8)):
        mu = cf.beta_thought_values(200_000, ratio, mean, draw="random", rng=np.random.default_rng(0))
        assert np.isclose(cf.bernoulli_variance(mu).mean() / mu.var(), ratio, rtol=0.03)


# ------------------------------------------------------------------------------------------------
# Monte Carlo through grpo_ma.ma_advantages
# ------------------------------------------------------------------------------------------------
@MONTE_CARLO
@given(
    thoughts=st.integers(4, 12),
    answers=st.integers(16, 64),
    ratio=st.floats(0.5, 3.0),
    seed=st.integers(0, 2**16),
)
def test_monte_carlo_within_interval_of_finite_m_formula(thoughts, answers, ratio, seed):
    mu = cf.beta_thought_values(thoughts, ratio, draw="random", rng=np.random.default_rng(seed))
    sigma2 = cf.bernoulli_variance(mu)
    assume(sigma2.mean() / (answers * mu.var(ddof=1)) < 0.15)  # answer noise small next to the thought spread
    estimate = monte_carlo_variance(mu, answers, 40_000 // thoughts, seed=seed, level=0.999)
    formula = cf.finite_m_variance(mu, sigma2, answers, eps=1e-4).mean()
    assert abs(formula - estimate.mean) <= estimate.mean_half_width


@MONTE_CARLO
@given(thoughts=st.integers(4, 6), ratio=st.floats(0.5, 4.0), seed=st.integers(0, 2**16))
def test_monte_carlo_within_interval_of_leading_order_at_large_m(thoughts, ratio, seed):
    """The leading order is biased by ~E[sigma^2]/(M s^2), inside the interval once M is large."""
    answers = 512
    mu = cf.beta_thought_values(thoughts, ratio, draw="random", rng=np.random.default_rng(seed))
    assume(mu.var() > 0.02)
    estimate = monte_carlo_variance(mu, answers, 1500, seed=seed, level=0.999)
    formula = cf.leading_order_variance(mu, cf.bernoulli_variance(mu), answers, eps=1e-4).mean()
    assert abs(formula - estimate.mean) <= estimate.mean_half_width


@MONTE_CARLO
@given(
    mu=st.tuples(st.floats(0.05, 0.95), st.floats(0.05, 0.95)),
    answers=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_two_thought_exact_enumeration_matches_monte_carlo(mu, answers, seed):
    mu = np.array(mu)
    exact = cf.two_thought_exact_variance(mu, answers, eps=1e-4)[0]
    estimate = monte_carlo_variance(mu, answers, 40_000, seed=seed, level=0.999)
    assert abs(exact - estimate.mean) <= estimate.mean_half_width + 1e-12


@MONTE_CARLO
@given(
    thoughts=st.integers(3, 4),
    answers=st.integers(1, 6),
    ratio=st.floats(0.5, 4.0),
    seed=st.integers(0, 2**16),
)
def test_exact_enumeration_matches_monte_carlo_through_the_trainer(thoughts, answers, ratio, seed):
    """Each thought's exact variance (written out in numpy) lies in the 99.9% interval of Monte Carlo through
    `grpo_ma.ma_advantages`, at small M where ties and all-equal groups are frequent."""
    mu = cf.beta_thought_values(thoughts, ratio, draw="random", rng=np.random.default_rng(seed))
    exact = cf.bernoulli_exact_variance(mu, answers, eps=1e-4)
    estimate = monte_carlo_variance(mu, answers, 20_000, seed=seed, level=0.999)
    assert (np.abs(exact - estimate.per_thought) <= estimate.per_thought_half_width + 1e-12).all()


def test_interval_covers_a_known_variance():
    """The CLT interval of `estimate_variance` covers the true variance at about its nominal rate, on data far
    from normal (uniform: Var = 1/12, kurtosis 1.8)."""
    rng = np.random.default_rng(0)
    trials = [estimate_variance(rng.random((2000, 1)), 0.9) for _ in range(400)]
    coverage = np.mean([abs(t.mean - 1 / 12) <= t.mean_half_width for t in trials])
    assert 0.85 <= coverage <= 0.95


# ------------------------------------------------------------------------------------------------
# budget
# ------------------------------------------------------------------------------------------------
def test_token_cost_counts_each_thought_once_and_every_answer():
    assert bd.token_cost(4, 4, 200, 50) == 4 * 200 + 16 * 50
    assert bd.token_cost(16, 1, 200, 50) == 16 * (200 + 50)
    assert bd.config_name(4, 4) == "T4A4"


@FAST
@given(
    budget=st.integers(800, 20_000),
    thought_len=st.integers(10, 400),
    answer_len=st.integers(5, 200),
    ratio=st.floats(0.25, 8.0),
)
def test_variance_best_allocation_fits_and_beats_every_other_fitting_tree(
    budget, thought_len, answer_len, ratio
):
    assume(bd.token_cost(3, 1, thought_len, answer_len) <= budget)
    best = bd.best_allocation(budget, thought_len, answer_len, ratio, objective="variance", max_thoughts=64)
    assert best.tokens <= budget
    for thoughts, answers in ((3, 1), (4, 4), (8, 2), (16, 1)):
        if bd.token_cost(thoughts, answers, thought_len, answer_len) <= budget:
            assert best.variance <= bd.mean_thought_variance(thoughts, answers, ratio)


def test_budget_command_prints_a_tree():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "theory",
            "budget",
            "--budget",
            "2048",
            "--thought-len",
            "200",
            "--answer-len",
            "50",
            "--ratio",
            "1.0",
        ],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    best = bd.best_allocation(2048, 200, 50, 1.0)
    assert f"best: {best.name}" in out


def test_python_m_theory_fast_passes_every_check(capsys):
    """`python -m theory --fast`: every claim of theory/README.md, with the thresholds the README states."""
    status = theory_main(["--fast"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert "FAIL" not in out
    rows = [line for line in out.splitlines() if line.endswith("| PASS")]
    assert f"{len(rows)}/{len(rows)} checks passed" in out


@pytest.mark.slow
def test_python_m_theory_passes_every_check():
    result = subprocess.run(
        [sys.executable, "-m", "theory"], capture_output=True, text=True, timeout=300, cwd=REPO
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout


@pytest.mark.slow
def test_variance_figures_fast_mode_writes_every_file(tmp_path):
    from paper_figures import variance

    variance.main(fast=True, out_dir=tmp_path / "out", results_dir=tmp_path / "results")
    for name in ("variance_vs_m", "variance_vs_k", "budget_heatmap"):
        assert (tmp_path / "out" / f"{name}.png").stat().st_size > 0
        assert (tmp_path / "out" / f"{name}.pdf").stat().st_size > 0
    assert (tmp_path / "results" / "variance.json").stat().st_size > 0


# ------------------------------------------------------------------------------------------------
# claim 7: the gradient's signal-to-noise per token (theory/gradient.py), the planner's objective
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mean, ratio", checks.GRADIENT_SETTINGS)
def test_gradient_snr_within_stated_accuracy_of_monte_carlo(mean, ratio):
    """theory/README.md, claim 7: for distinct texts and K*M >= 16 the closed-form SNR is within
    checks.GRADIENT_TOLERANCE (8%) of Monte Carlo through `grpo_ma.ma_advantages` (plus its 99.9%
    interval), on the sweep's trees and three more."""
    for name, error, half_width in checks.gradient_snr_errors(checks.FAST, mean, ratio, gr.NO_REPEATS):
        assert abs(error) <= checks.GRADIENT_TOLERANCE + half_width, (name, error, half_width)


@pytest.mark.parametrize("mean, ratio", checks.REPEAT_SETTINGS)
def test_gradient_snr_with_repeated_texts_within_stated_accuracy(mean, ratio):
    """With repeated texts (thoughts 0.3, right answers 1, wrong answers 0.25, as measured on the embedded
    task) the closed form is within checks.REPEAT_TOLERANCE (12%) of Monte Carlo."""
    rows = checks.gradient_snr_errors(checks.FAST, mean, ratio, checks.MEASURED_REPEATS)
    for name, error, half_width in rows:
        assert abs(error) <= checks.REPEAT_TOLERANCE + half_width, (name, error, half_width)


@pytest.mark.parametrize("thoughts, answers", [(3, 2), (4, 4), (2, 9), (8, 3)])
@pytest.mark.parametrize("repeats", [gr.NO_REPEATS, gr.Repeats(0.0, 1.0, 0.3)])
def test_noise_terms_and_zero_signal_shares_are_exact(thoughts, answers, repeats):
    """N_T, N_A (answer repeats included) and the all-equal shares are exact for Beta thought values and
    Bernoulli answers: Monte Carlo (eps = 0) lies within its 99.9% interval."""
    ratio, mean = 1.5, 0.35
    sims = 60_000 // (thoughts * answers)
    estimate = gr.monte_carlo_terms(thoughts, answers, ratio, mean, sims, seed=7, repeats=repeats, eps=0.0)
    for name, exact in (
        ("thought_noise", gr.thought_noise(thoughts, answers, ratio, mean, repeats)),
        ("answer_noise", gr.answer_noise(thoughts, answers, ratio, mean, repeats)),
    ):
        assert abs(exact - estimate.values[name]) <= estimate.half_widths[name] + 1e-9, name
    rng = np.random.default_rng(1)
    mu, rewards, _, _ = gr.simulate_prompts(thoughts, answers, ratio, mean, 40_000, rng)
    values = rewards.mean(-1)
    for share, equal in (
        (gr.zero_signal_thought_share(thoughts, answers, ratio, mean), np.ptp(values, -1) == 0),
        (gr.zero_signal_answer_share(thoughts, answers, ratio, mean), np.ptp(rewards, (-2, -1)) == 0),
    ):
        half_width = 3.3 * np.sqrt(share * (1 - share) / len(equal))
        assert abs(equal.mean() - share) <= half_width + 1e-9


def test_gradient_snr_is_the_vector_gradient_in_high_dimension():
    """The scalar terms are the simulated gradient g = sum A s + sum B u in R^D: |E g|^2 = S_T^2 + S_A^2 and
    E|g - E g|^2 = D (L_t N_T + L_a N_A) + O(1) (the signal's own spread, < 1% here)."""
    thoughts, answers, ratio, mean, dim = 4, 4, 2.0, 0.3, 8
    repeats = checks.MEASURED_REPEATS
    signal, signal_se, noise, noise_se = gr.vector_monte_carlo_snr(
        thoughts, answers, 12.0, 3.0, ratio, mean, dim=dim, sims=20_000, seed=5, repeats=repeats
    )
    terms = gr.monte_carlo_terms(thoughts, answers, ratio, mean, 100_000, seed=6, repeats=repeats).values
    expected_signal = terms["thought_signal"] ** 2 + terms["answer_signal"] ** 2
    expected_noise = dim * (12.0 * terms["thought_noise"] + 3.0 * terms["answer_noise"])
    assert abs(signal - expected_signal) <= 3.3 * signal_se + 0.01 * expected_signal
    assert abs(noise - expected_noise) <= 3.3 * noise_se + 0.01 * expected_noise


@pytest.mark.parametrize("thoughts", [2, 3, 4, 8, 64])
@pytest.mark.parametrize("ratio", [0.5, 2.0])
def test_at_m1_answer_and_thought_signal_are_in_the_variance_ratio(thoughts, ratio):
    """M = 1 is GRPO: one advantage A_k on the thought and on its answer, so S_A / S_T is
    E[(R - mu) A] / E[(mu - mean) A] = E[sigma^2] / sigma_theta^2 = ratio, Jensen factors included
    (the answer term's Satterthwaite c4(nu + 1) is then c4(K), the thought term's)."""
    between, within = cf.beta_moments(ratio, 0.5)
    thought = gr.thought_signal(thoughts, 1, between, within)
    answer = gr.answer_signal(thoughts, 1, between, within)
    assert np.isclose(answer / thought, ratio, rtol=1e-12)
    estimate = gr.monte_carlo_terms(thoughts, 1, ratio, 0.5, 20_000, seed=thoughts, eps=0.0)
    measured = estimate.values["answer_signal"] / estimate.values["thought_signal"]
    assert np.isclose(measured, ratio, rtol=0.05)


def test_c4_is_the_mean_sample_std_of_normal_values():
    rng = np.random.default_rng(0)
    for size in (2, 4, 16):
        draws = rng.standard_normal((200_000, size)).std(1, ddof=1)
        assert abs(draws.mean() - gr.c4(size)) <= 4 * draws.std() / np.sqrt(len(draws))


def test_sympy_best_answers_for_the_thought_term_is_cochrans():
    root, _ = gr.best_answers_for_thought_term()
    ratio, thought_len, answer_len = sp.symbols("ratio L_t L_a", positive=True)
    assert sp.simplify(root - sp.sqrt(ratio * thought_len / answer_len)) == 0
    limit = gr.thought_term_large_k_limit()
    between, within, m = sp.symbols("s2 E M", positive=True)
    expected = between**2 * m / ((between * m + within) * thought_len * (thought_len + m * answer_len))
    assert sp.simplify(limit - expected) == 0


def test_gradient_objective_weighs_thought_samples_against_answer_samples():
    """Distinct texts: every answer is one more answer-level sample, so the gradient objective spends the
    budget on answers (K = 2, the largest M). Right answers that repeat one text (c_1 = 1, as on the
    embedded task) stop adding samples: where the thoughts carry the spread (ratio 0.2) it takes more
    thoughts than the variance objective, and at the embedded task's measured setting its best M per K lies
    inside the budget, not at the largest M."""
    distinct = bd.best_allocation(2048, 200, 50, 0.2, max_thoughts=64)
    assert (distinct.thoughts, distinct.answers) == (2, 16)
    right_repeat = gr.Repeats(0.0, 1.0, 0.0)
    repeated = bd.best_allocation(2048, 200, 50, 0.2, repeats=right_repeat, max_thoughts=64)
    variance_best = bd.best_allocation(2048, 200, 50, 0.2, objective="variance", max_thoughts=64)
    assert repeated.thoughts > variance_best.thoughts
    assert repeated.gradient.thought_share > 0.5
    rows = bd.allocations(280, 13.4, 3.4, 27.0, mean=0.175, repeats=checks.MEASURED_REPEATS, max_thoughts=16)
    per_k = {}
    for row in rows:
        per_k.setdefault(row.thoughts, row)
    largest_m = max(m for m in range(1, 100) if bd.token_cost(4, m, 13.4, 3.4) <= 280)
    assert per_k[4].answers < largest_m


@FAST
@given(
    budget=st.integers(200, 4000),
    thought_len=st.integers(5, 200),
    answer_len=st.integers(2, 60),
    ratio=st.floats(0.25, 8.0),
)
def test_gradient_best_allocation_beats_every_other_fitting_tree(budget, thought_len, answer_len, ratio):
    assume(bd.token_cost(2, 1, thought_len, answer_len) <= budget)
    best = bd.best_allocation(budget, thought_len, answer_len, ratio, max_thoughts=32)
    assert best.tokens <= budget
    for thoughts, answers in ((2, 1), (3, 2), (4, 4), (8, 2), (16, 1)):
        if bd.token_cost(thoughts, answers, thought_len, answer_len) <= budget:
            other = gr.gradient_snr(thoughts, answers, thought_len, answer_len, ratio)
            assert best.snr_per_token >= other.per_token


def theory_cli(argv):
    """`python -m theory ARGV` in this process; its printed output."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert theory_main(argv) == 0
    return buffer.getvalue()


def test_budget_command_ranks_by_the_gradient_and_says_why():
    out = theory_cli(["budget", "--budget", "280", "--thought-len", "13.4", "--answer-len", "3.4"])
    best = bd.best_allocation(280, 13.4, 3.4, 1.0)
    assert f"best: {best.name}" in out
    assert f"why {best.name}" in out and "thought values equal" in out
    old = theory_cli(
        [
            "budget",
            "--budget",
            "2048",
            "--thought-len",
            "200",
            "--answer-len",
            "50",
            "--objective",
            "variance",
        ]
    )
    assert f"best: {bd.best_allocation(2048, 200, 50, 1.0, objective='variance').name}" in old
