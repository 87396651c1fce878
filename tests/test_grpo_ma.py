"""Tests of the trainer: each test name states the property it checks (SPEC §1, issue 2)."""
import json
import random

import pytest
import torch

import grpo_ma as G

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


def make_tree(tokenizer, k, m, *, answers=None, forced=None, seed=0):
    """A hand-built tree of random digit tokens (no model needed): P=2 prompts."""
    rng = random.Random(seed)
    digit = lambda: tokenizer.convert_tokens_to_ids(str(rng.randint(0, 9)))  # noqa: E731
    prompts = [[digit() for _ in range(rng.randint(3, 5))] for _ in range(2)]
    thoughts = [[digit() for _ in range(rng.randint(2, 6))] for _ in range(2 * k)]
    forced = forced or [[] for _ in range(2 * k)]
    answers = answers or [[digit() for _ in range(rng.randint(1, 4))] for _ in range(2 * k * m)]
    return G.Tree(prompts, thoughts, forced, answers, [""] * (2 * k), [""] * (2 * k * m))


def tiny_run_args(tmp_path, *extra):
    return ["--thoughts", "2", "--answers", "2", "--prompts-per-step", "2", "--steps", "2", "--warmup-steps", "5",
            "--eval-size", "8", "--eval-every", "1", "--out", str(tmp_path), *extra]


def read_metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------
# advantages and loss
# ------------------------------------------------------------------------------------------------
def test_m1_advantages_equal_grpo():
    rewards = torch.rand(3, 8, 1)
    thought_adv, answer_adv = G.ma_advantages(rewards)
    flat = rewards[..., 0]
    grpo = (flat - flat.mean(-1, keepdim=True)) / (flat.std(-1, keepdim=True) + 1e-4)  # GRPO, written out
    torch.testing.assert_close(thought_adv, grpo)
    torch.testing.assert_close(answer_adv[..., 0], grpo)


def test_m1_token_mean_loss_equals_grpo_token_mean(tokenizer):
    k = 4
    tree = make_tree(tokenizer, k, 1)
    rewards = torch.rand(2, k, 1)
    thought_adv, answer_adv = G.ma_advantages(rewards)
    batch = G.build_train_batch(tree, thought_adv, answer_adv, 1, tokenizer.pad_token_id, "cpu")
    logps, old_logps = -torch.rand(batch.advantages.shape), -torch.rand(batch.advantages.shape)
    cfg = G.Config(beta=0.0)
    loss, _ = G.grpo_ma_loss(logps, old_logps, None, batch, 0.0, cfg)

    # GRPO: each completion (thought + answer) carries its own advantage; average over all completion tokens
    flat_adv = thought_adv.flatten()
    total, count = 0.0, 0
    for row in range(2 * k):
        start = len(tree.prompt_ids[row // k]) - 1  # logps[t] scores token t+1
        n_tokens = len(tree.thought_ids[row]) + len(tree.answer_ids[row])
        for t in range(start, start + n_tokens):
            ratio = torch.exp(logps[row, t] - old_logps[row, t])
            a = flat_adv[row]
            total += -torch.min(ratio * a, ratio.clamp(0.8, 1.2) * a)
            count += 1
    torch.testing.assert_close(loss, total / count)


def test_constant_rewards_give_exact_zero_advantages_and_no_nan():
    for value in (0.0, 1.0, 0.1, -3.7, 1e30):
        thought_adv, answer_adv = G.ma_advantages(torch.full((2, 4, 3), value))
        assert torch.equal(thought_adv, torch.zeros(2, 4)) and torch.equal(answer_adv, torch.zeros(2, 4, 3))
    thought_adv, answer_adv = G.ma_advantages(torch.ones(1, 4, 3), answer_pool="thought")
    assert not thought_adv.isnan().any() and torch.equal(answer_adv, torch.zeros(1, 4, 3))


def loss_gradient_from_thoughts(tokenizer, tiny_model, m, how):
    """Gradient norm of the loss when only thoughts carry advantage; the same thoughts for any M."""
    k = 2
    base = make_tree(tokenizer, k, 1, seed=3)
    tree = G.Tree(base.prompt_ids, base.thought_ids, base.forced_close,
                  [a for a in base.answer_ids for _ in range(m)], base.thoughts, [""] * (2 * k * m))
    thought_adv, answer_adv = torch.tensor([[1.0, -1.0], [-1.0, 1.0]]), torch.zeros(2, k, m)
    batch = G.build_train_batch(tree, thought_adv, answer_adv, m, tokenizer.pad_token_id, "cpu")
    logps = G.token_logprobs(tiny_model, batch.input_ids, batch.attention_mask, 1.0)
    loss, _ = G.grpo_ma_loss(logps, logps.detach(), None, batch, 0.0, G.Config(loss_agg=how))
    tiny_model.zero_grad()
    loss.backward()
    return torch.sqrt(sum((p.grad ** 2).sum() for p in tiny_model.parameters() if p.grad is not None)), batch


def test_thought_gradient_does_not_grow_with_m(tokenizer, tiny_model):
    norm_1, batch_1 = loss_gradient_from_thoughts(tokenizer, tiny_model, 1, "sequence")
    norm_8, batch_8 = loss_gradient_from_thoughts(tokenizer, tiny_model, 8, "sequence")
    assert batch_1.thought_mask.sum() == batch_8.thought_mask.sum()  # each thought's tokens counted once
    torch.testing.assert_close(norm_8, norm_1, rtol=1e-4, atol=1e-6)
    token_1, _ = loss_gradient_from_thoughts(tokenizer, tiny_model, 1, "token")
    token_8, _ = loss_gradient_from_thoughts(tokenizer, tiny_model, 8, "token")
    assert token_8 <= token_1 * (1 + 1e-5)


def test_on_policy_ratio_is_exactly_one():
    logps = torch.randn(4, 7, requires_grad=True)
    advantages = torch.randn(4, 7)
    ratio = torch.exp(logps - logps.detach())
    assert torch.equal(ratio, torch.ones_like(ratio))
    per_token = G.clipped_surrogate(logps, logps.detach(), advantages, 0.2, 0.2)
    assert torch.equal(per_token, -advantages)


def test_kl_is_zero_when_policy_equals_reference(tokenizer, tiny_model):
    ids = torch.tensor([tokenizer.encode("7+3-2=?<think>1:7+3=10;</think>", add_special_tokens=False)])
    logps = G.token_logprobs(tiny_model, ids, torch.ones_like(ids), 1.0)
    assert torch.equal(G.k3_kl(logps, logps.clone()), torch.zeros_like(logps))
    assert (G.k3_kl(logps, logps + 0.3 * torch.randn_like(logps)) > 0).all()  # and positive otherwise


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
    old, advantages = torch.zeros(1), torch.ones(1)
    logps = torch.log(torch.tensor([1.25])).requires_grad_()
    G.clipped_surrogate(logps, old, advantages, 0.2, 0.28).sum().backward()
    assert logps.grad[0] != 0  # 1.25 < 1.28: still inside with clip-higher


def test_forced_think_close_is_context_not_trained(tokenizer):
    close = tokenizer.encode(G.THINK_CLOSE, add_special_tokens=False)
    tree = make_tree(tokenizer, 2, 2, forced=[close, [], [], close])
    batch = G.build_train_batch(tree, torch.ones(2, 2), torch.ones(2, 2, 2), 2, tokenizer.pad_token_id, "cpu")
    counted = batch.thought_mask + batch.answer_mask
    close_id = close[0]
    targets = batch.input_ids[:, 1:]
    assert (counted[targets == close_id] == 0).all()
    assert counted.sum() == sum(map(len, tree.thought_ids)) + sum(map(len, tree.answer_ids))


# ------------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------------
def test_kv_reuse_equals_plain_path(tokenizer, tiny_model, monkeypatch):
    cfg = G.Config(max_answer_tokens=6)
    prefixes = [tokenizer.encode(t, add_special_tokens=False) for t in ("7+3-2=?<think>1:7+3=10;</think>",
                                                                         "12+3=?<think>1:1", "9-1+1=?<think>")]
    captured = {}
    real_generate = tiny_model.generate

    def generate_with_logits(**kwargs):
        out = real_generate(**kwargs, output_logits=True, return_dict_in_generate=True)
        captured["logits"] = torch.stack(out.logits, 1)
        return out.sequences

    monkeypatch.setattr(tiny_model, "generate", generate_with_logits)
    results = {}
    for reuse in (True, False):
        greedy = G.sample_answers(tiny_model, tokenizer, prefixes, 3, cfg, do_sample=False, reuse_prefix_cache=reuse)
        greedy_logits = captured["logits"]
        torch.manual_seed(7)
        sampled = G.sample_answers(tiny_model, tokenizer, prefixes, 3, cfg, do_sample=True, reuse_prefix_cache=reuse)
        results[reuse] = greedy, greedy_logits, sampled, captured["logits"]
    assert results[True][0] == results[False][0]
    assert results[True][2] == results[False][2]
    for i in (1, 3):
        torch.testing.assert_close(torch.log_softmax(results[True][i], -1), torch.log_softmax(results[False][i], -1),
                                   rtol=0, atol=1e-4)


def test_thought_that_never_closes_is_closed_by_force(tokenizer, tiny_model):
    cfg = G.Config(max_thought_tokens=2)
    prompts = [tokenizer.encode("7+3-2=?<think>", add_special_tokens=False)]
    tree = G.sample_tree(tiny_model, tokenizer, prompts, 2, 2, cfg)
    close = tokenizer.encode(G.THINK_CLOSE, add_special_tokens=False)
    assert all(f == close for f in tree.forced_close) and all(t.endswith(G.THINK_CLOSE) for t in tree.thoughts)
    assert all(len(t) <= 2 for t in tree.thought_ids) and len(tree.answers) == 4


def test_cut_at_stop_keeps_the_token_that_completes_the_marker(tokenizer):
    ids = tokenizer.encode("1:2+3=5;</think>99", add_special_tokens=False)
    kept, ended = G.cut_at_stop(ids, tokenizer, G.THINK_CLOSE)
    assert ended == "stop" and tokenizer.decode(kept) == "1:2+3=5;</think>"
    kept, ended = G.cut_at_stop(ids[:3] + [tokenizer.eos_token_id] + ids[3:], tokenizer, G.THINK_CLOSE)
    assert ended == "eos" and kept[-1] == tokenizer.eos_token_id and len(kept) == 4


# ------------------------------------------------------------------------------------------------
# bad input gets a clear error
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    (["--thoughts", "1"], "thoughts"), (["--answers", "0"], "answers"),
    (["--answers", "1", "--answer-pool", "thought"], "answer-pool"), (["--temperature", "0"], "temperature"),
    (["--reward", "accuracy,nope"], "nope"), (["--reward-weights", "1,2,3"], "weights"),
    (["--task", "calculus"], "calculus"), (["--kl-schedule", "dynamic", "--steps", "0"], "dynamic"),
])
def test_invalid_settings_are_rejected_with_a_clear_error(flags, message):
    with pytest.raises(ValueError, match=message):
        G.validate_config(G.parse_args(flags))


def nan_reward(prompts, thoughts, answers, examples):
    return [float("nan")] * len(answers)


def short_reward(prompts, thoughts, answers, examples):
    return [1.0] * (len(answers) - 1)


@pytest.mark.parametrize("fn, message", [(nan_reward, "nan_reward.*finite"), (short_reward, "short_reward.*3 values")])
def test_bad_reward_function_is_named_in_the_error(tokenizer, fn, message):
    tree = make_tree(tokenizer, 2, 1)
    tree.answers[:] = ["<answer>1</answer>"] * 4
    examples = [G.make_example(random.Random(0), "addsub")] * 2
    with pytest.raises(ValueError, match=message):
        G.score_answers([(fn, 1.0)], tree, examples, ["", ""], 2, 1)


def test_tokenizer_without_format_markers_is_rejected():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    vocab = {c: i for i, c in enumerate(["<unk>", "<eos>"] + list("0123456789<>/abcdefghijklmnopqrstuvwxyz"))}
    plain = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(vocab, [], unk_token="<unk>")),
                                    unk_token="<unk>", eos_token="<eos>")
    plain.backend_tokenizer.decoder = __import__("tokenizers").decoders.Fuse()
    G.check_format_markers(plain)  # spelled out character by character, the markers survive
    no_markers = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.BPE({c: i for i, c in enumerate(["<unk>", "<eos>"] + list("0123456789"))},
                                              [], unk_token="<unk>")), unk_token="<unk>", eos_token="<eos>")
    with pytest.raises(ValueError, match="format marker '<think>'"):
        G.check_format_markers(no_markers)


def test_resume_with_different_settings_is_refused(tmp_path):
    G.main(tiny_run_args(tmp_path, "--steps", "1"))
    with pytest.raises(ValueError, match="answers"):
        G.main(tiny_run_args(tmp_path, "--steps", "1", "--answers", "3", "--resume"))


# ------------------------------------------------------------------------------------------------
# end to end
# ------------------------------------------------------------------------------------------------
def test_two_step_t2a2_run_writes_metrics_config_checkpoint_and_summary(tmp_path):
    summary = G.main(tiny_run_args(tmp_path))
    lines = read_metrics(tmp_path)
    assert [r["step"] for r in lines] == [0, 1, 2]
    assert all(list(r) == list(G.METRIC_KEYS) for r in lines)
    assert lines[1]["tokens_generated"] > 0 and lines[1]["beta"] == 0.04 and lines[1]["kl"] is not None
    assert lines[2]["eval_greedy_accuracy"] == summary["final_greedy_accuracy"]
    assert json.loads((tmp_path / "config.json").read_text())["answers"] == 2
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 2


def test_kill_and_resume_gives_the_same_final_state(tmp_path, monkeypatch):
    args = ["--steps", "4", "--save-every", "2", "--eval-every", "3"]
    G.main(tiny_run_args(tmp_path / "straight", *args))

    real_step, calls = G.train_step, []

    def killed_at_step_4(*a, **kw):
        calls.append(a[0])
        if a[0] == 4:
            raise KeyboardInterrupt("killed")
        return real_step(*a, **kw)

    monkeypatch.setattr(G, "train_step", killed_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        G.main(tiny_run_args(tmp_path / "killed", *args))
    monkeypatch.setattr(G, "train_step", real_step)
    G.main(tiny_run_args(tmp_path / "killed", *args, "--resume"))  # restarts from the step-2 checkpoint

    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    resumed = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=False)
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "straight")) == strip(read_metrics(tmp_path / "killed"))
    summary = lambda run: {k: v for k, v in json.loads((tmp_path / run / "summary.json").read_text()).items()  # noqa: E731
                           if k != "wall_seconds_this_run"}
    assert summary("straight") == summary("killed")
    G.main(tiny_run_args(tmp_path / "straight", *args, "--resume"))  # resuming a finished run changes nothing
    assert summary("straight") == summary("killed")


def test_real_checkpoint_loads_through_model_flag(tmp_path):
    """The --model path (AutoModelForCausalLM + AutoTokenizer + chat template), on a small Qwen2 saved here."""
    tokenizer = G.build_char_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{% if m.role == 'user' %}{{ m.content }}{% endif %}"
                               "{% endfor %}{% if add_generation_prompt %}=?{% endif %}")
    torch.manual_seed(0)
    G.build_embedded_model(tokenizer).save_pretrained(tmp_path / "qwen")
    tokenizer.save_pretrained(tmp_path / "qwen")
    summary = G.main(tiny_run_args(tmp_path / "run", "--model", str(tmp_path / "qwen"), "--steps", "1"))
    assert summary["steps"] == 1
    loaded = G.load_policy(G.Config(model=str(tmp_path / "qwen")), torch.device("cpu"))[1]
    assert G.format_prompt(loaded, "7+3") == "7+3=?" + G.THINK_OPEN  # built by the chat template
