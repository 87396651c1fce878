"""GRPO-MA's advantages (grpo_ma.ma_advantages) on cases written out here: at M = 1 they are GRPO's, and
constant rewards give exact zeros and never a NaN. The property tests, on rewards hypothesis draws, are in
test_advantage_properties.py."""

import pytest
import torch

import grpo_ma as G

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("ddof", [0, 1])
def test_m1_advantages_equal_grpo(ddof):
    rewards = torch.rand(3, 8, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    thought_adv, answer_adv = G.ma_advantages(rewards, ddof=ddof)
    flat = rewards[..., 0]
    spread = flat.std(-1, correction=ddof, keepdim=True)
    grpo = (flat - flat.mean(-1, keepdim=True)) / (spread + 1e-4)  # GRPO, written out
    torch.testing.assert_close(thought_adv, grpo)
    torch.testing.assert_close(answer_adv[..., 0], grpo)


def test_constant_rewards_give_exact_zero_advantages_and_no_nan():
    # 28 copies of 6.888437030500963 have a float64 mean that differs from it by 2e-15: no residue / eps
    cases = [((2, 4, 3), value) for value in (0.0, 1.0, 0.1, -3.7, 1e30)] + [((1, 7, 4), 6.888437030500963)]
    for shape, value in cases:
        thought_adv, answer_adv = G.ma_advantages(torch.full(shape, value, dtype=torch.float64))
        assert torch.equal(thought_adv, torch.zeros(shape[:2], dtype=torch.float64))
        assert torch.equal(answer_adv, torch.zeros(shape, dtype=torch.float64))
    thought_adv, answer_adv = G.ma_advantages(torch.ones(1, 4, 3), answer_pool="thought")
    assert not thought_adv.isnan().any() and torch.equal(answer_adv, torch.zeros(1, 4, 3))
