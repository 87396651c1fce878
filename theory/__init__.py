"""Theory toolkit for GRPO-MA: how noisy is the thought advantage, and what buys it down?

theory/README.md states the claims (numbered 1-7) that these modules derive and check.

    closed_form   the delta method: the leading-order variance, a second-order finite-M formula,
                  exact enumeration for Bernoulli answers (K = 2 and small K, M), the K -> oo floors
    symbolic      sympy: the gradient of the standardized advantage against the closed form, the limits
    monte_carlo   simulated prompts through the trainer's own `grpo_ma.ma_advantages`
    gradient      claim 7: the policy gradient's signal-to-noise per token of a tree T{K}A{M}
    budget        which T{K}A{M} a token budget should buy (gradient SNR per token, or the variance)
    checks        claims 1-7 as named checks

`python -m theory` runs the checks (`--fast`: a smaller setting, for CI); `python -m theory budget --help`
answers the budget question.
"""

from theory.closed_form import (
    bernoulli_exact_variance,
    beta_thought_values,
    finite_m_variance,
    inflated_std_variance,
    leading_order_variance,
    two_thought_exact_variance,
)

__all__ = [
    "bernoulli_exact_variance",
    "beta_thought_values",
    "finite_m_variance",
    "inflated_std_variance",
    "leading_order_variance",
    "two_thought_exact_variance",
]
