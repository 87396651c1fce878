"""Theory toolkit for GRPO-MA (SPEC §3): how noisy is the thought advantage, and what buys it down?

    closed_form   the delta method: the SPEC's leading-order variance, a second-order finite-M formula,
                  the exact K = 2 case, the K -> oo floors
    symbolic      sympy: the gradient of the standardized advantage against the closed form, the limits
    monte_carlo   simulated prompts through the trainer's own `grpo_ma.ma_advantages`
    budget        which T{K}A{M} minimises the thought-advantage variance for a token budget
    checks        SPEC §3 claims 1-6 as named checks

`python -m theory` runs the checks; `python -m theory budget --help` answers the budget question.
"""
from theory.closed_form import (beta_thought_values, finite_m_variance, inflated_std_variance,
                                leading_order_variance, two_thought_exact_variance)

__all__ = ["beta_thought_values", "finite_m_variance", "inflated_std_variance", "leading_order_variance",
           "two_thought_exact_variance"]
