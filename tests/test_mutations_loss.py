"""The loss's pieces against values computed here: log-probs, the k3 KL, beta, the clipped surrogate, the
loss weights of both aggregations, the advantage each token carries, and the gradient spike score.

Each test states a property of what is right, with numbers written out or computed independently here, so a
one-line slip in grpo_ma (a missing temperature, a shifted target, a flipped sign, swapped clip bounds, a
weight normalised per micro-batch, a window off by one) turns it red."""

import math
import random

import pytest
import torch

import grpo_ma as G

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TEMPERATURE = 1.7


@pytest.fixture(scope="module")
def tokenizer():
    return G.build_char_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(1)
    return G.build_embedded_model(tokenizer).eval()


def ragged_tree(tokenizer, prompts, k, m, seed=0):
    """Random digit tokens, ragged lengths; every third thought closed by force; thought (0, 1) empty."""
    rng = random.Random(seed)
    close = tokenizer.encode(G.THINK_CLOSE, add_special_tokens=False)

    def tokens(low, high):
        return [
            tokenizer.convert_tokens_to_ids(str(rng.randint(0, 9))) for _ in range(rng.randint(low, high))
        ]

    prompt_ids = [tokens(2, 6) for _ in range(prompts)]
    thought_ids = [[tokens(1, 7) for _ in range(k)] for _ in range(prompts)]
    thought_ids[0][1] = []
    forced = [[close if (p * k + j) % 3 == 1 else [] for j in range(k)] for p in range(prompts)]
    answer_ids = [[[tokens(1, 5) for _ in range(m)] for _ in range(k)] for _ in range(prompts)]
    thoughts = [[""] * k for _ in range(prompts)]
    answers = [[[""] * m for _ in range(k)] for _ in range(prompts)]
    return G.Tree(prompt_ids, thought_ids, forced, answer_ids, thoughts, answers)


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
    got = G.selected_logprobs(logits, targets, temperature, chunk=4)
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
# the clipped surrogate, with eps_low = 0.1 and eps_high = 0.3: the ratio is kept within [0.9, 1.3]
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# the gradient spike score
# ------------------------------------------------------------------------------------------------
def test_gradient_spike_score_divides_by_the_mean_of_the_previous_window():
    state = G.Progress()
    assert state.gradient_spike_score(0.0, 3) is None  # no gradient has flowed yet
    assert state.gradient_spike_score(100.0, 3) is None  # the previous mean is 0
    scores = [state.gradient_spike_score(norm, 3) for norm in (1.0, 2.0, 3.0, 6.0, 66.0)]
    # the previous (up to) three norms: (0, 100), (0, 100, 1), (100, 1, 2), (1, 2, 3), (2, 3, 6)
    assert scores[0] == pytest.approx(1.0 / 50)
    assert scores[1] == pytest.approx(2.0 / (101 / 3))
    assert scores[2] == pytest.approx(3.0 / (103 / 3))
    assert scores[3] == pytest.approx(6.0 / 2.0)
    assert scores[4] == pytest.approx(66.0 / (11 / 3))
    assert state.gss_over_10 == 1  # only the last one exceeds 10
