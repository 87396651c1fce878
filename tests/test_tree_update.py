"""The tree update equals the flat one-row-per-answer computation, whatever the micro-batch: its log-probs,
its loss and its gradients, for the token and sequence aggregations and for TRL's grpo and dr_grpo at M = 1.
Also the chunked log-probs against one log softmax, and answers left out of the loss.

The flat reference below is written independently of grpo_ma's tree forward: every answer is its own row
prompt + thought + forced close + answer, forwarded in full, scored with log_softmax(logits / T) at the next
token, and the thought tokens are counted in the first answer's row only."""

from functools import partial

import pytest
import torch
from conftest import prefix
from conftest import ragged_tree as ragged_tree_within

import grpo_ma as G

TEMPERATURE = 0.7
# this module's trees: prompts of 3 to 7 tokens, thoughts of 1 to 6
ragged_tree = partial(ragged_tree_within, prompt_lengths=(3, 7), thought_lengths=(1, 6))


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.manual_seed(0)
    return G.build_embedded_model(tokenizer)


def flat_loss(model, tree, thought_adv, answer_adv, how):
    """The flat computation: the token mean (or the sequence mean) over one row per answer, mu = 1, no KL."""
    per_thought = []  # (sum of per-token loss, count) of each thought, counted once
    per_answer = []
    for p, k in tree.thought_slots():
        for m, answer in enumerate(tree.answer_ids[p][k]):
            context = tree.prompt_ids[p] + tree.thought_ids[p][k] + tree.forced_close[p][k]
            row = torch.tensor([context + answer])
            logps = torch.log_softmax(model(input_ids=row).logits[0, :-1].float() / TEMPERATURE, -1)
            scored = logps.gather(-1, row[0, 1:, None])[:, 0]  # scored[t] = log p(token t + 1)
            ratio = torch.exp(scored - scored.detach())  # rho = 1 with a gradient
            start = len(tree.prompt_ids[p]) - 1
            if m == 0:
                n = len(tree.thought_ids[p][k])
                values = -ratio[start : start + n] * thought_adv[p, k]
                per_thought.append((values.sum(), n))
            first = len(context) - 1
            values = -ratio[first : first + len(answer)] * answer_adv[p, k, m]
            per_answer.append((values.sum(), len(answer)))
    if how == "token":
        total = sum(s for s, _ in per_thought) + sum(s for s, _ in per_answer)
        return total / (sum(n for _, n in per_thought) + sum(n for _, n in per_answer))
    thought_means = [s / n for s, n in per_thought if n > 0]
    return sum(thought_means) / len(thought_means) + sum(s / n for s, n in per_answer) / len(per_answer)


def tree_loss(model, tree, thought_adv, answer_adv, how, budget):
    """grpo_ma's path: loss weights over the whole step, then one backward per micro-batch of at most
    `budget` padded tokens."""
    cfg = G.Config(beta=0.0, temperature=TEMPERATURE)
    weights = G.loss_weights(tree, how)
    total = 0.0
    for part in G.pack_thoughts(tree, budget):
        batch = G.build_tree_batch(tree, part, thought_adv, answer_adv, weights, 0, "cpu")
        logps = G.tree_logprobs(model, batch, TEMPERATURE)
        loss, _ = G.grpo_ma_loss(logps, logps.detach(), None, batch.advantages, batch.weights, 0.0, cfg)
        loss.backward()
        total += loss.item()
    return total


def gradients(model):
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("how", ["token", "sequence"])
@pytest.mark.parametrize("budget", [1, 40, 10**6])
def test_tree_update_equals_flat_update(tokenizer, model, m, how, budget):
    tree = ragged_tree(tokenizer, prompts=2, k=3, m=m)
    gen = torch.Generator().manual_seed(1)
    thought_adv = torch.randn(2, 3, generator=gen)
    answer_adv = torch.randn(2, 3, m, generator=gen)
    model.zero_grad(set_to_none=True)
    expected = flat_loss(model, tree, thought_adv, answer_adv, how)
    expected.backward()
    flat_grads = gradients(model)
    got = tree_loss(model, tree, thought_adv, answer_adv, how, budget)
    tree_grads = gradients(model)
    assert abs(got - expected.item()) < 1e-5 * max(1.0, abs(expected.item()))
    assert flat_grads.keys() == tree_grads.keys()
    for name, grad in flat_grads.items():
        torch.testing.assert_close(tree_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert any(g.abs().sum() > 0 for g in flat_grads.values())


@pytest.mark.parametrize("m", [1, 3])
def test_packs_hold_whole_thoughts_in_order_within_the_budget_and_fall_in_number_as_it_grows(tokenizer, m):
    tree = ragged_tree(tokenizer, prompts=3, k=4, m=m, seed=2)
    zeros = torch.zeros(3, 4, m)
    weights = G.loss_weights(tree, "token")
    counts = []
    for budget in (1, 30, 60, 120, 10**6):
        packs = G.pack_thoughts(tree, budget)
        assert sum(packs, []) == tree.thought_slots()
        for pack in packs:  # what the forward gets: the batch's padded tensors
            batch = G.build_tree_batch(tree, pack, zeros[..., 0], zeros, weights, 0, "cpu")
            size = batch.prompt_ids.numel() + batch.thought_ids.numel() + batch.answer_ids.numel()
            assert size == G.padded_tokens(tree, pack)
            assert size <= budget or len(pack) == 1
        counts.append(len(packs))
    assert counts[0] == len(tree.thought_slots()) and counts[-1] == 1
    assert counts == sorted(counts, reverse=True) and len(set(counts)) >= 4


def test_tree_logprobs_equal_log_softmax_of_full_rows_at_the_next_token(tokenizer, model):
    tree = ragged_tree(tokenizer, prompts=2, k=2, m=2, seed=3)
    zeros = torch.zeros(2, 2, 2)
    weights = G.loss_weights(tree, "token")
    batch = G.build_tree_batch(tree, tree.thought_slots(), zeros[..., 0], zeros, weights, 0, "cpu")
    expected_thought, expected_answer = [], []
    with torch.no_grad():
        logps = G.tree_logprobs(model, batch, TEMPERATURE)
        for p, k in tree.thought_slots():
            context = prefix(tree, p, k)
            thought_start = len(tree.prompt_ids[p])
            thought_end = thought_start + len(tree.thought_ids[p][k])
            for m, answer in enumerate(tree.answer_ids[p][k]):
                row = context + answer
                logits = model(input_ids=torch.tensor([row])).logits[0].float()
                for t in range(1, len(row)):
                    value = torch.log_softmax(logits[t - 1] / TEMPERATURE, -1)[row[t]].item()
                    if thought_start <= t < thought_end and m == 0:
                        expected_thought.append(value)
                    elif t >= len(context):
                        expected_answer.append(value)
    torch.testing.assert_close(logps, torch.tensor(expected_thought + expected_answer), rtol=0, atol=1e-5)


def test_chunked_logprobs_equal_one_log_softmax_and_its_gradient():
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    head = torch.nn.Linear(6, 11, bias=False)
    hidden = torch.randn(37, 6, generator=gen, requires_grad=True)
    targets = torch.randint(0, 11, (37,), generator=gen)
    chunked = G.selected_logprobs(hidden, head, targets, 0.5, chunk=5)
    (chunked * torch.arange(37.0)).sum().backward()
    chunked_grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad = head.weight.grad = None
    whole = torch.log_softmax(hidden @ head.weight.T / 0.5, -1).gather(-1, targets[:, None])[:, 0]
    (whole * torch.arange(37.0)).sum().backward()
    torch.testing.assert_close(chunked, whole)
    torch.testing.assert_close(chunked_grads[0], hidden.grad)
    torch.testing.assert_close(chunked_grads[1], head.weight.grad)


def trl_loss_at_m1(model, tree, advantages, how, max_length):
    """TRL's aggregations at M = 1, each completion = thought + answer: "grpo" averages each completion's
    token mean over the completions, "dr_grpo" divides the sum over all tokens by completions * max_length."""
    sums, lengths = [], []
    for p, k in tree.thought_slots():
        completion = tree.thought_ids[p][k] + tree.forced_close[p][k] + tree.answer_ids[p][k][0]
        row = torch.tensor([tree.prompt_ids[p] + completion])
        logps = torch.log_softmax(model(input_ids=row).logits[0, :-1].float() / TEMPERATURE, -1)
        scored = logps.gather(-1, row[0, 1:, None])[:, 0]
        ratio = torch.exp(scored - scored.detach())[len(tree.prompt_ids[p]) - 1 :]
        sampled = [True] * len(tree.thought_ids[p][k]) + [False] * len(tree.forced_close[p][k])
        sampled += [True] * len(tree.answer_ids[p][k][0])
        sums.append(-(ratio[torch.tensor(sampled)] * advantages[p, k]).sum())
        lengths.append(sum(sampled))
    if how == "grpo":
        return sum(total / n for total, n in zip(sums, lengths)) / len(sums)
    return sum(sums) / (len(sums) * max_length)


@pytest.mark.parametrize("how", ["grpo", "dr_grpo"])
def test_grpo_and_dr_grpo_aggregations_are_trls_at_m1(tokenizer, model, how):
    tree = ragged_tree(tokenizer, prompts=2, k=3, m=1, seed=5)
    advantages = torch.randn(2, 3, generator=torch.Generator().manual_seed(2))
    expected = trl_loss_at_m1(model, tree, advantages, how, max_length=20).item()
    cfg = G.Config(beta=0.0, temperature=TEMPERATURE)
    weights = G.loss_weights(tree, how, max_length=20)
    batch = G.build_tree_batch(
        tree, tree.thought_slots(), advantages, advantages[..., None], weights, 0, "cpu"
    )
    with torch.no_grad():
        logps = G.tree_logprobs(model, batch, TEMPERATURE)
    loss, _ = G.grpo_ma_loss(logps, logps, None, batch.advantages, batch.weights, 0.0, cfg)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_answers_left_out_weigh_nothing_and_leave_the_token_count():
    tokens = [[1, 2], [3]]
    tree = G.Tree([[5]], [tokens], [[[], []]], [[[[7, 7, 7], [8]], [[9], [9, 9]]]], [], [])
    counted = [[[True, False], [True, True]]]
    thought_weights, answer_weights = G.loss_weights(tree, "token", counted)
    counted_tokens = 2 + 1 + 3 + 1 + 2  # both thoughts, and the answers kept
    assert answer_weights[0][0][1] == 0.0
    assert thought_weights[0][0] == pytest.approx(1 / counted_tokens)
    assert answer_weights[0][1][1] == pytest.approx(1 / counted_tokens)
