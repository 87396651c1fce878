"""LoRA through peft, and data-parallel training under torchrun (gloo on the CPU).

The DDP test runs two real processes; each grows the trees of its own prompt, and their averaged gradient must
equal the gradient one process computes over both prompts' trees."""

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import grpo_ma as G
import grpo_ma_run as R

REPO = Path(G.__file__).resolve().parent


def tiny_run(out, *extra):
    args = ["--thoughts", "2", "--answers", "2", "--prompts-per-step", "2", "--warmup-steps", "5"]
    return [*args, "--eval-size", "8", "--eval-every", "1", "--save-every", "1", "--out", str(out), *extra]


def answer_length_reward(prompts, thoughts, answers, examples):
    """Varies with the sampled text, so a step of an untrained policy still has a gradient."""
    return [len(answer) / 10 for answer in answers]


REWARDS = [(answer_length_reward, 1.0)]


def read_metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------
# LoRA
# ------------------------------------------------------------------------------------------------
def test_lora_trains_only_the_adapters_and_its_kl_starts_at_zero(tmp_path):
    cfg = R.parse_args(tiny_run(tmp_path, "--steps", "2", "--lora-rank", "4", "--save-merged"))
    R.train(cfg, reward_fns=[(answer_length_reward, 1.0)])
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
    rewards = [(answer_length_reward, 1.0)]
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


# ------------------------------------------------------------------------------------------------
# DDP under torchrun
# ------------------------------------------------------------------------------------------------
DDP_STEP = """
import sys, torch, torch.distributed as dist
import grpo_ma as G
sys.path.insert(0, sys.argv[2])
from test_lora_ddp import fixed_step_gradient
dist.init_process_group("gloo")
grads = fixed_step_gradient(distributed=True)
if dist.get_rank() == 0:
    torch.save(grads, sys.argv[1])
dist.destroy_process_group()
"""


def fixed_step_gradient(distributed: bool) -> dict:
    """The gradient of one update on fixed rollouts: 2 prompts, T2A2, micro-batch 1. With `distributed`,
    this process takes its rank's prompt and the update goes through DistributedDataParallel."""
    tokenizer = G.build_char_tokenizer()
    torch.manual_seed(0)
    policy = G.build_embedded_model(tokenizer)
    rng = random.Random(0)

    def tokens(n):
        return [tokenizer.convert_tokens_to_ids(str(rng.randint(0, 9))) for _ in range(n)]

    prompts = [tokens(4), tokens(6)]
    thoughts = [[tokens(3), tokens(5)], [tokens(2), tokens(4)]]
    answers = [
        [[tokens(2), tokens(3)], [tokens(1), tokens(4)]],
        [[tokens(3), tokens(2)], [tokens(2), tokens(2)]],
    ]
    forced = [[[], []], [[], []]]
    thought_adv = torch.tensor([[1.0, -1.0], [0.5, -0.5]])
    answer_adv = torch.tensor([[[1.0, -1.0], [0.3, -0.3]], [[-1.0, 1.0], [0.7, -0.7]]])
    keep = [0, 1]
    if distributed:
        keep = [torch.distributed.get_rank()]
    tree = G.Tree(*[[rows[p] for p in keep] for rows in (prompts, thoughts, forced, answers)], [], [])
    thought_adv = thought_adv[keep]
    answer_adv = answer_adv[keep]
    forward = G.TreeForward(policy)
    if distributed:
        forward = torch.nn.parallel.DistributedDataParallel(forward)
    processes = torch.distributed.get_world_size() if distributed else 1
    total = R.sum_over_processes if distributed else None  # the normaliser counts both processes' trees
    weights = G.loss_weights(tree, "token", total=total)
    cfg = G.Config(beta=0.0, temperature=0.7)
    for slots in G.group_rows(tree.thought_slots(), 1):
        batch = G.build_tree_batch(
            tree, slots, thought_adv, answer_adv, weights, tokenizer.pad_token_id, "cpu"
        )
        logps = forward(batch, cfg.temperature)
        loss, _ = G.grpo_ma_loss(logps, logps.detach(), None, batch.advantages, batch.weights, 0.0, cfg)
        (loss * processes).backward()
    return {name: p.grad.clone() for name, p in policy.named_parameters()}


def test_two_gloo_processes_make_the_update_of_one_process_over_both_trees(tmp_path):
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_STEP)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    result = subprocess.run(
        [*command, str(tmp_path / "grads.pt"), str(Path(__file__).parent)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = torch.load(tmp_path / "grads.pt")
    single = fixed_step_gradient(distributed=False)
    assert any(grad.abs().sum() > 0 for grad in single.values())
    for name, grad in single.items():
        torch.testing.assert_close(distributed[name], grad, rtol=1e-5, atol=1e-6)


def test_torchrun_run_writes_one_metrics_line_per_step_and_a_loadable_final_model(tmp_path):
    out = tmp_path / "run"
    flags = ["--device", "cpu", "--thoughts", "2", "--answers", "2", "--steps", "2", "--warmup-steps", "5"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "grpo_ma_run.py"]
    result = subprocess.run(
        [*command, *flags, "--eval-size", "8", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line["step"] for line in read_metrics(out)] == [0, 1, 2]
    assert json.loads((out / "summary.json").read_text())["processes"] == 2
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    reference = torch.load(out / "reference.pt")
    assert set(model.state_dict()) >= set(reference)
