"""LoRA through peft on the embedded model: only the adapters train and the KL starts at zero, a checkpoint
holds the adapter and its optimizer state (the frozen base is saved once), OUT/final loads on its own offline,
a resume on another base is refused, the clipped and logged gradient is the adapters' alone, and a resumed
LoRA run ends bit-exact. A vision-language model's LoRA run is checked in test_qwen2_5_vl.py."""

import dataclasses
import random

import pytest
import torch
from conftest import REWARDS, answer_length, compiled_with, read_metrics
from transformers import AutoModelForCausalLM

import grpo_ma as G
import grpo_ma_run as R


def tiny_run(out, *extra):
    args = ["--thoughts", "2", "--answers", "2", "--prompts-per-step", "2", "--warmup-steps", "5"]
    return [*args, "--eval-size", "8", "--eval-every", "1", "--save-every", "1", "--out", str(out), *extra]


def test_lora_trains_only_the_adapters_and_its_kl_starts_at_zero(tmp_path):
    cfg = R.parse_args(tiny_run(tmp_path, "--steps", "2", "--lora-rank", "4", "--save-merged"))
    R.train(cfg, reward_fns=[(answer_length, 1.0)])
    metrics = read_metrics(tmp_path)
    assert metrics[1]["grad_norm"] > 0
    assert metrics[1]["kl"] == 0.0  # a fresh adapter is a no-op: the policy is its reference
    assert metrics[2]["kl"] > 0  # the adapter has moved

    warmed = G.start_run(cfg)  # the same seeding: the warm-up is deterministic on the CPU
    G.supervised_warmup(warmed, cfg)
    start = warmed.policy.state_dict()
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["model"] and all("lora_" in name for name in saved["model"])  # the adapters alone
    assert any(saved["model"][name].abs().sum() > 0 for name in saved["model"] if "lora_B" in name)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")  # the warmed-up base, saved once
    assert base.state_dict().keys() == start.keys()
    for name, tensor in base.state_dict().items():
        assert torch.equal(tensor, start[name]), name
    assert saved["base"]["model"] == str((tmp_path / "base").resolve())

    assert (tmp_path / "final" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final-merged")
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in warmed.policy.parameters())


def test_lora_checkpoint_is_the_adapter_and_its_optimizer_state_not_the_base(tmp_path):
    """Within twice the bytes of the adapter and its two AdamW moments: the frozen base is not copied into
    every checkpoint (it lives once in OUT/base and is named by a hash of its weights)."""
    R.train(R.parse_args(tiny_run(tmp_path, "--steps", "1", "--lora-rank", "4")))
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    adapter_bytes = sum(t.numel() * t.element_size() for t in saved["model"].values())
    assert (tmp_path / "checkpoint.pt").stat().st_size <= 2 * 3 * adapter_bytes
    assert len(saved["base"]["sha256"]) == 64


def test_final_adapter_loads_on_its_own_offline_and_scores_as_the_trained_policy(tmp_path, no_network):
    """OUT/final names the base it belongs on (for the embedded default: the warmed-up weights in OUT/base),
    so peft's AutoPeftModelForCausalLM loads the trained policy from OUT/final alone."""
    from peft import AutoPeftModelForCausalLM

    R.train(R.parse_args(tiny_run(tmp_path, "--steps", "2", "--lora-rank", "4")), reward_fns=REWARDS)
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"]
    weights = loaded.state_dict()
    for name, tensor in saved.items():
        assert torch.equal(weights[name], tensor), name
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    ids = torch.tensor([G.build_char_tokenizer().encode("2+3-1=?<think>1:2+3=5;")])
    with torch.no_grad():
        assert not torch.allclose(loaded(input_ids=ids).logits, base(input_ids=ids).logits)


def test_resume_on_another_base_is_refused(tmp_path, capsys):
    R.train(R.parse_args(tiny_run(tmp_path, "--steps", "1", "--lora-rank", "4")))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    with torch.no_grad():
        base.model.norm.weight.add_(0.01)
    base.save_pretrained(tmp_path / "base")
    with pytest.raises(SystemExit):
        R.main(tiny_run(tmp_path, "--steps", "2", "--lora-rank", "4", "--resume"))
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: --resume: the base model is not the one") and "checkpoint.pt" in line


def constant_reward(prompts, thoughts, answers, examples):
    return [1.0 for _ in answers]


def test_lora_after_a_warm_up_clips_and_logs_only_the_adapters_gradient(tmp_path):
    """Equal rewards give every advantage 0, and a fresh adapter gives KL 0: the true gradient is 0. The
    base weights' last warm-up gradients must not show up in grad_norm or scale the clipping."""
    cfg = R.parse_args(tiny_run(tmp_path, "--steps", "2", "--lora-rank", "4"))
    R.train(cfg, reward_fns=[(constant_reward, 1.0)])
    assert [record["grad_norm"] for record in read_metrics(tmp_path)[1:]] == [0.0, 0.0]


def test_lora_run_resumed_from_a_checkpoint_ends_bit_exact(tmp_path):
    rewards = [(answer_length, 1.0)]
    R.train(
        R.parse_args(tiny_run(tmp_path / "straight", "--steps", "3", "--lora-rank", "4")), reward_fns=rewards
    )
    R.train(
        R.parse_args(tiny_run(tmp_path / "parts", "--steps", "2", "--lora-rank", "4")), reward_fns=rewards
    )
    resumed = R.parse_args(tiny_run(tmp_path / "parts", "--steps", "3", "--lora-rank", "4", "--resume"))
    R.train(resumed, reward_fns=rewards)
    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    parts = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=True)
    assert read_metrics(tmp_path / "straight")[3]["grad_norm"] > 0
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, parts["model"][name]), name
    for slot, moments in straight["optimizer"]["state"].items():
        assert torch.equal(moments["exp_avg"], parts["optimizer"]["state"][slot]["exp_avg"])


def test_adapters_scale_their_update_by_alpha_over_rank():
    """A LoRA layer adds (alpha / r) * B A x to its base output: with B and A set by hand, the layer's output
    minus the adapter-off output is exactly that product, here at alpha / r = 24 / 4 = 6."""
    cfg = G.Config(lora_rank=4, lora_alpha=24, device="cpu")
    tokenizer = G.build_char_tokenizer()
    torch.manual_seed(0)
    model = G.add_lora(G.build_embedded_model(tokenizer), cfg)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight  # (r, in), (out, r)
    with torch.no_grad():
        a.copy_(torch.randn_like(a))
        b.copy_(torch.randn_like(b))
        x = torch.randn(3, a.shape[1])
        with model.disable_adapter():
            base = layer(x)
        torch.testing.assert_close(layer(x) - base, 6.0 * x @ a.T @ b.T, rtol=1e-4, atol=1e-4)


def test_lora_base_is_stored_in_bf16_where_forwards_run_in_bf16(tmp_path):
    """--precision bf16 (CUDA's default): nothing updates the frozen base, so it is held in bf16, half the
    memory; the adapters and their AdamW moments stay float32, and the step still trains them."""
    cfg = G.Config(
        thoughts=2, answers=2, prompts_per_step=2, steps=1, warmup_steps=3, eval_size=4, device="cpu"
    )
    cfg = dataclasses.replace(cfg, precision="bf16", lora_rank=4, out=str(tmp_path))
    run = G.start_run(cfg, reward_fns=REWARDS)
    G.add_adapters(run, cfg, tmp_path)
    base = {name: p for name, p in run.policy.named_parameters() if not p.requires_grad}
    adapters = {name: p for name, p in run.policy.named_parameters() if p.requires_grad}
    assert base and all(p.dtype == torch.bfloat16 for p in base.values())
    assert adapters and all(p.dtype == torch.float32 and "lora_" in name for name, p in adapters.items())
    before = {name: p.detach().clone() for name, p in adapters.items()}
    optimizer = torch.optim.AdamW(adapters.values(), lr=1e-2)
    record = G.train_step(1, run, optimizer, G.Progress(), run.policy, cfg)
    assert record["grad_norm"] > 0 and record["kl"] is not None
    assert any(not torch.equal(before[name], p) for name, p in adapters.items())
    assert all(
        m.dtype == torch.float32 for state in optimizer.state.values() for m in state.values() if m.dim()
    )


@pytest.mark.parametrize("backend", [None, "eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_lora_rollouts_come_from_the_current_adapters_folded_into_a_copy_of_the_base(
    tmp_path, monkeypatch, backend
):
    """Rollouts run on a plain copy of the base with (alpha / r) B A added to each adapted weight, refreshed
    from the adapters at each call: after the adapters change, its greedy and seeded sampled trees equal the
    adapter-on policy's token for token, and differ from the adapter-off base's (the KL reference). With
    compiled decoding (`backend`) too: the copy is rewritten in place, so the graphs compiled before the
    change read the new weights."""
    cfg = G.Config(lora_rank=4, warmup_steps=0, max_thought_tokens=12, max_answer_tokens=6, device="cpu")
    run = G.start_run(cfg)
    G.add_adapters(run, cfg, tmp_path)
    sampler = G.rollout_policy(run)  # folded from the fresh adapters, which are about to change
    assert sampler is not run.policy and not any(p.requires_grad for p in sampler.parameters())
    examples = G.sample_examples(random.Random(0), "addsub", 6, held_out=True)
    _, prompt_ids, _ = G.encode_prompts(run.tokenizer, examples)
    caches = None
    if backend:
        compiled_with(backend, monkeypatch)
        caches = G.StaticCaches(sampler.config)
        G.sample_tree(sampler, run.tokenizer, prompt_ids, 2, 2, cfg, False, None, caches)  # compiled here
    with torch.no_grad():
        for name, parameter in run.policy.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.3)

    def tree(model, do_sample, caches=None):
        torch.manual_seed(1)
        tree = G.sample_tree(model, run.tokenizer, prompt_ids, 2, 2, cfg, do_sample, None, caches)
        return tree.thought_ids, tree.answer_ids

    for do_sample in (False, True):
        assert tree(G.rollout_policy(run), do_sample, caches) == tree(run.policy, do_sample)
    with run.policy.disable_adapter():
        assert tree(run.policy, False) != tree(G.rollout_policy(run), False, caches)
