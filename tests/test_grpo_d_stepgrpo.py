"""GRPO-D's dynamic KL weight and StepGRPO's step-wise rewards: each test name states its property."""

import random

import pytest
from conftest import answer_length, assert_trained, config_from_flags, read_metrics
from hypothesis import given
from hypothesis import strategies as st

import grpo_ma as G
import grpo_ma_run as R

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def dynamic_schedule(bounds, share):
    return G.Config(kl_schedule="dynamic", beta_min=bounds[0], beta_max=bounds[1], explore_share=share)


betas = st.tuples(st.floats(0, 1), st.floats(0, 1)).map(sorted)
schedules = st.builds(dynamic_schedule, betas, st.floats(0.05, 0.95))


def tiny_flags(out, *extra):
    flags = ["--thoughts", "2", "--answers", "2", "--prompts-per-step", "2", "--warmup-steps", "5"]
    return [*flags, "--eval-size", "8", "--out", str(out), *extra]


# ------------------------------------------------------------------------------------------------
# GRPO-D: beta(s)
# ------------------------------------------------------------------------------------------------
@given(schedules, st.integers(2, 10_000))
def test_dynamic_beta_hits_its_anchor_points(cfg, total):
    w = cfg.explore_share * total
    mid = (cfg.beta_min + cfg.beta_max) / 2
    assert G.kl_beta(0, total, cfg) == pytest.approx(mid)
    assert G.kl_beta(w, total, cfg) == pytest.approx(cfg.beta_min)
    assert G.kl_beta(total, total, cfg) == pytest.approx(cfg.beta_max)


@given(schedules, st.integers(2, 10_000))
def test_dynamic_beta_is_continuous_at_the_end_of_exploration(cfg, total):
    w = cfg.explore_share * total
    spread = cfg.beta_max - cfg.beta_min
    slopes = spread / 2 / w + spread / (total - w)
    delta = 1e-6
    # a jump at w survives any small delta; a continuous piecewise-linear beta moves by at most delta*slopes
    assert abs(G.kl_beta(w - delta, total, cfg) - G.kl_beta(w + delta, total, cfg)) <= delta * slopes + 1e-12


@given(schedules, st.integers(2, 2_000))
def test_dynamic_beta_stays_within_its_bounds(cfg, total):
    for step in range(total + 1):
        assert cfg.beta_min - 1e-12 <= G.kl_beta(step, total, cfg) <= cfg.beta_max + 1e-12


def test_dynamic_beta_is_linear_on_each_side_of_the_end_of_exploration():
    cfg = dynamic_schedule((0.02, 0.1), 0.25)  # t = 100: w = 25, beta_mid = 0.06
    assert G.kl_beta(10, 100, cfg) == pytest.approx(0.06 - 0.04 * 10 / 25)
    assert G.kl_beta(70, 100, cfg) == pytest.approx(0.02 + 0.08 * 45 / 75)


@given(st.floats(0, 1), st.integers(0, 500), st.integers(1, 500))
def test_constant_schedule_is_constant(beta, step, total):
    assert G.kl_beta(step, total, G.Config(beta=beta)) == beta


def test_dynamic_schedule_is_logged_every_step(tmp_path):
    flags = tiny_flags(tmp_path, "--steps", "4", "--kl-schedule", "dynamic", "--beta-min", "0.0")
    cfg = config_from_flags([*flags, "--beta-max", "0.02"])
    R.train(cfg, reward_fns=[(answer_length, 1.0)])
    assert_trained(tmp_path)
    logged = [line["beta"] for line in read_metrics(tmp_path)[1:]]
    assert logged == [pytest.approx(G.kl_beta(s, 4, cfg)) for s in range(1, 5)]
    assert len(set(logged)) == 4


# ------------------------------------------------------------------------------------------------
# StepGRPO: StepRAR and StepRVR
# ------------------------------------------------------------------------------------------------
EXAMPLE = G.Example(
    question="7+5-7+8",
    thought="1:7+5=12;2:12-7=5;</think>",
    key_steps=[["7+5=12", "5+7=12"], ["12-7=5"]],
    answer="13",
)


def steprar(thought, answer, alpha=0.1):
    return G.make_steprar(alpha)([""], [thought], [answer], [EXAMPLE])[0]


def steprvr(thought, answer):
    return G.steprvr([""], [thought], [answer], [EXAMPLE])[0]


def test_steprar_is_correctness_plus_alpha_times_matched_key_steps():
    assert steprar(EXAMPLE.thought, "<answer>13</answer>") == pytest.approx(1.1)
    assert steprar(EXAMPLE.thought, "<answer>14</answer>") == pytest.approx(0.1)
    assert steprar("1:7+5=12;2:12-7=6;</think>", "<answer>13</answer>") == pytest.approx(1.05)  # partial
    assert steprar("</think>", "<answer>13</answer>") == pytest.approx(1.0)
    assert steprar(EXAMPLE.thought, "<answer>13</answer>", alpha=0.5) == pytest.approx(1.5)


def test_steprar_accepts_any_equivalent_form_of_a_key_step():
    assert steprar("1:5+7=12;2:12-7=5;</think>", "<answer>13</answer>") == pytest.approx(1.1)


def test_key_step_match_is_case_insensitive():
    assert G.key_step_fraction("STEP A", [["step a"], ["b"]]) == 0.5


def test_steprvr_rewards_only_complete_ordered_reasoning():
    assert steprvr(EXAMPLE.thought, "<answer>13</answer>") == 1.0
    assert steprvr(EXAMPLE.thought, "<answer>99</answer>") == 1.0  # it scores the structure, not correctness


@pytest.mark.parametrize(
    "thought, answer, why",
    [
        ("2:7+5=12;1:12-7=5;</think>", "<answer>13</answer>", "steps out of order"),
        ("1:7+5=12;3:12-7=5;</think>", "<answer>13</answer>", "a step number skipped"),
        ("1:7+5=12;2:11-7=4;</think>", "<answer>13</answer>", "step 2 does not start from step 1's result"),
        ("1:7+5=12;2:12-7=5;", "<answer>13</answer>", "thought never closed"),
        ("</think>", "<answer>13</answer>", "no steps"),
        ("1:7+5=12;so 2:12-7=5;</think>", "<answer>13</answer>", "text outside the steps"),
        (EXAMPLE.thought, "<answer>13", "answer block never closed"),
        (EXAMPLE.thought, "13", "no answer block"),
    ],
)
def test_steprvr_rejects_incomplete_or_disordered_reasoning(thought, answer, why):
    assert steprvr(thought, answer) == 0.0, why


def test_reference_solutions_earn_full_step_rewards():
    rng = random.Random(0)
    for family in G.TASK_FAMILIES:
        for _ in range(50):
            e = G.make_example(rng, family)
            answer = f"<answer>{e.answer}</answer>"
            assert G.make_steprar(0.1)([""], [e.thought], [answer], [e]) == [pytest.approx(1.1)]
            assert G.steprvr([""], [e.thought], [answer], [e]) == [1.0]


def test_step_rewards_train_end_to_end(tmp_path):
    """--reward steprar,steprvr through the registry, on T4A1. The pool's key steps are the ten digits, so a
    barely warmed-up policy matches a few in each thought: the reward varies and the policy learns."""
    rng = random.Random(0)
    pool = [G.make_example(rng, "addsub") for _ in range(16)]
    for example in pool:
        example.key_steps = [[digit] for digit in "0123456789"]
    flags = tiny_flags(tmp_path, "--steps", "2", "--warmup-batch", "8", "--reward", "steprar,steprvr")
    flags += ["--thoughts", "4", "--answers", "1", "--step-alpha", "1.0"]  # the later flag wins
    summary = R.train(config_from_flags(flags), train_pool=pool)
    assert summary["steps"] == 2
    lines = read_metrics(tmp_path)[1:]
    assert all({"reward/steprar", "reward/steprvr"} <= set(line) for line in lines)
    assert all(line["zero_std_thought_frac"] < 1 for line in lines)
    assert_trained(tmp_path)
