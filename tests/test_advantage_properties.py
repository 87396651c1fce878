"""Property tests of `grpo_ma.ma_advantages` (the equations are in its docstring): each test name states the
property, hypothesis draws the rewards. Rewards have shape (P prompts, K thoughts, M answers).

Rewards are drawn from realistic ranges: 0/1 correctness, floats with 1e-8 <= |r| <= 1e6 (or 0), integer
patterns times 10^e for e in [-8, 6], and tiny spans (groups whose values differ by ~1e-8 around an offset).
Rewards beyond 1e150 are refused (their squares would overflow), and a test checks that."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import grpo_ma

EPS = 1e-4
LARGEST_REWARD = 1e6
SMALLEST_REWARD = 1e-8
FAST = settings(max_examples=60, deadline=None)


# ------------------------------------------------------------------------------------------------
# strategies
# ------------------------------------------------------------------------------------------------
@st.composite
def shapes(draw):
    """(P prompts, K thoughts, M answers)."""
    return (draw(st.integers(1, 3)), draw(st.integers(2, 6)), draw(st.integers(1, 5)))


@st.composite
def scaled_integer_rewards(draw, dtype=np.float64, exponents=(-8, 6), base=10.0):
    """Small integers times base^e: patterns with ties and constant groups at every realistic magnitude
    (base 2 keeps them exact, so sums do not depend on their order)."""
    pattern = draw(hnp.arrays(np.int64, draw(shapes()), elements=st.integers(0, 3)))
    exponent = draw(st.integers(*exponents))
    return torch.from_numpy((pattern * base**exponent).astype(dtype))


@st.composite
def bernoulli_rewards(draw):
    """0/1 correctness rewards, the trainer's usual case."""
    return torch.from_numpy(
        draw(hnp.arrays(np.int64, draw(shapes()), elements=st.integers(0, 1))).astype(float)
    )


@st.composite
def tiny_span_rewards(draw):
    """An offset in [-1, 1] plus integers times 1e-8: groups whose spread is far below eps."""
    offset = draw(st.floats(-1, 1))
    pattern = draw(hnp.arrays(np.int64, draw(shapes()), elements=st.integers(0, 3)))
    return torch.from_numpy(offset + pattern * 1e-8)


def realistic_magnitude(value: float) -> bool:
    """0, or |r| between 1e-8 and 1e6: no reward is 1e-300 (whose square would underflow to 0)."""
    return value == 0 or SMALLEST_REWARD <= abs(value) <= LARGEST_REWARD


@st.composite
def float_rewards(draw, dtype=np.float64):
    """Any floats with 1e-8 <= |r| <= 1e6 or r = 0 (hypothesis favours the ends and 0)."""
    width = 64 if dtype == np.float64 else 32
    elements = st.floats(-LARGEST_REWARD, LARGEST_REWARD, allow_nan=False, width=width).filter(
        realistic_magnitude
    )
    return torch.from_numpy(draw(hnp.arrays(dtype, draw(shapes()), elements=elements)))


def realistic_rewards():
    return st.one_of(
        bernoulli_rewards(),
        scaled_integer_rewards(),
        tiny_span_rewards(),
        float_rewards(),
        float_rewards(np.float32),
    )


def moderate_rewards():
    return hnp.arrays(np.float64, shapes(), elements=st.floats(-1e3, 1e3, allow_nan=False)).map(
        torch.from_numpy
    )


def plain_grpo(rewards: np.ndarray, ddof: int, eps: float, scale: bool = True) -> np.ndarray:
    """GRPO written out again: (r - mean r)/(std r + eps) over the last axis, exactly 0 for constant
    groups."""
    centred = rewards - rewards.mean(-1, keepdims=True)
    adv = centred / (rewards.std(-1, ddof=ddof, keepdims=True) + eps) if scale else centred
    return np.where(np.ptp(rewards, -1, keepdims=True) == 0, 0.0, adv)


def advantages(rewards, **kwargs):
    thought_adv, answer_adv = grpo_ma.ma_advantages(rewards, **kwargs)
    return thought_adv.double().numpy(), answer_adv.double().numpy()


# ------------------------------------------------------------------------------------------------
# properties
# ------------------------------------------------------------------------------------------------
@FAST
@given(rewards=realistic_rewards(), ddof=st.sampled_from([0, 1]), pool=st.sampled_from(["all", "thought"]))
def test_zero_mean(rewards, ddof, pool):
    thought_adv, answer_adv = advantages(rewards, ddof=ddof, answer_pool=pool)
    tolerance = 1e-9 if rewards.dtype == torch.float64 else 1e-5  # float32 outputs: one rounding per value
    assert np.abs(thought_adv.sum(-1)).max() <= tolerance
    pooled = answer_adv.reshape(*answer_adv.shape[:-2], -1) if pool == "all" else answer_adv
    assert np.abs(pooled.sum(-1)).max() <= tolerance


@FAST
@given(rewards=realistic_rewards(), ddof=st.sampled_from([0, 1]))
def test_unit_std_when_not_degenerate(rewards, ddof):
    """std(A) = s/(s + eps) for every group whose spread s (numpy's float64 std) is well above eps, at every
    realistic magnitude, both dtypes."""
    thought_adv, answer_adv = advantages(rewards, ddof=ddof)
    values = rewards.double().numpy()
    rtol = 1e-9 if rewards.dtype == torch.float64 else 1e-6
    groups = (
        (thought_adv, values.mean(-1)),
        (answer_adv.reshape(len(values), -1), values.reshape(len(values), -1)),
    )
    for adv, group in groups:
        if group.shape[-1] <= ddof:
            continue
        spread = group.std(-1, ddof=ddof)
        wide = spread >= 100 * EPS
        assert np.allclose(adv[wide].std(-1, ddof=ddof), (spread / (spread + EPS))[wide], rtol=rtol, atol=0)


@FAST
@given(
    rewards=st.one_of(scaled_integer_rewards(), tiny_span_rewards(), float_rewards()),
    ddof=st.sampled_from([0, 1]),
)
def test_equals_the_equation_in_float64(rewards, ddof):
    """Thought and answer advantages are (x - mean)/(std + eps) of the thought values and of all answers,
    computed here in numpy, with exact zeros for constant groups."""
    thought_adv, answer_adv = advantages(rewards, ddof=ddof)
    values = rewards.numpy()
    thought_ref = plain_grpo(values.mean(-1), ddof, EPS)
    answer_ref = plain_grpo(values.reshape(len(values), -1), ddof, EPS).reshape(values.shape)
    assert np.allclose(thought_adv, thought_ref, rtol=1e-9, atol=1e-9)
    assert np.allclose(answer_adv, answer_ref, rtol=1e-9, atol=1e-9)


@FAST
@given(
    pattern=hnp.arrays(np.int64, shapes(), elements=st.integers(0, 5)),
    log_scale=st.floats(-3, 3),
    shift=st.floats(-1e3, 1e3),
    ddof=st.sampled_from([0, 1]),
)
def test_invariant_to_positive_affine_maps(pattern, log_scale, shift, ddof):
    """A(a R + b) = A(R) for a > 0, with eps scaled to a*eps (eps is an absolute constant in the denominator).
    Tolerance: a R + b rounds to one ulp of |b| + 5a, which over a*eps is the largest change it can cause."""
    rewards = torch.from_numpy(pattern.astype(np.float64))
    scale = 10.0**log_scale
    before = advantages(rewards, ddof=ddof, eps=EPS)
    after = advantages(scale * rewards + shift, ddof=ddof, eps=EPS * scale)
    rounding = 4 * np.finfo(np.float64).eps * (abs(shift) + 5 * scale) / (EPS * scale)
    for a, b in zip(before, after):
        assert np.allclose(a, b, rtol=0, atol=1e-9 + rounding)


@FAST
@given(rewards=moderate_rewards(), seed=st.integers(0, 2**32 - 1))
def test_permuting_thoughts_permutes_advantages(rewards, seed):
    order = torch.from_numpy(np.random.default_rng(seed).permutation(rewards.shape[-2]))
    thought_adv, answer_adv = advantages(rewards)
    thought_perm, answer_perm = advantages(rewards[:, order])
    assert np.allclose(thought_perm, thought_adv[:, order], rtol=0, atol=1e-12)
    assert np.allclose(answer_perm, answer_adv[:, order], rtol=0, atol=1e-12)


@FAST
@given(rewards=moderate_rewards(), seed=st.integers(0, 2**32 - 1), pool=st.sampled_from(["all", "thought"]))
def test_permuting_answers_within_a_thought_keeps_thought_advantages(rewards, seed, pool):
    rng = np.random.default_rng(seed)
    index = torch.from_numpy(np.argsort(rng.random(rewards.shape), -1))  # one permutation per thought
    shuffled = torch.gather(rewards, -1, index)
    thought_adv, answer_adv = advantages(rewards, answer_pool=pool)
    thought_perm, answer_perm = advantages(shuffled, answer_pool=pool)
    assert np.allclose(thought_perm, thought_adv, rtol=0, atol=1e-12)
    assert np.allclose(answer_perm, np.take_along_axis(answer_adv, index.numpy(), -1), rtol=0, atol=1e-12)


@FAST
@given(
    rewards=hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 4), st.integers(2, 8)),
        elements=st.floats(-1e3, 1e3) | st.integers(0, 1).map(float),
    ),
    ddof=st.sampled_from([0, 1]),
    scale=st.booleans(),
)
def test_m1_reduces_to_grpo(rewards, ddof, scale):
    """With one answer per thought both advantages are GRPO's (the last line of `ma_advantages`'
    docstring)."""
    thought_adv, answer_adv = advantages(torch.from_numpy(rewards)[..., None], ddof=ddof, scale=scale)
    reference = plain_grpo(rewards, ddof, EPS, scale)
    assert np.allclose(thought_adv, reference, rtol=1e-9, atol=1e-12)
    assert np.allclose(answer_adv[..., 0], reference, rtol=1e-9, atol=1e-12)


@FAST
@given(
    value=st.floats(-LARGEST_REWARD, LARGEST_REWARD) | st.sampled_from([0.0, 1.0, 1e-8, -1e-300]),
    shape=shapes(),
    ddof=st.sampled_from([0, 1]),
    scale=st.booleans(),
    pool=st.sampled_from(["all", "thought"]),
)
def test_constant_groups_give_exact_zeros(value, shape, ddof, scale, pool):
    rewards = torch.full(shape, value, dtype=torch.float64)
    thought_adv, answer_adv = advantages(rewards, ddof=ddof, scale=scale, answer_pool=pool)
    assert (thought_adv == 0).all() and (answer_adv == 0).all()


@FAST
@given(
    answers=hnp.arrays(
        np.float64, st.tuples(st.integers(1, 3), st.integers(1, 5)), elements=st.floats(-1e3, 1e3)
    ),
    thoughts=st.integers(2, 5),
)
def test_identical_thoughts_give_exact_zero_thought_advantage(answers, thoughts):
    """Thoughts whose answers are the same have equal values: thought advantage exactly 0, not a residue."""
    rewards = torch.from_numpy(answers)[:, None, :].expand(-1, thoughts, -1).contiguous()
    thought_adv, _ = advantages(rewards)
    assert (thought_adv == 0).all()


@FAST
@given(
    rewards=scaled_integer_rewards(exponents=(-27, 19), base=2.0),
    ddof=st.sampled_from([0, 1]),
    scale=st.booleans(),
)
def test_higher_thought_value_gets_higher_advantage(rewards, ddof, scale):
    thought_adv, _ = advantages(rewards, ddof=ddof, scale=scale)
    values = rewards.numpy().mean(-1)
    higher = values[:, :, None] > values[:, None, :]  # [p, i, j]: thought i beats thought j
    assert (thought_adv[:, :, None] > thought_adv[:, None, :])[higher].all()


@FAST
@given(rewards=moderate_rewards(), data=st.data())
def test_prompts_in_a_batch_do_not_affect_each_other(rewards, data):
    """Each prompt's advantages are the same alone as next to any other prompts."""
    other_shape = (data.draw(st.integers(1, 3)),) + tuple(rewards.shape[1:])
    other = torch.from_numpy(data.draw(hnp.arrays(np.float64, other_shape, elements=st.floats(-1e6, 1e6))))
    alone = [advantages(rewards[i : i + 1]) for i in range(len(rewards))]
    batched = advantages(torch.cat([rewards, other]))
    for i, (thought_adv, answer_adv) in enumerate(alone):
        assert np.allclose(batched[0][i], thought_adv[0], rtol=1e-12, atol=1e-15)
        assert np.allclose(batched[1][i], answer_adv[0], rtol=1e-12, atol=1e-15)


@settings(max_examples=200, deadline=None)
@given(
    rewards=realistic_rewards(),
    pool=st.sampled_from(["all", "thought"]),
    ddof=st.sampled_from([0, 1]),
    scale=st.booleans(),
)
def test_finite_outputs_in_the_input_dtype_for_realistic_rewards(rewards, pool, ddof, scale):
    """0/1 rewards, |r| <= 1e6 in float64 and float32, 1e-8 spans: finite advantages of the rewards' dtype."""
    thought_adv, answer_adv = grpo_ma.ma_advantages(rewards, answer_pool=pool, ddof=ddof, scale=scale)
    assert torch.isfinite(thought_adv).all() and torch.isfinite(answer_adv).all()
    assert thought_adv.dtype == answer_adv.dtype == rewards.dtype


@FAST
@given(rewards=realistic_rewards(), pool=st.sampled_from(["all", "thought"]))
def test_unscaled_advantages_are_rewards_minus_group_mean(rewards, pool):
    """scale=False returns r - mean r in reward units (numpy in float64 here), exactly 0 for constant
    groups."""
    thought_adv, answer_adv = advantages(rewards, answer_pool=pool, scale=False)
    values = rewards.double().numpy()
    thought_ref = plain_grpo(values.mean(-1), 1, EPS, scale=False)
    if pool == "all":
        answer_ref = plain_grpo(values.reshape(len(values), -1), 1, EPS, scale=False).reshape(values.shape)
    else:
        answer_ref = plain_grpo(values, 1, EPS, scale=False)
    rtol = 1e-12 if rewards.dtype == torch.float64 else 1e-6
    atol = 1e-12 * max(1.0, np.abs(values).max())
    if rewards.dtype == torch.float32:  # float32 output: one rounding of each r - mean r
        atol = 1e-6 * max(1.0, np.abs(values).max())
    assert np.allclose(thought_adv, thought_ref, rtol=rtol, atol=atol)
    assert np.allclose(answer_adv, answer_ref, rtol=rtol, atol=atol)


@FAST
@given(
    rewards=st.one_of(bernoulli_rewards(), scaled_integer_rewards(), tiny_span_rewards(), float_rewards()),
    ddof=st.sampled_from([0, 1]),
)
def test_unit_std_without_eps_even_for_tiny_spans(rewards, ddof):
    """eps = 0 is allowed by the signature: a non-constant group has s > 0, so A is finite and its std is
    exactly 1, down to spreads of 1e-8; constant groups stay exactly 0."""
    thought_adv, answer_adv = advantages(rewards, ddof=ddof, eps=0.0)
    assert np.isfinite(thought_adv).all() and np.isfinite(answer_adv).all()
    values = rewards.numpy()
    thought_values = rewards.mean(-1).numpy()  # which thought values are equal is decided in the same float64
    answers_flat = answer_adv.reshape(len(values), -1)
    for adv, group in ((thought_adv, thought_values), (answers_flat, values.reshape(len(values), -1))):
        if group.shape[-1] <= ddof:
            continue
        varied = np.ptp(group, -1) > 0
        assert np.allclose(adv[varied].std(-1, ddof=ddof), 1.0, rtol=1e-6)
        assert (adv[~varied] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rewards_up_to_1e150_are_accepted_and_give_finite_advantages(dtype):
    """The largest accepted magnitude: squares of 1e150 still fit in float64, so the std is finite."""
    if dtype == torch.float32:  # float32 holds at most 3.4e38: its largest values are accepted too
        rewards = torch.tensor([[[3e38, -3e38], [1.0, 0.0]]], dtype=dtype)
    else:
        rewards = torch.tensor(
            [[[1e150, -1e150], [1.0, 0.0]], [[1e150, 1e150], [-1e150, 5e149]]], dtype=dtype
        )
    thought_adv, answer_adv = grpo_ma.ma_advantages(rewards)
    assert torch.isfinite(thought_adv).all() and torch.isfinite(answer_adv).all()


@pytest.mark.parametrize("bad_value", [1.0000001e150, -2e150, 1e200, -1.7e308])
@pytest.mark.parametrize("scale", [True, False])
def test_rewards_beyond_1e150_raise_value_error(bad_value, scale):
    rewards = torch.tensor([[[0.0, 1.0], [bad_value, 0.5]]], dtype=torch.float64)
    with pytest.raises(ValueError, match=r"1e\+?150"):
        grpo_ma.ma_advantages(rewards, scale=scale)


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.tensor([[0.0, float("nan")]])])
def test_rejects_malformed_rewards(bad):
    with pytest.raises(ValueError):
        grpo_ma.ma_advantages(bad)
