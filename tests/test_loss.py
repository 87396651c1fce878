"""The loss of a step, piece by piece, against values computed here: the log-probs it scores (log softmax of
the logits over the temperature, at the next token), the k3 KL and beta, the clipped surrogate and its clip
counts, the loss weights of every aggregation over the whole step whatever the micro-batch, the advantage each
token carries, a forced </think> that is context and never trained, the loss at M = 1 that is GRPO's, and a
thought's gradient that does not grow with M.

Each test states a property of what is right, with numbers written out or computed independently here, so a
one-line slip in grpo_ma (a missing temperature, a shifted target, a flipped sign, swapped clip bounds, a
weight normalised per micro-batch) turns it red. The whole tree update against the flat one-row-per-answer
computation is in test_tree_update.py."""

import math
import random

import pytest
import torch
from conftest import digit_tree, ragged_tree

import grpo_ma as G

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TEMPERATURE = 1.7


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(1)
    return G.build_embedded_model(tokenizer).eval()


def whole_batch(tree, thought_adv, answer_adv, how="token"):
    weights = G.loss_weights(tree, how)
    return G.build_tree_batch(tree, tree.thought_slots(), thought_adv, answer_adv, weights, 0, "cpu")


# ------------------------------------------------------------------------------------------------
# log-probs: log softmax(logits / T) at the NEXT token
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [0.5, TEMPERATURE])
def test_selected_logprobs_are_log_softmax_of_logits_over_temperature(temperature):
    gen = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(23, 9, generator=gen)
    targets = torch.randint(0, 9, (23,), generator=gen)
    expected = []
    for row, target in zip(logits.tolist(), targets.tolist()):
        scaled = [value / temperature for value in row]
        top = max(scaled)
        expected.append(scaled[target] - top - math.log(sum(math.exp(v - top) for v in scaled)))
    head = torch.nn.Linear(9, 9, bias=False)  # the identity: the rows are the logits
    torch.nn.init.eye_(head.weight)
    got = G.selected_logprobs(logits, head, targets, temperature, chunk=4)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=0, atol=1e-5)


def test_tree_logprobs_score_each_counted_token_from_the_position_before(tokenizer, model):
    """Every counted token t of a full row prompt + thought + close + answer is scored by
    log_softmax(logits[t - 1] / T)[token t]: thought tokens once, then every answer's tokens."""
    tree = ragged_tree(tokenizer, 2, 3, 2, seed=4)
    zeros = torch.zeros(2, 3, 2)
    batch = whole_batch(tree, zeros[..., 0], zeros, "token")
    expected_thoughts, expected_answers = [], []
    with torch.no_grad():
        got = G.tree_logprobs(model, batch, TEMPERATURE)
        for p, k in tree.thought_slots():
            context = tree.prompt_ids[p] + tree.thought_ids[p][k] + tree.forced_close[p][k]
            start = len(tree.prompt_ids[p])
            for m, answer in enumerate(tree.answer_ids[p][k]):
                row = context + answer
                logits = model(input_ids=torch.tensor([row])).logits[0]
                scored = torch.log_softmax(logits / TEMPERATURE, -1)
                if m == 0:
                    thought = range(start, start + len(tree.thought_ids[p][k]))
                    expected_thoughts += [scored[t - 1, row[t]].item() for t in thought]
                expected_answers += [scored[t - 1, row[t]].item() for t in range(len(context), len(row))]
    torch.testing.assert_close(got, torch.tensor(expected_thoughts + expected_answers), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# the k3 KL and beta
# ------------------------------------------------------------------------------------------------
def test_k3_kl_has_the_value_of_schulmans_estimator():
    # policy 1/2, reference 1/4: r = ref / pi = 1/2, k3 = r - log r - 1 = log 2 - 1/2
    got = G.k3_kl(torch.log(torch.tensor([0.5])), torch.log(torch.tensor([0.25])))
    torch.testing.assert_close(got, torch.tensor([math.log(2) - 0.5]))
    # policy 1/4, reference 1/2: r = 2, k3 = 1 - log 2
    got = G.k3_kl(torch.log(torch.tensor([0.25])), torch.log(torch.tensor([0.5])))
    torch.testing.assert_close(got, torch.tensor([1 - math.log(2)]))


def test_k3_kl_averaged_over_the_policy_is_the_kl_from_policy_to_reference():
    policy = torch.tensor([0.5, 0.25, 0.125, 0.125], dtype=torch.float64)
    reference = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    expected = sum(p * math.log(p / q) for p, q in zip(policy.tolist(), reference.tolist()))
    estimate = (policy * G.k3_kl(policy.log(), reference.log())).sum()  # E_{y ~ policy}[k3(y)], exactly
    assert estimate.item() == pytest.approx(expected, rel=1e-12)
    assert (G.k3_kl(policy.log(), reference.log()) >= 0).all()


def test_kl_is_zero_when_policy_equals_reference(tokenizer, tiny_model):
    tree = digit_tree(tokenizer, 2, 2, 2, seed=5)
    zeros = torch.zeros(2, 2, 2)
    weights = G.loss_weights(tree, "token")
    batch = G.build_tree_batch(tree, tree.thought_slots(), zeros[..., 0], zeros, weights, 0, "cpu")
    with torch.no_grad():
        logps = G.tree_logprobs(tiny_model, batch, 1.0)
    assert torch.equal(G.k3_kl(logps, logps.clone()), torch.zeros_like(logps))
    moved = logps + 0.3 * torch.randn(logps.shape, generator=torch.Generator().manual_seed(0))
    assert (G.k3_kl(logps, moved) > 0).all()  # and positive otherwise


@pytest.mark.parametrize("bias_correction", [False, True])
def test_loss_kl_term_is_beta_times_the_weighted_kl(bias_correction):
    gen = torch.Generator().manual_seed(2)
    logps = -torch.rand(12, generator=gen) - 0.1
    old = logps + 0.1 * torch.randn(12, generator=gen)
    ref = logps + 0.5 * torch.randn(12, generator=gen)
    weights = torch.rand(12, generator=gen)
    zero = torch.zeros(12)  # no advantage: the surrogate is 0, the loss is the KL term alone
    delta = (ref - logps).double()
    kl = torch.exp(delta) - delta - 1
    ratio = torch.exp(logps - old).double()
    per_token = ratio * kl if bias_correction else kl
    cfg = G.Config(kl_bias_correction=bias_correction)
    for beta in (0.0, 0.04, 0.5):
        loss, sums = G.grpo_ma_loss(logps, old, ref, zero, weights, beta, cfg)
        assert loss.item() == pytest.approx(
            beta * (weights.double() * per_token).sum().item(), rel=1e-5, abs=1e-9
        )
        assert sums["kl"] == pytest.approx(kl.sum().item(), rel=1e-5)


def test_loss_without_reference_has_no_kl_term():
    logps = torch.tensor([-1.0, -2.0])
    advantages = torch.tensor([1.0, -0.5])
    loss, sums = G.grpo_ma_loss(logps, logps, None, advantages, torch.tensor([0.5, 0.5]), 0.3, G.Config())
    assert loss.item() == pytest.approx(-0.5 * 1.0 + 0.5 * 0.5)
    assert sums["kl"] == 0.0


# ------------------------------------------------------------------------------------------------
# the clipped surrogate
# ------------------------------------------------------------------------------------------------
def test_on_policy_ratio_is_exactly_one():
    logps = torch.randn(28, requires_grad=True)
    advantages = torch.randn(28)
    ratio = torch.exp(logps - logps.detach())
    assert torch.equal(ratio, torch.ones_like(ratio))
    per_token = G.clipped_surrogate(logps, logps.detach(), advantages, 0.2, 0.2)
    assert torch.equal(per_token, -advantages)
    per_token.sum().backward()
    assert torch.equal(logps.grad, -advantages)  # the policy gradient: d(-rho A)/d logp = -A at rho = 1


def test_clipping_stops_the_gradient_only_beyond_the_trust_region():
    old = torch.zeros(4)
    logps = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5])).requires_grad_()  # ratio 1.5, 0.5, 1.5, 0.5
    advantages = torch.tensor([1.0, -1.0, -1.0, 1.0])
    G.clipped_surrogate(logps, old, advantages, 0.2, 0.2).sum().backward()
    # ratio above 1+eps with A>0 and below 1-eps with A<0: clipped, no gradient
    assert logps.grad[0] == 0 and logps.grad[1] == 0
    # moving the wrong way is never clipped: the gradient still pulls back
    assert logps.grad[2] != 0 and logps.grad[3] != 0


def test_clip_higher_widens_only_the_upper_bound():
    old, advantages = torch.zeros(2), torch.tensor([1.0, -1.0])
    logps = torch.log(torch.tensor([1.25, 0.75])).requires_grad_()
    G.clipped_surrogate(logps, old, advantages, 0.2, 0.28).sum().backward()
    assert logps.grad[0] != 0  # 1.25 < 1.28: still inside with clip-higher
    assert logps.grad[1] == 0  # 0.75 < 0.8: the lower bound did not move


# written out with eps_low = 0.1 and eps_high = 0.3: the ratio is kept within [0.9, 1.3]
SURROGATE = [  # (ratio, advantage, -min(ratio * A, clip(ratio, 0.9, 1.3) * A), outside, clip binds)
    (1.5, 1.0, -1.3, True, True),
    (1.2, 1.0, -1.2, False, False),  # above 1 + eps_low, still inside 1 + eps_high
    (0.5, 1.0, -0.5, True, False),  # the unclipped term is the smaller one
    (0.85, -1.0, 0.9, True, True),
    (0.5, -1.0, 0.9, True, True),
    (1.5, -1.0, 1.5, True, False),
    (1.0, 2.0, -2.0, False, False),
    (0.95, -2.0, 1.9, False, False),
]


def test_clipped_surrogate_has_the_written_out_values():
    ratios, advantages, expected = (torch.tensor([row[i] for row in SURROGATE]) for i in range(3))
    old = torch.zeros(len(SURROGATE))
    got = G.clipped_surrogate(ratios.log(), old, advantages, 0.1, 0.3)
    torch.testing.assert_close(got, expected)


def test_clip_counts_name_ratios_outside_the_range_and_those_where_the_clip_binds():
    ratios, advantages = (torch.tensor([row[i] for row in SURROGATE]) for i in range(2))
    cfg = G.Config(epsilon=0.1, epsilon_high=0.3)
    weights = torch.ones(len(SURROGATE))
    _, sums = G.grpo_ma_loss(ratios.log(), torch.zeros(len(SURROGATE)), None, advantages, weights, 0.0, cfg)
    assert sums["clip_frac"] == sum(row[3] for row in SURROGATE)
    assert sums["clip_ratio"] == sum(row[4] for row in SURROGATE)
    assert sums["tokens"] == len(SURROGATE)


def test_loss_clips_with_epsilon_below_and_epsilon_high_above():
    ratios, advantages, expected = (torch.tensor([row[i] for row in SURROGATE]) for i in range(3))
    cfg = G.Config(epsilon=0.1, epsilon_high=0.3)
    weights = torch.full((len(SURROGATE),), 0.5)
    loss, _ = G.grpo_ma_loss(ratios.log(), torch.zeros(len(SURROGATE)), None, advantages, weights, 0.0, cfg)
    assert loss.item() == pytest.approx(0.5 * expected.sum().item(), rel=1e-6)


def test_clipped_surrogate_gradient_is_zero_exactly_where_the_clip_binds():
    ratios, advantages = (torch.tensor([row[i] for row in SURROGATE]) for i in range(2))
    logps = ratios.log().requires_grad_()
    G.clipped_surrogate(logps, torch.zeros(len(SURROGATE)), advantages, 0.1, 0.3).sum().backward()
    for (ratio, advantage, _, _, binds), grad in zip(SURROGATE, logps.grad.tolist()):
        assert grad == (0.0 if binds else pytest.approx(-ratio * advantage, rel=1e-5)), (ratio, advantage)


# ------------------------------------------------------------------------------------------------
# loss weights: the aggregation, over the whole step whatever the micro-batch
# ------------------------------------------------------------------------------------------------
def per_token_values(tree, seed=3):
    """A loss value for every token of every thought [P][K] and every answer [P][K][M]."""
    rng = random.Random(seed)
    thoughts = [[[rng.uniform(-2, 2) for _ in ids] for ids in by_p] for by_p in tree.thought_ids]
    answers = [
        [[[rng.uniform(-2, 2) for _ in ids] for ids in by_k] for by_k in by_p] for by_p in tree.answer_ids
    ]
    return thoughts, answers


def in_batch_order(tree, slots, thoughts, answers):
    """The per-token values in TreeBatch order: every thought of the slots row by row, then every answer."""
    values = [v for p, k in slots for v in thoughts[p][k]]
    return values + [v for p, k in slots for values_m in answers[p][k] for v in values_m]


def weighted_sum(tree, how, thoughts, answers, micro_batch, counted=None, max_length=1):
    weights = G.loss_weights(tree, how, counted, max_length)
    shape = (len(tree.thought_ids), len(tree.thought_ids[0]), len(tree.answer_ids[0][0]))
    zeros = torch.zeros(shape)
    total = 0.0
    slots = tree.thought_slots()
    for part in G.group_rows(slots, micro_batch or len(slots)):
        batch = G.build_tree_batch(tree, part, zeros[..., 0], zeros, weights, 0, "cpu")
        values = torch.tensor(in_batch_order(tree, part, thoughts, answers), dtype=torch.float64)
        assert len(values) == len(batch.weights)
        total += (batch.weights.double() * values).sum().item()
    return total


@pytest.mark.parametrize("micro_batch", [1, 4, 0])
def test_token_weights_give_the_mean_over_every_counted_token_of_the_step(tokenizer, micro_batch):
    tree = ragged_tree(tokenizer, 2, 3, 2)
    thoughts, answers = per_token_values(tree)
    values = [v for by_p in thoughts for by_k in by_p for v in by_k]
    values += [v for by_p in answers for by_k in by_p for by_m in by_k for v in by_m]
    expected = sum(values) / len(values)
    assert weighted_sum(tree, "token", thoughts, answers, micro_batch) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("micro_batch", [1, 4, 0])
def test_sequence_weights_give_mean_of_thought_means_plus_mean_of_answer_means(tokenizer, micro_batch):
    tree = ragged_tree(tokenizer, 2, 3, 2)
    thoughts, answers = per_token_values(tree)
    thought_means = [sum(v) / len(v) for by_p in thoughts for v in by_p if v]  # an empty thought has no mean
    answer_means = [sum(v) / len(v) for by_p in answers for by_k in by_p for v in by_k]
    expected = sum(thought_means) / len(thought_means) + sum(answer_means) / len(answer_means)
    assert weighted_sum(tree, "sequence", thoughts, answers, micro_batch) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("micro_batch", [1, 0])
def test_grpo_weights_at_m1_give_the_mean_of_each_completions_token_mean(tokenizer, micro_batch):
    """TRL's "grpo" loss: each completion (thought + answer) is a sequence; the mean of their token means."""
    tree = ragged_tree(tokenizer, 2, 3, 1, seed=7)
    thoughts, answers = per_token_values(tree)
    means = [
        (sum(thoughts[p][k]) + sum(answers[p][k][0])) / (len(thoughts[p][k]) + len(answers[p][k][0]))
        for p, k in tree.thought_slots()
    ]
    expected = sum(means) / len(means)
    assert weighted_sum(tree, "grpo", thoughts, answers, micro_batch) == pytest.approx(expected, rel=1e-6)


def test_grpo_weights_split_each_thoughts_share_among_its_paths(tokenizer):
    """With M answers, path m of thought k is the sequence thought + answer m, weighing 1 / (N * its length);
    the thought's tokens, counted once, carry 1 / M of each path's weight."""
    tree = ragged_tree(tokenizer, 2, 3, 2, seed=8)
    thoughts, answers = per_token_values(tree)
    n = len(tree.answer_slots())
    expected = 0.0
    for p, k, m in tree.answer_slots():
        length = len(thoughts[p][k]) + len(answers[p][k][m])
        expected += (sum(answers[p][k][m]) + sum(thoughts[p][k]) / 2) / (n * length)
    assert weighted_sum(tree, "grpo", thoughts, answers, 0) == pytest.approx(expected, rel=1e-6)


def test_dr_grpo_weights_divide_the_token_sum_by_answers_times_the_longest_possible_path(tokenizer):
    tree = ragged_tree(tokenizer, 2, 3, 2, seed=9)
    thoughts, answers = per_token_values(tree)
    values = [v for by_p in thoughts for by_k in by_p for v in by_k]
    values += [v for by_p in answers for by_k in by_p for by_m in by_k for v in by_m]
    expected = sum(values) / (len(tree.answer_slots()) * 50)
    got = weighted_sum(tree, "dr_grpo", thoughts, answers, 1, max_length=50)
    assert got == pytest.approx(expected, rel=1e-6)


COUNTED = [[[True, False], [False, False], [True, True]], [[False, True], [True, True], [True, False]]]


def test_masked_answers_leave_the_token_mean(tokenizer):
    tree = ragged_tree(tokenizer, 2, 3, 2)
    thoughts, answers = per_token_values(tree)
    values = [v for by_p in thoughts for by_k in by_p for v in by_k]
    values += [v for p, k, m in tree.answer_slots() if COUNTED[p][k][m] for v in answers[p][k][m]]
    expected = sum(values) / len(values)
    got = weighted_sum(tree, "token", thoughts, answers, 1, counted=COUNTED)
    assert got == pytest.approx(expected, rel=1e-6)


def test_masked_answers_leave_the_mean_of_answer_means(tokenizer):
    tree = ragged_tree(tokenizer, 2, 3, 2)
    thoughts, answers = per_token_values(tree)
    thought_means = [sum(v) / len(v) for by_p in thoughts for v in by_p if v]
    kept = [answers[p][k][m] for p, k, m in tree.answer_slots() if COUNTED[p][k][m]]
    expected = sum(thought_means) / len(thought_means) + sum(sum(v) / len(v) for v in kept) / len(kept)
    got = weighted_sum(tree, "sequence", thoughts, answers, 0, counted=COUNTED)
    assert got == pytest.approx(expected, rel=1e-6)


def test_masked_answers_leave_their_paths_out_of_the_grpo_mean(tokenizer):
    """grpo with --mask-truncated: a masked answer's path weighs nothing, the N in 1 / (N * length) counts
    only the paths kept, and the thought still carries 1 / M of each of its kept paths' weight."""
    tree = ragged_tree(tokenizer, 2, 3, 2, seed=8)
    thoughts, answers = per_token_values(tree)
    kept = [(p, k, m) for p, k, m in tree.answer_slots() if COUNTED[p][k][m]]
    expected = 0.0
    for p, k, m in kept:
        length = len(thoughts[p][k]) + len(answers[p][k][m])
        expected += (sum(answers[p][k][m]) + sum(thoughts[p][k]) / 2) / (len(kept) * length)
    got = weighted_sum(tree, "grpo", thoughts, answers, 0, counted=COUNTED)
    assert got == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("bias_correction", [False, True])
def test_kl_term_gradient_is_the_derivative_of_its_estimator(bias_correction):
    """d/dlogp of beta * KL_t, KL_t = exp(d) - d - 1 with d = ref - logp: beta * (1 - exp(d)); times the
    ratio rho = exp(logp - old) with the bias correction, whose product rule adds beta * rho * KL_t. (Zero
    advantages leave the surrogate without gradient.)"""
    cfg = G.Config(kl_bias_correction=bias_correction)
    logps = torch.tensor([-1.0, -2.0, -0.5, -3.0], requires_grad=True)
    old = torch.tensor([-1.2, -1.5, -0.5, -2.0])
    ref = torch.tensor([-0.7, -2.5, -1.0, -3.0])
    weights = torch.tensor([0.1, 0.2, 0.3, 0.4])
    loss, _ = G.grpo_ma_loss(logps, old, ref, torch.zeros(4), weights, 0.5, cfg)
    loss.backward()
    d = ref - logps.detach()
    kl = torch.exp(d) - d - 1
    expected = 0.5 * (1 - torch.exp(d))
    if bias_correction:
        rho = torch.exp(logps.detach() - old)
        expected = rho * expected + 0.5 * rho * kl
    torch.testing.assert_close(logps.grad, weights * expected)


# ------------------------------------------------------------------------------------------------
# which tokens are trained, and on which advantage
# ------------------------------------------------------------------------------------------------
def test_thought_tokens_carry_the_thought_advantage_and_answer_tokens_their_own(tokenizer):
    tree = ragged_tree(tokenizer, 2, 3, 2, seed=6)
    thought_adv = torch.tensor([[10.0 * p + k for k in range(3)] for p in range(2)])
    answer_adv = torch.tensor(
        [[[-(100.0 * p + 10 * k + m) - 1 for m in range(2)] for k in range(3)] for p in range(2)]
    )
    slots = [(1, 2), (0, 0), (1, 0)]  # a micro-batch, out of order
    weights = G.loss_weights(tree, "token")
    batch = G.build_tree_batch(tree, slots, thought_adv, answer_adv, weights, 0, "cpu")
    expected = [10.0 * p + k for p, k in slots for _ in tree.thought_ids[p][k]]
    expected += [
        -(100.0 * p + 10 * k + m) - 1 for p, k in slots for m in range(2) for _ in tree.answer_ids[p][k][m]
    ]
    assert batch.advantages.tolist() == expected


def test_forced_think_close_is_context_not_trained(tokenizer, tiny_model):
    close = tokenizer.encode(G.THINK_CLOSE, add_special_tokens=False)
    forced, closed = {(0, 0), (1, 1)}, {(0, 1)}
    tree = digit_tree(tokenizer, 2, 2, 2, forced=forced, closed=closed)
    ones = torch.ones(2, 2, 2)
    weights = G.loss_weights(tree, "token")
    slots = tree.thought_slots()
    batch = G.build_tree_batch(tree, slots, ones[..., 0], ones, weights, tokenizer.pad_token_id, "cpu")
    # the counted thought tokens are exactly the sampled thoughts, a sampled </think> included
    counted = [batch.thought_ids[row][batch.thought_scored[row]].tolist() for row in range(len(slots))]
    assert counted == [tree.thought_ids[p][k] for p, k in slots]
    for row, (p, k) in enumerate(slots):
        real = batch.thought_ids[row][batch.thought_mask[row]]
        if (p, k) in forced:  # the appended marker ends the row: context for the answers, never counted
            assert real[-len(close) :].tolist() == close
            assert not batch.thought_scored[row, len(real) - len(close) : len(real)].any()
    answer_tokens = sum(len(tree.answer_ids[p][k][m]) for p, k, m in tree.answer_slots())
    thought_tokens = sum(len(tree.thought_ids[p][k]) for p, k in slots)
    assert len(batch.advantages) == len(batch.weights) == thought_tokens + answer_tokens
    with torch.no_grad():
        assert len(G.tree_logprobs(tiny_model, batch, 1.0)) == thought_tokens + answer_tokens


# ------------------------------------------------------------------------------------------------
# the loss at M = 1, and as M grows
# ------------------------------------------------------------------------------------------------
def test_m1_token_mean_loss_equals_grpo_token_mean(tokenizer):
    """With M = 1, the tree loss is GRPO's: each completion (thought + answer) carries its own GRPO advantage,
    and the clipped surrogate is averaged over every completion token of the step."""
    k = 4
    tree = digit_tree(tokenizer, 2, k, 1)
    gen = torch.Generator().manual_seed(1)
    rewards = torch.rand(2, k, 1, generator=gen)
    thought_adv, answer_adv = G.ma_advantages(rewards)
    weights = G.loss_weights(tree, "token")
    slots = tree.thought_slots()
    batch = G.build_tree_batch(tree, slots, thought_adv, answer_adv, weights, tokenizer.pad_token_id, "cpu")
    count = len(batch.advantages)
    logps, old_logps = -torch.rand(count, generator=gen), -torch.rand(count, generator=gen)
    loss, _ = G.grpo_ma_loss(logps, old_logps, None, batch.advantages, batch.weights, 0.0, G.Config(beta=0.0))

    flat = rewards[..., 0].double()
    grpo = (flat - flat.mean(-1, keepdim=True)) / (flat.std(-1, keepdim=True) + 1e-4)
    # the tokens in TreeBatch order: every thought's tokens row by row, then every answer's
    thought_lengths = [len(tree.thought_ids[p][j]) for p, j in slots]
    answer_lengths = [len(tree.answer_ids[p][j][0]) for p, j in slots]
    thought_starts = [sum(thought_lengths[:c]) for c in range(len(slots))]
    answer_starts = [sum(thought_lengths) + sum(answer_lengths[:c]) for c in range(len(slots))]
    total, tokens = 0.0, 0
    for c, (p, j) in enumerate(slots):
        positions = list(range(thought_starts[c], thought_starts[c] + thought_lengths[c]))
        positions += range(answer_starts[c], answer_starts[c] + answer_lengths[c])
        for t in positions:
            ratio = torch.exp(logps[t] - old_logps[t]).double()
            a = grpo[p, j]
            total += -torch.min(ratio * a, ratio.clamp(0.8, 1.2) * a)
            tokens += 1
    assert tokens == count
    torch.testing.assert_close(loss.double(), total / tokens, rtol=1e-5, atol=1e-6)


def thought_only_gradient(tokenizer, model, m, how):
    """Gradient norm of the loss when only thoughts carry advantage; the same thoughts for any M."""
    k = 2
    base = digit_tree(tokenizer, 2, k, 1, seed=3)
    answer_ids = [[[by_k[0]] * m for by_k in by_p] for by_p in base.answer_ids]
    answers = [[[""] * m for _ in range(k)] for _ in range(2)]
    tree = G.Tree(base.prompt_ids, base.thought_ids, base.forced_close, answer_ids, base.thoughts, answers)
    thought_adv, answer_adv = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), torch.zeros(2, k, m)
    weights = G.loss_weights(tree, how)
    slots = tree.thought_slots()
    batch = G.build_tree_batch(tree, slots, thought_adv, answer_adv, weights, tokenizer.pad_token_id, "cpu")
    logps = G.tree_logprobs(model, batch, 1.0)
    cfg = G.Config(loss_agg=how, beta=0.0)
    loss, _ = G.grpo_ma_loss(logps, logps.detach(), None, batch.advantages, batch.weights, 0.0, cfg)
    model.zero_grad(set_to_none=True)
    loss.backward()
    norm = torch.sqrt(sum((p.grad**2).sum() for p in model.parameters() if p.grad is not None))
    model.zero_grad(set_to_none=True)
    return norm, batch


def test_thought_gradient_does_not_grow_with_m(tokenizer, tiny_model):
    norm_1, batch_1 = thought_only_gradient(tokenizer, tiny_model, 1, "sequence")
    norm_8, batch_8 = thought_only_gradient(tokenizer, tiny_model, 8, "sequence")
    assert batch_1.thought_scored.sum() == batch_8.thought_scored.sum()  # each thought's tokens counted once
    assert norm_1 > 0
    torch.testing.assert_close(norm_8, norm_1, rtol=1e-4, atol=1e-6)
    token_1, _ = thought_only_gradient(tokenizer, tiny_model, 1, "token")
    token_8, _ = thought_only_gradient(tokenizer, tiny_model, 8, "token")
    assert 0 < token_8 <= token_1 * (1 + 1e-5)
