"""Property tests of `grpo_ma.ma_advantages` (SPEC §1): each test name states the property, hypothesis draws
the rewards. Rewards have shape (P prompts, K thoughts, M answers)."""
import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import grpo_ma

EPS = 1e-4
FAST = settings(max_examples=60, deadline=None)


# ------------------------------------------------------------------------------------------------
# strategies
# ------------------------------------------------------------------------------------------------
@st.composite
def shapes(draw):
    """(P prompts, K thoughts, M answers)."""
    return (draw(st.integers(1, 3)), draw(st.integers(2, 6)), draw(st.integers(1, 5)))


@st.composite
def scaled_integer_rewards(draw, dtype=np.float64, exponents=(-300, 300), base=10.0):
    """Small integers times base^e: patterns with ties and constant groups at every magnitude the dtype holds
    (base 2 keeps them exact, so sums do not depend on their order)."""
    pattern = draw(hnp.arrays(np.int64, draw(shapes()), elements=st.integers(0, 3)))
    exponent = draw(st.integers(*exponents))
    return torch.from_numpy((pattern * base ** exponent).astype(dtype))


@st.composite
def any_finite_rewards(draw):
    """Any finite floats of either dtype, including the extremes (1.8e308, subnormals) hypothesis favours."""
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    width = 64 if dtype == np.float64 else 32
    values = draw(hnp.arrays(dtype, draw(shapes()),
                             elements=st.floats(allow_nan=False, allow_infinity=False, width=width)))
    return torch.from_numpy(values)


def moderate_rewards():
    return hnp.arrays(np.float64, shapes(), elements=st.floats(-1e3, 1e3, allow_nan=False)).map(torch.from_numpy)


def robust_std(values: np.ndarray, ddof: int) -> np.ndarray:
    """std over the last axis without overflow or underflow: scale by the half range first. (..., G) -> (...,)."""
    values = values.astype(np.float64)
    mid = values.max(-1, keepdims=True) / 2 + values.min(-1, keepdims=True) / 2
    half_range = values.max(-1, keepdims=True) / 2 - values.min(-1, keepdims=True) / 2
    unit = np.where(half_range > 0, half_range, 1.0)
    return ((values - mid) / unit).std(-1, ddof=ddof) * unit[..., 0]


def plain_grpo(rewards: np.ndarray, ddof: int, eps: float, scale: bool = True) -> np.ndarray:
    """GRPO written out again: (r - mean r)/(std r + eps) over the last axis, exactly 0 for constant groups."""
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
@given(rewards=scaled_integer_rewards(), ddof=st.sampled_from([0, 1]), pool=st.sampled_from(["all", "thought"]))
def test_zero_mean(rewards, ddof, pool):
    thought_adv, answer_adv = advantages(rewards, ddof=ddof, answer_pool=pool)
    assert np.abs(thought_adv.sum(-1)).max() <= 1e-9
    pooled = answer_adv.reshape(*answer_adv.shape[:-2], -1) if pool == "all" else answer_adv
    assert np.abs(pooled.sum(-1)).max() <= 1e-9


@FAST
@given(rewards=st.one_of(scaled_integer_rewards(), scaled_integer_rewards(np.float32, (-30, 38))),
       ddof=st.sampled_from([0, 1]))
def test_unit_std_when_not_degenerate(rewards, ddof):
    """std(A) = s/(s + eps) for every group, so ~1 when the spread s >> eps, at any magnitude the dtype holds
    (float64 up to ~1e300, float32 up to ~1e37)."""
    thought_adv, answer_adv = advantages(rewards, ddof=ddof)
    values = rewards.double().numpy()
    for adv, group in ((thought_adv, values.mean(-1)), (answer_adv.reshape(len(values), -1),
                                                        values.reshape(len(values), -1))):
        spread = robust_std(group, ddof)
        wide = spread >= 100 * EPS
        assert np.allclose(adv[wide].std(-1, ddof=ddof), (spread / (spread + EPS))[wide], rtol=1e-6, atol=0)


@FAST
@given(pattern=hnp.arrays(np.int64, shapes(), elements=st.integers(0, 5)), log_scale=st.floats(-3, 3),
       shift=st.floats(-1e3, 1e3), ddof=st.sampled_from([0, 1]))
def test_invariant_to_positive_affine_maps(pattern, log_scale, shift, ddof):
    """A(a R + b) = A(R) for a > 0, with eps scaled to a*eps (eps is an absolute constant in the denominator).
    Tolerance: a R + b rounds to one ulp of |b| + 5a, which over a*eps is the largest change it can cause."""
    rewards, scale = torch.from_numpy(pattern.astype(np.float64)), 10.0 ** log_scale
    before = advantages(rewards, ddof=ddof, eps=EPS)
    after = advantages(scale * rewards + shift, ddof=ddof, eps=EPS * scale)
    rounding = 4 * np.finfo(np.float64).eps * (abs(shift) + 5 * scale) / (EPS * scale)
    for a, b in zip(before, after):
        assert np.allclose(a, b, rtol=0, atol=1e-9 + rounding)


@FAST
@given(rewards=moderate_rewards(), seed=st.integers(0, 2 ** 32 - 1))
def test_permuting_thoughts_permutes_advantages(rewards, seed):
    order = torch.from_numpy(np.random.default_rng(seed).permutation(rewards.shape[-2]))
    thought_adv, answer_adv = advantages(rewards)
    thought_perm, answer_perm = advantages(rewards[:, order])
    assert np.allclose(thought_perm, thought_adv[:, order], rtol=0, atol=1e-12)
    assert np.allclose(answer_perm, answer_adv[:, order], rtol=0, atol=1e-12)


@FAST
@given(rewards=moderate_rewards(), seed=st.integers(0, 2 ** 32 - 1), pool=st.sampled_from(["all", "thought"]))
def test_permuting_answers_within_a_thought_keeps_thought_advantages(rewards, seed, pool):
    rng = np.random.default_rng(seed)
    index = torch.from_numpy(np.argsort(rng.random(rewards.shape), -1))     # one permutation per thought
    shuffled = torch.gather(rewards, -1, index)
    thought_adv, answer_adv = advantages(rewards, answer_pool=pool)
    thought_perm, answer_perm = advantages(shuffled, answer_pool=pool)
    assert np.allclose(thought_perm, thought_adv, rtol=0, atol=1e-12)
    assert np.allclose(answer_perm, np.take_along_axis(answer_adv, index.numpy(), -1), rtol=0, atol=1e-12)


@FAST
@given(rewards=hnp.arrays(np.float64, st.tuples(st.integers(1, 4), st.integers(2, 8)),
                          elements=st.floats(-1e3, 1e3) | st.integers(0, 1).map(float)),
       ddof=st.sampled_from([0, 1]), scale=st.booleans())
def test_m1_reduces_to_grpo(rewards, ddof, scale):
    """With one answer per thought both advantages are GRPO's (SPEC §1)."""
    thought_adv, answer_adv = advantages(torch.from_numpy(rewards)[..., None], ddof=ddof, scale=scale)
    reference = plain_grpo(rewards, ddof, EPS, scale)
    assert np.allclose(thought_adv, reference, rtol=1e-9, atol=1e-12)
    assert np.allclose(answer_adv[..., 0], reference, rtol=1e-9, atol=1e-12)


@FAST
@given(value=st.floats(allow_nan=False, allow_infinity=False), shape=shapes(), ddof=st.sampled_from([0, 1]),
       scale=st.booleans(), pool=st.sampled_from(["all", "thought"]))
def test_constant_groups_give_exact_zeros(value, shape, ddof, scale, pool):
    thought_adv, answer_adv = advantages(torch.full(shape, value, dtype=torch.float64), ddof=ddof, scale=scale,
                                         answer_pool=pool)
    assert (thought_adv == 0).all() and (answer_adv == 0).all()


@FAST
@given(answers=hnp.arrays(np.float64, st.tuples(st.integers(1, 3), st.integers(1, 5)), elements=st.floats(-1e3, 1e3)),
       thoughts=st.integers(2, 5))
def test_identical_thoughts_give_exact_zero_thought_advantage(answers, thoughts):
    """Thoughts whose answers are the same have equal values: thought advantage exactly 0, not a residue."""
    rewards = torch.from_numpy(answers)[:, None, :].expand(-1, thoughts, -1).contiguous()
    thought_adv, _ = advantages(rewards)
    assert (thought_adv == 0).all()


@FAST
@given(rewards=scaled_integer_rewards(exponents=(-20, 20), base=2.0), ddof=st.sampled_from([0, 1]),
       scale=st.booleans())
def test_higher_thought_value_gets_higher_advantage(rewards, ddof, scale):
    thought_adv, _ = advantages(rewards, ddof=ddof, scale=scale)
    values = rewards.numpy().mean(-1)
    higher = values[:, :, None] > values[:, None, :]          # [p, i, j]: thought i beats thought j
    assert (thought_adv[:, :, None] > thought_adv[:, None, :])[higher].all()


@FAST
@given(rewards=moderate_rewards(), data=st.data())
def test_prompts_in_a_batch_do_not_affect_each_other(rewards, data):
    """Each prompt's advantages are the same alone as next to any other prompts."""
    other_shape = (data.draw(st.integers(1, 3)),) + tuple(rewards.shape[1:])
    other = torch.from_numpy(data.draw(hnp.arrays(np.float64, other_shape, elements=st.floats(-1e6, 1e6))))
    alone = [advantages(rewards[i:i + 1]) for i in range(len(rewards))]
    batched = advantages(torch.cat([rewards, other]))
    for i, (thought_adv, answer_adv) in enumerate(alone):
        assert np.allclose(batched[0][i], thought_adv[0], rtol=1e-12, atol=1e-15)
        assert np.allclose(batched[1][i], answer_adv[0], rtol=1e-12, atol=1e-15)


@settings(max_examples=200, deadline=None)
@given(rewards=st.one_of(any_finite_rewards(), scaled_integer_rewards(exponents=(-323, 307)),
                         scaled_integer_rewards(np.float32, (-45, 38))),
       pool=st.sampled_from(["all", "thought"]), ddof=st.sampled_from([0, 1]))
def test_finite_outputs_for_any_finite_input(rewards, pool, ddof):
    """float64 up to 1.8e308 and down to subnormals, float32 up to 3.4e38: the advantages are finite."""
    thought_adv, answer_adv = grpo_ma.ma_advantages(rewards, answer_pool=pool, ddof=ddof)
    assert torch.isfinite(thought_adv).all() and torch.isfinite(answer_adv).all()
    assert thought_adv.dtype == answer_adv.dtype == rewards.dtype


@FAST
@given(rewards=any_finite_rewards(), pool=st.sampled_from(["all", "thought"]))
def test_finite_centred_outputs_when_representable(rewards, pool):
    """scale=False returns r - mean r in reward units; it is representable when |r| <= max/2, so it must be finite."""
    assume(rewards.abs().max() <= torch.finfo(rewards.dtype).max / 2)
    thought_adv, answer_adv = grpo_ma.ma_advantages(rewards, answer_pool=pool, scale=False)
    assert torch.isfinite(thought_adv).all() and torch.isfinite(answer_adv).all()


@FAST
@given(rewards=scaled_integer_rewards(exponents=(-320, 300)), ddof=st.sampled_from([0, 1]))
def test_finite_outputs_without_eps(rewards, ddof):
    """eps = 0 is allowed by the signature: a non-constant group has s > 0, so A must stay finite even when the
    squares of tiny values underflow."""
    thought_adv, answer_adv = grpo_ma.ma_advantages(rewards, ddof=ddof, eps=0.0)
    assert torch.isfinite(thought_adv).all() and torch.isfinite(answer_adv).all()


@pytest.mark.parametrize("bad", [torch.zeros(3), torch.tensor([[0.0, float("nan")]])])
def test_rejects_malformed_rewards(bad):
    with pytest.raises(ValueError):
        grpo_ma.ma_advantages(bad)
