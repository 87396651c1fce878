"""One training step, the supervised warm-up and evaluation, checked against computations written here: the
advantages a step trains on, that it steps at all, that micro-batches change nothing, that later iterations
compare with the sampling policy (in float32 and under bf16 autocast), the KL against a reference, masked
answers, the gradient spike score, that the warm-up learns the solution tokens only, and that greedy and
sampled evaluation score what they say. Steps sample from the randomly initialised embedded model, whose
answers vary in length, so the reward `answer_length` varies and every step has a gradient."""

import copy
import random

import numpy as np
import pytest
import torch
from conftest import small_config, start

import grpo_ma as G

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EPS = 1e-4


def weights(model):
    return {name: value.detach().clone() for name, value in model.named_parameters()}


class Spy:
    """Wraps score_answers, build_tree_batch and grpo_ma_loss to keep what a step passed and got."""

    def __init__(self, monkeypatch):
        self.scores, self.batches, self.losses = [], [], []
        real_score, real_build, real_loss = G.score_answers, G.build_tree_batch, G.grpo_ma_loss

        def score_answers(*args):
            self.scores.append(real_score(*args))
            return self.scores[-1]

        def build_tree_batch(tree, slots, *args):
            batch = real_build(tree, slots, *args)
            self.batches.append((tree, list(slots), batch))
            return batch

        def grpo_ma_loss(logps, old_logps, *args):
            self.losses.append((logps.detach().clone(), old_logps.detach().clone()))
            return real_loss(logps, old_logps, *args)

        monkeypatch.setattr(G, "score_answers", score_answers)
        monkeypatch.setattr(G, "build_tree_batch", build_tree_batch)
        monkeypatch.setattr(G, "grpo_ma_loss", grpo_ma_loss)


def normalised(values: np.ndarray, ddof: int, scale: bool) -> np.ndarray:
    """(x - mean x) / (std x + eps) over the last axis, or x - mean x; exactly 0 for a constant group."""
    centred = values - values.mean(-1, keepdims=True)
    advantage = centred / (values.std(-1, ddof=ddof, keepdims=True) + EPS) if scale else centred
    return np.where(np.ptp(values, -1, keepdims=True) == 0, 0.0, advantage)


def expected_advantages(rewards: np.ndarray, pool: str, ddof: int, scale: bool):
    """GRPO-MA's two advantages of rewards (P, K, M), written out: thought values V = mean over M, answers
    pooled over all K*M answers of the prompt or over the M answers of their thought."""
    p, k, m = rewards.shape
    thought = normalised(rewards.mean(-1), ddof, scale)
    if pool == "all":
        return thought, normalised(rewards.reshape(p, k * m), ddof, scale).reshape(p, k, m)
    return thought, normalised(rewards, ddof, scale)


def token_advantages(tree, slots, thought, answer):
    """The advantage of every counted token, in TreeBatch order: thoughts row by row, then every answer."""
    values = [thought[p, k] for p, k in slots for _ in tree.thought_ids[p][k]]
    return values + [
        answer[p, k, m] for p, k in slots for m, ids in enumerate(tree.answer_ids[p][k]) for _ in ids
    ]


@pytest.mark.parametrize("pool, ddof, scale", [("all", 1, True), ("thought", 0, True), ("thought", 1, False)])
def test_step_trains_on_the_advantages_of_its_own_rewards(monkeypatch, pool, ddof, scale):
    cfg = small_config(answer_pool=pool, ddof=ddof, scale_rewards=scale, micro_batch_tokens=120)
    run, optimizer = start(cfg)
    spy = Spy(monkeypatch)
    G.train_step(1, run, optimizer, G.Progress(), None, cfg)
    rewards = spy.scores[0]["total"].double().numpy()
    assert (np.ptp(rewards, -1) > 0).any() and (
        np.ptp(rewards.mean(-1), -1) > 0
    ).all()  # signal at both levels
    thought, answer = expected_advantages(rewards, pool, ddof, scale)
    packs = [slots for _, slots, _ in spy.batches]
    assert packs == G.pack_thoughts(spy.batches[0][0], 120) and len(packs) > 1
    assert max(map(len, packs)) > 1  # whole thoughts packed together, some of them split from their prompt
    for tree, slots, batch in spy.batches:
        expected = torch.tensor(token_advantages(tree, slots, thought, answer), dtype=torch.float32)
        torch.testing.assert_close(batch.advantages, expected, rtol=1e-5, atol=1e-6)


def test_answer_pool_changes_the_advantages_a_step_uses(monkeypatch):
    used = {}
    for pool in ("all", "thought"):
        cfg = small_config(answer_pool=pool)
        run, optimizer = start(cfg)
        spy = Spy(monkeypatch)
        G.train_step(1, run, optimizer, G.Progress(), None, cfg)
        used[pool] = (spy.scores[0]["total"], spy.batches[0][2].advantages)
    assert torch.equal(used["all"][0], used["thought"][0])  # the same rollouts and rewards
    assert not torch.allclose(used["all"][1], used["thought"][1])


def test_step_moves_the_weights_along_a_nonzero_gradient():
    cfg = small_config(lr=1e-3)
    run, optimizer = start(cfg)
    before = weights(run.policy)
    record = G.train_step(1, run, optimizer, G.Progress(), None, cfg)
    assert record["grad_norm"] > 0 and record["reward_std"] > 0
    after = weights(run.policy)
    moved = [name for name in before if not torch.equal(before[name], after[name])]
    assert len(moved) == len(before)  # every weight tensor takes part in the loss
    assert all(state["step"] == 1 for state in optimizer.state.values())


@pytest.mark.parametrize("how", ["token", "sequence"])
def test_micro_batches_change_nothing_but_memory(how):
    """The same step in one pass, in packs of a few thoughts and one thought at a time: the same loss and
    gradient norm and, with plain SGD (its update is -lr * gradient) and no clipping, the same update."""
    records, deltas = [], []
    for budget in (10**6, 120, 1):
        cfg = small_config(micro_batch_tokens=budget, loss_agg=how, grad_clip=1e9)
        run, _ = start(cfg)
        before = weights(run.policy)
        optimizer = torch.optim.SGD(run.policy.parameters(), lr=1.0)
        records.append(G.train_step(1, run, optimizer, G.Progress(), None, cfg))
        deltas.append({name: value - before[name] for name, value in weights(run.policy).items()})
    assert records[0]["grad_norm"] > 0
    assert records[0]["micro_batches"] == 1 < records[1]["micro_batches"] < records[2]["micro_batches"]
    for record, delta in zip(records[1:], deltas[1:]):
        assert record["loss"] == pytest.approx(records[0]["loss"], rel=1e-4, abs=1e-7)
        assert record["grad_norm"] == pytest.approx(records[0]["grad_norm"], rel=1e-4)
        for name, expected in deltas[0].items():
            torch.testing.assert_close(delta[name], expected, rtol=1e-3, atol=1e-7, msg=name)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_later_iterations_compare_with_the_sampling_policy(monkeypatch, precision):
    """mu = 2: the old log-probs are the sampling policy's, computed once before both optimizer steps, so the
    first iteration has ratio 1 and the second, after the policy moved, does not. Under bf16 autocast this
    also holds only if no optimizer step runs inside an autocast context: one that did would score the
    second iteration with the bf16 weights cast before the first step."""
    cfg = small_config(num_iterations=2, lr=1e-2, precision=precision)
    run, optimizer = start(cfg)
    spy = Spy(monkeypatch)
    real_step = optimizer.step
    autocast_at_steps = []

    def step_and_record(*args, **kwargs):
        autocast_at_steps.append(torch.is_autocast_enabled("cpu"))
        return real_step(*args, **kwargs)

    monkeypatch.setattr(optimizer, "step", step_and_record)
    record = G.train_step(1, run, optimizer, G.Progress(), None, cfg)
    assert autocast_at_steps == [False, False]
    assert len(spy.losses) == 2
    (first, first_old), (second, second_old) = spy.losses
    torch.testing.assert_close(first, first_old, rtol=0, atol=1e-5)
    assert torch.equal(second_old, first_old)
    assert (second - second_old).abs().max() > 1e-3
    assert record["grad_norm"] > 0


def test_one_iteration_has_ratio_exactly_one(monkeypatch):
    cfg = small_config()
    run, optimizer = start(cfg)
    spy = Spy(monkeypatch)
    record = G.train_step(1, run, optimizer, G.Progress(), None, cfg)
    ((logps, old_logps),) = spy.losses
    assert torch.equal(logps, old_logps)
    assert record["clip_frac"] == 0.0


def test_step_with_reference_adds_the_kl_to_its_policy(monkeypatch):
    """beta > 0 with a reference that differs from the policy: the logged KL is the k3 mean against it."""
    cfg = small_config(beta=0.5)
    run, optimizer = start(cfg)
    torch.manual_seed(5)
    reference = G.build_embedded_model(run.tokenizer).eval()
    spy = Spy(monkeypatch)
    record = G.train_step(1, run, optimizer, G.Progress(), reference, cfg)
    _, _, batch = spy.batches[0]
    with torch.no_grad():
        ref_logps = G.tree_logprobs(reference, batch, cfg.temperature)
    logps = spy.losses[0][0]
    delta = (ref_logps - logps).double()
    expected = (torch.exp(delta) - delta - 1).mean().item()
    assert record["kl"] == pytest.approx(expected, rel=1e-4)
    assert record["beta"] == 0.5 and record["kl"] > 0


def test_masked_step_gives_answers_that_ran_out_of_budget_no_weight(monkeypatch):
    """--mask-truncated: an answer that neither wrote </answer> nor eos weighs 0; every other token keeps a
    weight, and the token weights of the step still sum to 1."""
    cfg = small_config(mask_truncated=True, max_answer_tokens=20, micro_batch_tokens=150)
    run, optimizer = start(cfg)
    spy = Spy(monkeypatch)
    G.train_step(1, run, optimizer, G.Progress(), None, cfg)
    eos = run.tokenizer.eos_token_id
    seen, total = set(), 0.0
    for tree, slots, batch in spy.batches:
        offset = sum(len(tree.thought_ids[p][k]) for p, k in slots)
        assert (batch.weights[:offset] > 0).all()
        for p, k in slots:
            for ids in tree.answer_ids[p][k]:
                truncated = eos not in ids and G.ANSWER_CLOSE not in run.tokenizer.decode(ids)
                share = batch.weights[offset : offset + len(ids)]
                assert (share == 0).all() if truncated else (share > 0).all()
                seen.add(truncated)
                offset += len(ids)
        total += batch.weights.sum().item()
    assert seen == {True, False}
    assert total == pytest.approx(1.0, rel=1e-5)


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


# ------------------------------------------------------------------------------------------------
# the supervised warm-up
# ------------------------------------------------------------------------------------------------
def test_warm_up_descends_the_cross_entropy_of_the_solution_tokens_only():
    """One warm-up step on two examples of different lengths. The cross-entropy of the solution tokens
    (thought, answer block, eos) given the prompt, computed here row by row without padding, has gradient g;
    the first step of Adam(W) moves each weight by -lr * sign(g) (plus a small decay), so each weight with a
    clear gradient must move against it. Counting the prompt tokens too changes g's sign in many weights."""
    pool = G.sample_examples(random.Random(4), "addsub", 2, held_out=False)
    lengths = {len(e.question + e.thought + e.answer) for e in pool}
    assert len(lengths) == 2  # the batch is padded
    cfg = small_config(warmup_steps=1, warmup_batch=2, warmup_lr=1e-3)
    run = G.start_run(cfg, train_pool=pool)
    tokenizer = run.tokenizer
    model = copy.deepcopy(run.policy).train()
    total, count = 0.0, 0
    for example in pool:
        prompt = tokenizer.encode(G.format_prompt(tokenizer, example.question), add_special_tokens=False)
        text = example.thought + G.ANSWER_OPEN + example.answer + G.ANSWER_CLOSE
        solution = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.eos_token_id]
        row = torch.tensor([prompt + solution])
        logps = torch.log_softmax(model(input_ids=row).logits[0, :-1], -1)
        nll = -logps.gather(-1, row[0, 1:, None])[:, 0]  # nll[t] = -log p(token t + 1 | tokens 0..t)
        total = total + nll[len(prompt) - 1 :].sum()
        count += len(solution)
    (total / count).backward()
    gradient = {name: value.grad for name, value in model.named_parameters()}
    before = weights(run.policy)
    G.supervised_warmup(run, cfg)
    agree, clear = 0, 0
    for name, value in weights(run.policy).items():
        g = gradient[name]
        strong = g.abs() > 1e-6
        agree += (torch.sign(value - before[name])[strong] == -torch.sign(g[strong])).sum().item()
        clear += strong.sum().item()
    assert clear > 10_000
    assert agree / clear > 0.995


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------
def test_greedy_evaluation_scores_the_greedy_answer_and_sampled_evaluation_a_sample():
    """is_correct accepts exactly the greedy answer of each prompt: greedy accuracy is 1, and sampling at
    T = 1 from a model with large weights writes other answers."""
    cfg = small_config(eval_size=6, temperature=1.0)
    run, _ = start(cfg)
    with torch.no_grad():  # larger weights than the init's: outputs that depend on the context
        for weight in run.policy.parameters():
            if weight.dim() > 1:
                weight.normal_(0, 0.2)
    prompt_ids = G.encode_prompts(run.tokenizer, run.eval_examples)[1]
    greedy = G.sample_tree(run.policy, run.tokenizer, prompt_ids, 1, 1, cfg, do_sample=False)
    expected = {e.question: greedy.answers[p][0][0] for p, e in enumerate(run.eval_examples)}

    def is_greedy_answer(answer, example):
        return answer == expected[example.question]

    run.is_correct = is_greedy_answer
    accuracy = G.evaluate(run, cfg)
    assert accuracy["eval_greedy_accuracy"] == 1.0
    assert accuracy["eval_sampled_accuracy"] < 1.0


def test_dr_grpo_step_normalises_by_answers_times_both_token_budgets(monkeypatch):
    """dr_grpo as train_step runs it: every answer token weighs 1 / (N * (thought budget + answer budget)),
    the longest path the step could have sampled."""
    cfg = small_config(loss_agg="dr_grpo", max_thought_tokens=8, max_answer_tokens=5)
    run, optimizer = start(cfg)
    real = G.loss_weights
    seen = []

    def recording(tree, *args, **kwargs):
        seen.append((tree, real(tree, *args, **kwargs)))
        return seen[-1][1]

    monkeypatch.setattr(G, "loss_weights", recording)
    G.train_step(1, run, optimizer, G.Progress(), None, cfg)
    ((tree, (thought_share, answer_share)),) = seen
    n = len(tree.answer_slots())
    for p, k, m in tree.answer_slots():
        assert answer_share[p][k][m] == pytest.approx(1 / (n * 13))
        assert thought_share[p][k] == pytest.approx(1 / (n * 13))


@pytest.mark.parametrize(
    "schedule, reference",
    [
        (dict(kl_schedule="dynamic", beta_min=0.0, beta_max=0.02), True),  # beta(s) is 0 only at s = w
        (dict(kl_schedule="dynamic", beta_min=0.0, beta_max=0.0), False),
        (dict(beta=0.0), False),
        (dict(beta=0.04), True),
    ],
)
def test_kl_reference_exists_whenever_beta_is_ever_above_zero(schedule, reference):
    cfg = small_config(**schedule)
    run, _ = start(cfg)
    assert (G.kl_reference(run, cfg) is not None) == reference


def test_dynamic_schedule_from_zero_logs_the_kl_at_every_step(monkeypatch):
    """GRPO-D with beta_min 0: the step where beta(s) = 0 still measures the KL against the start policy."""
    cfg = small_config(kl_schedule="dynamic", beta_min=0.0, beta_max=0.02, steps=10, explore_share=0.3)
    run, optimizer = start(cfg)
    reference = G.kl_reference(run, cfg)
    record = G.train_step(3, run, optimizer, G.Progress(), reference, cfg)
    assert record["beta"] == 0.0 and record["kl"] is not None and record["kl"] >= 0
