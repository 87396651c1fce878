"""Tests of the trainer: advantages, loss, sampling, clear errors, and tiny end-to-end runs that learn.

Each test name states the property it checks. Every end-to-end run trains with `answer_length`, a reward
that varies from the first step (the embedded start policy after 5 warm-up steps scores 0 everywhere on
accuracy and format, so with those rewards nothing would learn and two runs would agree trivially)."""

import ast
import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import grpo_ma as G
import grpo_ma_run as R

REPO = Path(G.__file__).resolve().parent

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TIMING_KEYS = {"rollout_seconds", "train_seconds"}


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    return G.build_char_tokenizer()


@pytest.fixture(scope="module")
def tiny_model(tokenizer):
    torch.manual_seed(0)
    return G.build_embedded_model(tokenizer).eval()


def digit_tree(tokenizer, prompts, k, m, *, seed=0, forced=(), closed=()):
    """A hand-built tree of random digit tokens (no model needed). Thoughts (p, k) in `forced` were closed
    by force; those in `closed` end with a </think> they sampled themselves."""
    rng = random.Random(seed)
    close = tokenizer.encode(G.THINK_CLOSE, add_special_tokens=False)

    def tokens(low, high):
        return [
            tokenizer.convert_tokens_to_ids(str(rng.randint(0, 9))) for _ in range(rng.randint(low, high))
        ]

    prompt_ids = [tokens(3, 5) for _ in range(prompts)]
    thought_ids = [
        [tokens(2, 6) + (close if (p, j) in closed else []) for j in range(k)] for p in range(prompts)
    ]
    forced_close = [[close if (p, j) in forced else [] for j in range(k)] for p in range(prompts)]
    answer_ids = [[[tokens(1, 4) for _ in range(m)] for _ in range(k)] for _ in range(prompts)]
    thoughts = [[""] * k for _ in range(prompts)]
    answers = [[[""] * m for _ in range(k)] for _ in range(prompts)]
    return G.Tree(prompt_ids, thought_ids, forced_close, answer_ids, thoughts, answers)


def config_from_flags(flags):
    """The RunConfig grpo_ma_run's CLI builds from these flags."""
    return R.parse_args(flags)


def answer_length(prompts, thoughts, answers, examples):
    """A reward that varies from the first step: a tenth of the answer's length in characters."""
    return [len(answer) / 10 for answer in answers]


REWARDS = [(answer_length, 1.0)]


def tiny_config(out, **changes):
    """T2A2 on 2 prompts, 5 warm-up steps, 8 held-out prompts: a few seconds on a CPU."""
    settings = dict(thoughts=2, answers=2, prompts_per_step=2, steps=2, warmup_steps=5, eval_size=8)
    return R.RunConfig(**(settings | {"out": str(out)} | changes))


def read_metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def load_checkpoint(folder, name="checkpoint.pt"):
    return torch.load(folder / name, map_location="cpu", weights_only=True)


def assert_learned(folder):
    """The run in `folder` learned: rewards varied, every step had a gradient, and the weights moved away
    from the start policy (reference.pt)."""
    lines = read_metrics(folder)[1:]
    assert lines and all(line["reward_std"] > 0 for line in lines)
    assert all(line["grad_norm"] > 0 for line in lines)
    final = load_checkpoint(folder)["model"]
    start = torch.load(folder / "reference.pt", map_location="cpu")
    assert any(not torch.equal(final[name], start[name]) for name in start)


def without_timing(lines):
    return [{key: value for key, value in line.items() if key not in TIMING_KEYS} for line in lines]


def summary_without_wall(folder):
    summary = json.loads((folder / "summary.json").read_text())
    summary.pop("wall_seconds")
    return summary


def assert_same_tensors(left: dict, right: dict):
    assert left.keys() == right.keys()
    for name, tensor in left.items():
        assert torch.equal(tensor, right[name]), name


def assert_same_optimizer_state(left: dict, right: dict):
    assert left["param_groups"] == right["param_groups"]
    assert left["state"].keys() == right["state"].keys()
    for index, moments in left["state"].items():
        assert_same_tensors(moments, right["state"][index])


# ------------------------------------------------------------------------------------------------
# advantages and loss
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ddof", [0, 1])
def test_m1_advantages_equal_grpo(ddof):
    rewards = torch.rand(3, 8, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    thought_adv, answer_adv = G.ma_advantages(rewards, ddof=ddof)
    flat = rewards[..., 0]
    spread = flat.std(-1, correction=ddof, keepdim=True)
    grpo = (flat - flat.mean(-1, keepdim=True)) / (spread + 1e-4)  # GRPO, written out
    torch.testing.assert_close(thought_adv, grpo)
    torch.testing.assert_close(answer_adv[..., 0], grpo)


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


def test_constant_rewards_give_exact_zero_advantages_and_no_nan():
    # 28 copies of 6.888437030500963 have a float64 mean that differs from it by 2e-15: no residue / eps
    cases = [((2, 4, 3), value) for value in (0.0, 1.0, 0.1, -3.7, 1e30)] + [((1, 7, 4), 6.888437030500963)]
    for shape, value in cases:
        thought_adv, answer_adv = G.ma_advantages(torch.full(shape, value, dtype=torch.float64))
        assert torch.equal(thought_adv, torch.zeros(shape[:2], dtype=torch.float64))
        assert torch.equal(answer_adv, torch.zeros(shape, dtype=torch.float64))
    thought_adv, answer_adv = G.ma_advantages(torch.ones(1, 4, 3), answer_pool="thought")
    assert not thought_adv.isnan().any() and torch.equal(answer_adv, torch.zeros(1, 4, 3))


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
    assert batch_1.thought_mask.sum() == batch_8.thought_mask.sum()  # each thought's tokens counted once
    assert norm_1 > 0
    torch.testing.assert_close(norm_8, norm_1, rtol=1e-4, atol=1e-6)
    token_1, _ = thought_only_gradient(tokenizer, tiny_model, 1, "token")
    token_8, _ = thought_only_gradient(tokenizer, tiny_model, 8, "token")
    assert 0 < token_8 <= token_1 * (1 + 1e-5)


def test_on_policy_ratio_is_exactly_one():
    logps = torch.randn(28, requires_grad=True)
    advantages = torch.randn(28)
    ratio = torch.exp(logps - logps.detach())
    assert torch.equal(ratio, torch.ones_like(ratio))
    per_token = G.clipped_surrogate(logps, logps.detach(), advantages, 0.2, 0.2)
    assert torch.equal(per_token, -advantages)
    per_token.sum().backward()
    assert torch.equal(logps.grad, -advantages)  # the policy gradient: d(-rho A)/d logp = -A at rho = 1


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


def test_forced_think_close_is_context_not_trained(tokenizer, tiny_model):
    close = tokenizer.encode(G.THINK_CLOSE, add_special_tokens=False)
    forced, closed = {(0, 0), (1, 1)}, {(0, 1)}
    tree = digit_tree(tokenizer, 2, 2, 2, forced=forced, closed=closed)
    ones = torch.ones(2, 2, 2)
    weights = G.loss_weights(tree, "token")
    slots = tree.thought_slots()
    batch = G.build_tree_batch(tree, slots, ones[..., 0], ones, weights, tokenizer.pad_token_id, "cpu")
    # the counted prefix tokens are exactly the sampled thoughts, a sampled </think> included
    counted = [batch.prefix_ids[row][batch.thought_mask[row]].tolist() for row in range(len(slots))]
    assert counted == [tree.thought_ids[p][k] for p, k in slots]
    for row, (p, k) in enumerate(slots):
        if (p, k) in forced:  # the appended marker ends the row and is never counted
            assert batch.prefix_ids[row, -len(close) :].tolist() == close
            assert not batch.thought_mask[row, -len(close) :].any()
    answer_tokens = sum(len(tree.answer_ids[p][k][m]) for p, k, m in tree.answer_slots())
    thought_tokens = sum(len(tree.thought_ids[p][k]) for p, k in slots)
    assert len(batch.advantages) == len(batch.weights) == thought_tokens + answer_tokens
    with torch.no_grad():
        assert len(G.tree_logprobs(tiny_model, batch, 1.0)) == thought_tokens + answer_tokens


# ------------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------------
def plain_generate(model, tokenizer, prefixes, n, budget, stop, temperature, do_sample):
    """What generate() samples on the full prefixes, each repeated n times, without any cache given to it."""
    rows = [prefix for prefix in prefixes for _ in range(n)]
    width = max(len(row) for row in rows)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(row)) + row for row in rows])
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    if do_sample:
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
        sampling = dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=budget,
        stop_strings=[stop],
        tokenizer=tokenizer,
        pad_token_id=pad,
        eos_token_id=tokenizer.eos_token_id,
        output_logits=True,
        return_dict_in_generate=True,
        **sampling,
    )
    continuations = [G.cut_at_stop(row, tokenizer, stop) for row in out.sequences[:, width:].tolist()]
    return continuations, torch.stack(out.logits, 1)


@pytest.mark.parametrize("do_sample", [False, True])
@pytest.mark.parametrize(
    "texts",
    [("7+3-2=?<think>1:7+3=10;</think>", "12+3=?<think>1:1", "9-1+1=?<think>"), ("7", "=")],
    ids=["shared-prefix-cache", "one-token-prefixes"],
)
def test_kv_reuse_samples_what_generate_samples_on_the_full_prefixes(
    tokenizer, tiny_model, monkeypatch, do_sample, texts
):
    cfg = G.Config(temperature=0.8)
    prefixes = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    budget, stop, n = 6, G.ANSWER_CLOSE, 3
    torch.manual_seed(7)
    expected, expected_logits = plain_generate(
        tiny_model, tokenizer, prefixes, n, budget, stop, 0.8, do_sample
    )

    captured = []
    real_generate = tiny_model.generate

    def generate_keeping_logits(**kwargs):
        out = real_generate(**kwargs, output_logits=True, return_dict_in_generate=True)
        captured.append(torch.stack(out.logits, 1))
        return out.sequences

    monkeypatch.setattr(tiny_model, "generate", generate_keeping_logits)
    torch.manual_seed(7)
    got = G.sample_continuations(tiny_model, tokenizer, prefixes, n, budget, stop, cfg, do_sample)
    assert got == expected
    assert captured[0].shape == expected_logits.shape
    torch.testing.assert_close(
        torch.log_softmax(captured[0], -1), torch.log_softmax(expected_logits, -1), rtol=0, atol=1e-4
    )


def test_thought_that_never_closes_is_closed_by_force(tokenizer, tiny_model):
    cfg = G.Config(max_thought_tokens=2, max_answer_tokens=3)
    prompts = [tokenizer.encode(q + "=?" + G.THINK_OPEN, add_special_tokens=False) for q in ("7+3-2", "4+4")]
    torch.manual_seed(0)
    tree = G.sample_tree(tiny_model, tokenizer, prompts, 3, 2, cfg)
    close = tokenizer.encode(G.THINK_CLOSE, add_special_tokens=False)
    forced = 0
    for p, k in tree.thought_slots():
        sampled = tree.thought_ids[p][k]
        assert len(sampled) <= 2 and tokenizer.eos_token_id not in sampled
        closed_itself = tokenizer.decode(sampled).endswith(G.THINK_CLOSE)
        assert tree.forced_close[p][k] == ([] if closed_itself else close)
        assert tree.thoughts[p][k].endswith(G.THINK_CLOSE)
        forced += not closed_itself
    assert forced > 0
    assert [[len(by_k) for by_k in by_p] for by_p in tree.answers] == [[2, 2, 2], [2, 2, 2]]


def test_cut_at_stop_keeps_the_token_that_completes_the_marker(tokenizer):
    ids = tokenizer.encode("1:2+3=5;</think>99", add_special_tokens=False)
    kept, ended = G.cut_at_stop(ids, tokenizer, G.THINK_CLOSE)
    assert ended == "stop" and tokenizer.decode(kept) == "1:2+3=5;</think>"
    kept, ended = G.cut_at_stop(ids[:3] + [tokenizer.eos_token_id] + ids[3:], tokenizer, G.THINK_CLOSE)
    assert ended == "eos" and kept[-1] == tokenizer.eos_token_id and len(kept) == 4
    kept, ended = G.cut_at_stop(ids[:5], tokenizer, G.THINK_CLOSE)
    assert ended == "budget" and kept == ids[:5]
    twice = tokenizer.encode("1;</answer>", add_special_tokens=False)
    assert G.cut_at_stop(twice + twice, tokenizer, G.ANSWER_CLOSE) == (twice, "stop")  # at the first one


# ------------------------------------------------------------------------------------------------
# bad input gets a clear error
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--thoughts", "1"], "--thoughts"),
        (["--answers", "0"], "--answers"),
        (["--answers", "1", "--answer-pool", "thought"], "--answer-pool"),
        (["--temperature", "0"], "--temperature"),
        (["--reward", "accuracy,nope"], "nope"),
        (["--reward-weights", "1,2,3"], "--reward-weights"),
        (["--task", "calculus"], "--task"),
        (["--kl-schedule", "dynamic", "--steps", "0"], "--kl-schedule dynamic"),
        (["--beta-min", "0.2", "--beta-max", "0.1"], "--beta-min"),
        (["--epsilon", "1"], "--epsilon"),
        (["--explore-share", "0"], "--explore-share"),
        (["--ddof", "2"], "--ddof"),
        (["--resume", "--overwrite"], "--resume and --overwrite"),
        (["--model", "./no/such/model"], "--model ./no/such/model"),
    ],
)
def test_invalid_settings_are_rejected_naming_the_flag(flags, message):
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        R.validate_run_config(config_from_flags(flags))


def nan_reward(prompts, thoughts, answers, examples):
    return [float("nan")] * len(answers)


def short_reward(prompts, thoughts, answers, examples):
    return [1.0] * (len(answers) - 1)


@pytest.mark.parametrize(
    "fn, message",
    [(nan_reward, "'nan_reward' gave nan"), (short_reward, "'short_reward' gave 3 values for 4")],
)
def test_bad_reward_function_is_named_in_the_error(tokenizer, fn, message):
    tree = digit_tree(tokenizer, 2, 2, 1)
    tree.answers = [[["<answer>1</answer>"] for _ in range(2)] for _ in range(2)]
    examples = [G.make_example(random.Random(0), "addsub")] * 2
    with pytest.raises(ValueError, match=message):
        G.score_answers([(fn, 1.0)], tree, examples, ["", ""])


def test_tokenizer_without_format_markers_is_rejected():
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    letters = ["<unk>", "<eos>"] + list("0123456789<>/abcdefghijklmnopqrstuvwxyz")
    vocab = {c: i for i, c in enumerate(letters)}
    plain = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(vocab, [], unk_token="<unk>")),
        unk_token="<unk>",
        eos_token="<eos>",
    )
    plain.backend_tokenizer.decoder = decoders.Fuse()
    G.check_format_markers(plain)  # spelled out character by character, the markers survive
    digits = {c: i for i, c in enumerate(["<unk>", "<eos>"] + list("0123456789"))}
    no_markers = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE(digits, [], unk_token="<unk>")),
        unk_token="<unk>",
        eos_token="<eos>",
    )
    with pytest.raises(ValueError, match="format marker '<think>'"):
        G.check_format_markers(no_markers)


# ------------------------------------------------------------------------------------------------
# end to end: a straight run, and the same run killed after its step-2 checkpoint and resumed
# ------------------------------------------------------------------------------------------------
LEARNING = dict(steps=4, save_every=2, eval_every=3)


@pytest.fixture(scope="module")
def learning_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    R.train(tiny_config(root / "straight", **LEARNING), reward_fns=REWARDS)
    real_step = G.train_step

    def killed_at_step_3(step, *args):
        if step == 3:
            raise KeyboardInterrupt("killed")
        return real_step(step, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(G, "train_step", killed_at_step_3)
        with pytest.raises(KeyboardInterrupt):
            R.train(tiny_config(root / "killed", **LEARNING), reward_fns=REWARDS)
    start_policy = torch.load(root / "killed" / "reference.pt", map_location="cpu")
    checkpoint = load_checkpoint(root / "killed")
    references = []

    def recording_the_reference(step, run, optimizer, progress, reference, *rest):
        references.append({name: value.clone() for name, value in reference.state_dict().items()})
        return real_step(step, run, optimizer, progress, reference, *rest)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(G, "train_step", recording_the_reference)
        R.train(tiny_config(root / "killed", resume=True, **LEARNING), reward_fns=REWARDS)
    return SimpleNamespace(
        straight=root / "straight",
        killed=root / "killed",
        start_policy=start_policy,
        checkpoint_before_resume=checkpoint,
        references_after_resume=references,
    )


def test_tiny_run_writes_config_metrics_checkpoint_summary_and_final(learning_runs):
    folder = learning_runs.straight
    lines = read_metrics(folder)
    assert [line["step"] for line in lines] == [0, 1, 2, 3, 4]
    assert all(list(line)[: len(G.METRIC_KEYS)] == list(G.METRIC_KEYS) for line in lines)
    assert all(list(line)[len(G.METRIC_KEYS) :] == ["reward/answer_length"] for line in lines[1:])
    assert all(line["tokens_generated"] > 0 and line["beta"] == 0.04 for line in lines[1:])
    assert all(line["kl"] is not None for line in lines[1:])
    evaluated = [line["step"] for line in lines if line["eval_greedy_accuracy"] is not None]
    assert evaluated == [0, 3, 4]  # the start, every --eval-every steps, the end
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["final_greedy_accuracy"] == lines[-1]["eval_greedy_accuracy"]
    assert summary["start_sampled_accuracy"] == lines[0]["eval_sampled_accuracy"]
    assert summary["config"] == "T2A2" and summary["steps"] == 4 and summary["wall_seconds"] > 0
    assert json.loads((folder / "config.json").read_text())["answers"] == 2
    checkpoint = load_checkpoint(folder)
    assert checkpoint["progress"]["step"] == 4
    assert load_checkpoint(folder, "checkpoint.prev.pt")["progress"]["step"] == 2
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(folder / "final").state_dict()
    assert all(torch.equal(final[name], checkpoint["model"][name]) for name in final)


def test_learning_runs_have_gradients_and_move_the_weights(learning_runs):
    assert_learned(learning_runs.straight)
    assert_learned(learning_runs.killed)


def test_kill_and_resume_gives_the_same_final_state(learning_runs):
    straight, killed = learning_runs.straight, learning_runs.killed
    assert_learned(straight)  # two runs that do not learn would agree trivially
    assert_learned(killed)
    first, second = load_checkpoint(straight), load_checkpoint(killed)
    assert_same_tensors(first["model"], second["model"])
    assert_same_optimizer_state(first["optimizer"], second["optimizer"])
    assert without_timing(read_metrics(straight)) == without_timing(read_metrics(killed))
    assert summary_without_wall(straight) == summary_without_wall(killed)


def test_resumed_run_keeps_the_start_policy_as_kl_reference(learning_runs):
    before = learning_runs.checkpoint_before_resume
    assert before["progress"]["step"] == 2
    start = learning_runs.start_policy
    assert any(not torch.equal(before["model"][name], start[name]) for name in start)  # the policy moved
    assert len(learning_runs.references_after_resume) == 2  # steps 3 and 4
    for reference in learning_runs.references_after_resume:
        assert_same_tensors(reference, start)
    assert_same_tensors(torch.load(learning_runs.killed / "reference.pt", map_location="cpu"), start)


def test_kl_reference_is_the_policy_after_the_warm_up(learning_runs):
    cfg = tiny_config(learning_runs.straight, **LEARNING)
    run = G.start_run(cfg, reward_fns=REWARDS)
    untrained = {name: value.clone() for name, value in run.policy.state_dict().items()}
    G.supervised_warmup(run, cfg)
    reference = torch.load(learning_runs.straight / "reference.pt", map_location="cpu")
    assert_same_tensors(reference, run.policy.state_dict())
    assert any(not torch.equal(untrained[name], reference[name]) for name in reference)


def test_resuming_a_finished_run_changes_nothing(learning_runs, tmp_path):
    folder = tmp_path / "finished"
    shutil.copytree(learning_runs.straight, folder)
    before = load_checkpoint(folder)
    metrics = read_metrics(folder)
    summary = summary_without_wall(folder)
    R.train(tiny_config(folder, resume=True, **LEARNING), reward_fns=REWARDS)
    assert_same_tensors(load_checkpoint(folder)["model"], before["model"])
    assert read_metrics(folder) == metrics
    assert summary_without_wall(folder) == summary


def test_resume_with_different_settings_is_refused(learning_runs, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(learning_runs.straight, folder)
    with pytest.raises(ValueError, match="answers"):
        R.train(tiny_config(folder, resume=True, answers=3, **LEARNING), reward_fns=REWARDS)
    with pytest.raises(ValueError, match="lr"):
        R.train(tiny_config(folder, resume=True, lr=1e-3, **LEARNING), reward_fns=REWARDS)
    assert load_checkpoint(folder)["progress"]["step"] == 4


def test_real_checkpoint_loads_through_model_flag(tmp_path):
    """The --model path (AutoModelForCausalLM + AutoTokenizer + chat template), on a small Qwen2 saved here;
    the trained policy in OUT/final loads back through the same flag."""
    tokenizer = G.build_char_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}=?{% endif %}"
    )
    torch.manual_seed(0)
    G.build_embedded_model(tokenizer).save_pretrained(tmp_path / "qwen")
    tokenizer.save_pretrained(tmp_path / "qwen")
    loaded = G.load_policy(G.Config(model=str(tmp_path / "qwen")), torch.device("cpu"))[1]
    assert G.format_prompt(loaded, "7+3") == "7+3=?" + G.THINK_OPEN  # built by the chat template
    flags = ["--thoughts", "2", "--answers", "2", "--prompts-per-step", "2", "--steps", "2"]
    flags += [
        "--warmup-steps",
        "5",
        "--eval-size",
        "4",
        "--model",
        str(tmp_path / "qwen"),
        "--out",
        str(tmp_path / "run"),
    ]
    summary = R.train(config_from_flags(flags), reward_fns=REWARDS)
    assert summary["steps"] == 2
    assert_learned(tmp_path / "run")
    trained, _, _ = G.load_policy(G.Config(model=str(tmp_path / "run" / "final")), torch.device("cpu"))
    assert_same_tensors(trained.state_dict(), load_checkpoint(tmp_path / "run")["model"])


def test_a_trained_policy_in_final_continues_training_through_model_flag(learning_runs, tmp_path):
    """python grpo_ma.py --model OUT/final --warmup-steps 0 starts from the trained weights."""
    final = learning_runs.straight / "final"
    flags = [
        "--thoughts",
        "2",
        "--answers",
        "2",
        "--prompts-per-step",
        "2",
        "--steps",
        "1",
        "--eval-size",
        "4",
    ]
    flags += ["--warmup-steps", "0", "--model", str(final), "--out", str(tmp_path / "more")]
    R.train(config_from_flags(flags), reward_fns=REWARDS)
    start = torch.load(tmp_path / "more" / "reference.pt")
    assert_same_tensors(start, load_checkpoint(learning_runs.straight)["model"])
    assert_learned(tmp_path / "more")


# ------------------------------------------------------------------------------------------------
# grpo_ma.py on its own
# ------------------------------------------------------------------------------------------------
STANDALONE = """
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import grpo_ma

assert Path(grpo_ma.__file__).parent == Path.cwd(), grpo_ma.__file__  # the copy, not the repository's


def answer_length(prompts, thoughts, answers, examples):
    return [len(answer) / 10 for answer in answers]


tiny = dict(thoughts=2, answers=2, prompts_per_step=2, warmup_steps=5, eval_size=4, device="cpu")
for steps in (0, 2):
    grpo_ma.train(grpo_ma.Config(steps=steps, out=f"run{steps}", **tiny), reward_fns=[(answer_length, 1.0)])
start, trained = (load_file(f"run{steps}/final/model.safetensors") for steps in (0, 2))
assert any(not torch.equal(start[name], trained[name]) for name in start), "the steps moved no weight"
repo = sys.argv[1]
files = [getattr(module, "__file__", None) or "" for module in list(sys.modules.values())]
mine = [path for path in files if path.startswith(repo) and "site-packages" not in path]
assert not mine, mine
"""


def test_grpo_ma_py_copied_alone_into_an_empty_folder_trains(tmp_path):
    """grpo_ma.py runs alone: copied by itself into an empty folder, its command trains the embedded default
    (exit 0, one metrics line per step), its train() moves the weights when rewards vary, and nothing of
    this repository but that one file is imported."""
    shutil.copy(REPO / "grpo_ma.py", tmp_path / "grpo_ma.py")
    (tmp_path / "standalone.py").write_text(STANDALONE)
    flags = ["--thoughts", "2", "--answers", "2", "--prompts-per-step", "2", "--steps", "2"]
    flags += ["--warmup-steps", "5", "--eval-size", "4", "--device", "cpu", "--out", "cli"]
    environment = os.environ | {"OMP_NUM_THREADS": "1"}
    command = subprocess.run(
        [sys.executable, "grpo_ma.py", *flags], cwd=tmp_path, capture_output=True, text=True, env=environment
    )
    assert command.returncode == 0, command.stderr[-2000:]
    assert [line["step"] for line in read_metrics(tmp_path / "cli")] == [0, 1, 2]
    script = subprocess.run(
        [sys.executable, "standalone.py", str(REPO)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=environment,
    )
    assert script.returncode == 0, script.stderr[-2000:]


def test_grpo_ma_py_imports_nothing_of_this_repository():
    modules = {"grpo_ma_run", "theory", "paper_figures", "demos", "tests"}
    tree = ast.parse((REPO / "grpo_ma.py").read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not imported & modules


def test_grpo_ma_run_trains_exactly_what_grpo_ma_trains(tmp_path):
    """The run file adds checkpoints, resume and live views, none of which changes what a step computes:
    the same settings give the same metrics (bar the seconds) and the same final weights."""
    from safetensors.torch import load_file

    run_cfg = tiny_config(tmp_path / "run", **LEARNING)
    plain = {field.name: getattr(run_cfg, field.name) for field in dataclasses.fields(G.Config)}
    G.train(G.Config(**(plain | {"out": str(tmp_path / "plain")})), reward_fns=REWARDS)
    R.train(run_cfg, reward_fns=REWARDS)
    timing = ("rollout_seconds", "train_seconds")
    lines = [
        [{k: v for k, v in line.items() if k not in timing} for line in read_metrics(tmp_path / name)]
        for name in ("plain", "run")
    ]
    assert lines[0] == lines[1] and len(lines[0]) == LEARNING["steps"] + 1
    weights = [load_file(tmp_path / name / "final" / "model.safetensors") for name in ("plain", "run")]
    assert_same_tensors(weights[0], weights[1])
