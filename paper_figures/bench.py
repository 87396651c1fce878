"""Cost of the GRPO-MA update: the tree update of grpo_ma.py against the flat one-row-per-answer update.

    python -m paper_figures.bench                  # the full setting (27 min on a shared 2-core CPU)
    python -m paper_figures.bench --fast           # shorter lengths, fewer repetitions, a short warm-up
    python -m paper_figures.bench --device cuda    # on a CUDA machine: bf16 autocast, CUDA peak memory
    python -m paper_figures.bench --redraw         # bench.md and the figure again from bench.json

Writes RESULTS/bench.json (every number with its settings), RESULTS/bench.md (the tables) and OUT/bench.png
and .pdf. A run on one device replaces that device's block of bench.json and keeps the other's.

1. Update cost, flat vs tree, for T16A1, T4A1, T4A4, T4A8, T2A8 on the same synthetic rollouts: the flat
   update forwards one right-padded row prompt + thought + answer per answer, all rows in one batch, and
   takes log_softmax of the full float32 logits (B, T, V); the tree update is grpo_ma's own
   (loss_weights, build_tree_batch, tree_logprobs, grpo_ma_loss, as train_step calls them). Both are run on
   the embedded default model and on a random-weight model of Qwen2.5-0.5B's exact shape.
2. Whole-step seconds (grpo_ma.train_step's rollout_seconds and train_seconds) on the embedded default.
3. Peak update memory against prompts per step at micro-batch 1 (2-layer copy of the 0.5B shape).
4. A formula for the tree update's peak at micro-batch 1, next to the measurement.

Every memory number is measured in a fresh child process, one at a time: on the CPU the peak resident set
size (ru_maxrss), on CUDA torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import hashlib
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import grpo_ma as G
from paper_figures import common

CONFIGS = ((16, 1), (4, 1), (4, 4), (4, 8), (2, 8))  # (K, M): T{K}A{M}
QWEN05 = dict(
    vocab_size=151_936,
    hidden_size=896,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    intermediate_size=4_864,
    tie_word_embeddings=True,
    max_position_embeddings=32_768,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    pad_token_id=151_643,  # Qwen2.5's <|endoftext|>; only padding, the masks say what counts
)
# a model small enough for the tests: the code path is the same, only the sizes differ
TINY = dict(
    vocab_size=97,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=64,
    tie_word_embeddings=True,
    max_position_embeddings=256,
    pad_token_id=0,
)
MODELS = {
    "embedded": "grpo_ma's embedded default Qwen2",
    "qwen2.5-0.5b": "Qwen2.5-0.5B's exact config, random weights",
    "qwen2.5-0.5b-2layers": "Qwen2.5-0.5B's config with 2 layers, full vocabulary, random weights",
    "tiny": "a tiny Qwen2 (the tests)",
}
ADAMW_LR = 5e-5  # grpo_ma.Config's lr; the update never steps, the optimizer is there for its state
RESULT_PREFIX = "BENCH_RESULT "
KIB = 1024
GIB = 1024**3
# a flat and a tree loss agree to float rounding; anything larger means the two compute different things
AGREEMENT_TOLERANCE = {"cpu": 1e-3, "cuda": 5e-2}  # bf16 autocast on CUDA rounds far more


# ------------------------------------------------------------------------------------------------
# what is measured
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting:
    """One model at one set of lengths: every configuration sees `prompts` prompts of prompt_len tokens, K
    thoughts of thought_len and K*M answers of answer_len (fixed lengths: every rollout at its budget)."""

    name: str
    model: str
    prompt_len: int
    thought_len: int
    answer_len: int
    prompts: int
    runs: tuple[tuple[int, int, tuple[int, ...]], ...]  # (K, M, tree micro-batches; 0: all thoughts at once)
    flat: bool  # run the flat reference too (False where it cannot fit in memory)
    flat_checkpointing: bool  # the flat path with model.gradient_checkpointing_enable()
    warmup_reps: int
    reps: int
    note: str = ""


@dataclass(frozen=True)
class Sweep:
    """Peak update memory against prompts per step for one (K, M)."""

    model: str
    prompt_len: int
    thought_len: int
    answer_len: int
    config: tuple[int, int]
    prompts: tuple[int, ...]
    flat_prompts: tuple[int, ...]  # the flat update's logits grow with the prompts: only the ones that fit
    tree_micro_batch: int
    flat_checkpointing: bool


@dataclass(frozen=True)
class Plan:
    name: str
    settings: tuple[Setting, ...]
    sweep: Sweep | None
    whole_step_warmup: int  # supervised warm-up steps before the whole-step measurement
    whole_step_steps: int  # train_steps per configuration; the median is reported
    whole_step_prompts: int = G.Config().prompts_per_step
    whole_step_model: str = "embedded"


def embedded_setting(warmup_reps: int, reps: int) -> Setting:
    cfg = G.Config()
    return Setting(
        name="embedded",
        model="embedded",
        prompt_len=10,  # "2+9-6=?<think>" and its like: 10 to 12 characters
        thought_len=cfg.max_thought_tokens,
        answer_len=cfg.max_answer_tokens,
        prompts=cfg.prompts_per_step,
        runs=tuple((k, m, (cfg.micro_batch,)) for k, m in CONFIGS),
        flat=True,
        flat_checkpointing=False,  # grpo_ma's embedded default never checkpointed
        warmup_reps=warmup_reps,
        reps=reps,
    )


def qwen_setting(lengths: tuple[int, int, int]) -> Setting:
    return Setting(
        name="qwen2.5-0.5b",
        model="qwen2.5-0.5b",
        prompt_len=lengths[0],
        thought_len=lengths[1],
        answer_len=lengths[2],
        prompts=1,
        runs=((16, 1, (0,)), (4, 4, (0, 1))),
        flat=True,
        flat_checkpointing=True,  # as the GSM8K demo's old flat update ran
        warmup_reps=0,
        reps=1,
        note="Shorter than GSM8K: on this CPU one 0.5B update takes minutes, and the flat update's float32 "
        "logits of 16 full rows must fit under the memory cap next to 8 GB of weights and AdamW moments.",
    )


GSM8K_SETTING = dataclasses.replace(
    qwen_setting((100, 256, 32)),
    name="qwen2.5-0.5b-gsm8k",
    runs=((4, 4, (1,)),),
    flat=False,
    note="GSM8K-like lengths (--gsm8k); the tree at micro-batch 1 only: the flat update would not fit.",
)

PLANS = {
    "full": Plan(
        name="full",
        settings=(embedded_setting(1, 5), qwen_setting((16, 32, 8))),
        sweep=Sweep("qwen2.5-0.5b-2layers", 8, 16, 4, (4, 4), (1, 2, 4, 8), (1, 2), 1, True),
        whole_step_warmup=G.Config().warmup_steps,
        whole_step_steps=5,
    ),
    "fast": Plan(
        name="fast",
        settings=(embedded_setting(0, 2), qwen_setting((8, 16, 4))),
        sweep=Sweep("qwen2.5-0.5b-2layers", 4, 8, 2, (4, 4), (1, 2, 4, 8), (1,), 1, True),
        whole_step_warmup=100,
        whole_step_steps=2,
    ),
}


def label(k: int, m: int) -> str:
    return f"T{k}A{m}"


# ------------------------------------------------------------------------------------------------
# models and synthetic rollouts
# ------------------------------------------------------------------------------------------------
def build_model(name: str, seed: int = 0):
    """(model in float32, vocab size, pad id). The same seed gives the same weights in every process, so the
    flat and the tree child processes differentiate the very same function."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    if name == "embedded":
        tokenizer = G.build_char_tokenizer()
        return G.build_embedded_model(tokenizer), len(tokenizer), tokenizer.pad_token_id
    if name == "tiny":
        config = Qwen2Config(**TINY)
    elif name == "qwen2.5-0.5b":
        config = Qwen2Config(**QWEN05)
    elif name == "qwen2.5-0.5b-2layers":
        config = Qwen2Config(**(QWEN05 | {"num_hidden_layers": 2}))
    else:
        raise ValueError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    return Qwen2ForCausalLM(config), config.vocab_size, config.pad_token_id


def synthetic_tree(
    prompts: int, k: int, m: int, lengths: tuple[int, int, int], vocab: int, pad_id: int, seed: int = 0
):
    """A grpo_ma.Tree of random token ids at fixed lengths (prompt, thought, answer), every thought closed by
    its own sampled marker (no forced close), and random advantages (P, K), (P, K, M). The pad id never
    occurs, so no real token is mistaken for padding."""
    gen = torch.Generator().manual_seed(seed)

    def ids(n: int) -> list[int]:
        drawn = torch.randint(0, vocab - 1, (n,), generator=gen)
        return (drawn + (drawn >= pad_id).long()).tolist()

    prompt_len, thought_len, answer_len = lengths
    prompt_ids = [ids(prompt_len) for _ in range(prompts)]
    thought_ids = [[ids(thought_len) for _ in range(k)] for _ in range(prompts)]
    forced = [[[] for _ in range(k)] for _ in range(prompts)]
    answer_ids = [[[ids(answer_len) for _ in range(m)] for _ in range(k)] for _ in range(prompts)]
    thoughts = [[""] * k for _ in range(prompts)]
    answers = [[[""] * m for _ in range(k)] for _ in range(prompts)]
    tree = G.Tree(prompt_ids, thought_ids, forced, answer_ids, thoughts, answers)
    thought_adv = torch.randn(prompts, k, generator=gen)
    answer_adv = torch.randn(prompts, k, m, generator=gen)
    return tree, thought_adv, answer_adv


def loss_config(k: int, m: int, prompts: int, micro_batch: int, lengths: tuple[int, int, int]) -> G.Config:
    """grpo_ma's defaults (token mean, beta 0.04, temperature 1, mu = 1) for this tree, whose lengths are
    the budgets."""
    budgets = dict(max_thought_tokens=lengths[1], max_answer_tokens=lengths[2])
    return G.Config(thoughts=k, answers=m, prompts_per_step=prompts, micro_batch=micro_batch, **budgets)


def step_weights(tree: G.Tree, cfg: G.Config):
    """The loss weights as train_step computes them (every answer counted: no answer is truncated here)."""
    return G.loss_weights(tree, cfg.loss_agg, None, cfg.max_thought_tokens + cfg.max_answer_tokens)


def uniform_reference(n: int, vocab: int, device) -> torch.Tensor:
    """Reference log-probs of a uniform policy, log(1/V) per token: a fixed, cheap reference that makes the
    KL term (and so the loss value) depend on every log-prob, with no reference forward to time."""
    return torch.full((n,), -math.log(vocab), device=device)


# ------------------------------------------------------------------------------------------------
# the two updates
# ------------------------------------------------------------------------------------------------
def tree_batches(tree: G.Tree, thought_adv, answer_adv, cfg: G.Config, pad_id: int, device):
    """train_step's micro-batches: weights over the whole step, then one TreeBatch per micro-batch."""
    weights = step_weights(tree, cfg)
    parts = G.group_rows(tree.thought_slots(), cfg.micro_batch or len(tree.thought_slots()))
    return [
        G.build_tree_batch(tree, part, thought_adv, answer_adv, weights, pad_id, device) for part in parts
    ]


def tree_update(model, batches, cfg: G.Config, vocab: int) -> tuple[float, torch.Tensor]:
    """train_step's update loop (mu = 1: old = detached current): per micro-batch tree_logprobs,
    grpo_ma_loss, backward. Returns the step's loss and the log-probs, thoughts first, then answers."""
    beta = G.kl_beta(1, cfg.steps, cfg)
    total = 0.0
    thought_parts, answer_parts = [], []
    for batch in batches:
        logps = G.tree_logprobs(model, batch, cfg.temperature)
        ref = uniform_reference(len(logps), vocab, logps.device)
        loss, _ = G.grpo_ma_loss(logps, logps.detach(), ref, batch.advantages, batch.weights, beta, cfg)
        loss.backward()
        total += loss.item()
        n_thought = int(batch.thought_mask.sum())
        thought_parts.append(logps.detach()[:n_thought])
        answer_parts.append(logps.detach()[n_thought:])
    return total, torch.cat(thought_parts + answer_parts)


@dataclass
class FlatBatch:
    """Every answer as its own right-padded row prompt + thought + answer; `rows`, `cols` pick the logit
    position that scores each counted token, in the tree's order: each thought once (from its first answer's
    row), then every answer token."""

    ids: torch.Tensor  # (A, L)
    mask: torch.Tensor  # (A, L)
    rows: torch.Tensor  # (N,)
    cols: torch.Tensor  # (N,) position t - 1 scores token t
    advantages: torch.Tensor  # (N,)
    weights: torch.Tensor  # (N,)


def flat_batch(tree: G.Tree, thought_adv, answer_adv, cfg: G.Config, pad_id: int, device) -> FlatBatch:
    thought_weights, answer_weights = step_weights(tree, cfg)
    answers = tree.answer_slots()
    row_of = {slot: i for i, slot in enumerate(answers)}
    rows = [tree.prefix(p, k) + tree.answer_ids[p][k][m] for p, k, m in answers]
    picks = []  # (row, logit position, advantage, weight)
    for p, k in tree.thought_slots():
        start = len(tree.prompt_ids[p])
        for t in range(len(tree.thought_ids[p][k])):
            picks.append((row_of[(p, k, 0)], start + t - 1, thought_adv[p, k].item(), thought_weights[p][k]))
    for p, k, m in answers:
        start = len(tree.prefix(p, k))
        for t in range(len(tree.answer_ids[p][k][m])):
            picks.append(
                (row_of[(p, k, m)], start + t - 1, answer_adv[p, k, m].item(), answer_weights[p][k][m])
            )
    row_idx, col_idx, adv, weight = zip(*picks)
    return FlatBatch(
        ids=torch.tensor(G.right_pad(rows, pad_id), device=device),
        mask=torch.tensor(G.right_pad([[1] * len(r) for r in rows], 0), device=device),
        rows=torch.tensor(row_idx, device=device),
        cols=torch.tensor(col_idx, device=device),
        advantages=torch.tensor(adv, dtype=torch.float32, device=device),
        weights=torch.tensor(weight, dtype=torch.float32, device=device),
    )


def flat_update(model, batch: FlatBatch, cfg: G.Config, vocab: int) -> tuple[float, torch.Tensor]:
    """The old flat update: all rows in one forward, log_softmax of the full float32 logits (A, L, V), the
    counted tokens picked from it, the same loss, one backward."""
    beta = G.kl_beta(1, cfg.steps, cfg)
    logits = model(input_ids=batch.ids, attention_mask=batch.mask, use_cache=False).logits
    logps_all = torch.log_softmax(logits.float() / cfg.temperature, dim=-1)  # (A, L, V) float32
    token_logps = logps_all[:, :-1].gather(-1, batch.ids[:, 1:, None]).squeeze(-1)  # (A, L - 1)
    logps = token_logps[batch.rows, batch.cols]
    ref = uniform_reference(len(logps), vocab, logps.device)
    loss, _ = G.grpo_ma_loss(logps, logps.detach(), ref, batch.advantages, batch.weights, beta, cfg)
    loss.backward()
    return loss.item(), logps.detach()


# ------------------------------------------------------------------------------------------------
# one measurement (in a fresh child process)
# ------------------------------------------------------------------------------------------------
def proc_status_kib(field_name: str, pid: str = "self") -> int | None:
    """A field of /proc/PID/status in KiB (VmRSS, VmHWM), or None off Linux."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux >= 4.0), so that ru_maxrss afterwards is the
    peak of what follows, not of the model's construction; False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def materialise_adamw_state(optimizer: torch.optim.AdamW) -> None:
    """The two AdamW moments of every parameter, as AdamW creates them at its first step, without taking a
    step: a step would allocate temporaries and gradients that would set the peak before the update."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            optimizer.state[p] = {
                "step": torch.tensor(0.0),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure_update(spec: dict) -> dict:
    """Build the model, its AdamW state and the inputs, then time `warmup_reps + reps` updates (forward and
    backward over the whole step; batch building, reference and optimizer.step excluded) and record the
    peak memory of the updates. Returns the numbers and the log-probs for the flat/tree agreement check."""
    # torch is imported, nothing is built yet (transformers is imported with the model)
    rss_at_start = proc_status_kib("VmRSS")
    device = torch.device(spec["device"])
    torch.set_num_threads(spec.get("threads") or len(os.sched_getaffinity(0)))
    model, vocab, pad_id = build_model(spec["model"], spec.get("seed", 0))
    model.to(device).train()
    parameters = sum(p.numel() for p in model.parameters())
    checkpointing = spec["path"] == "flat" and spec["checkpointing"]
    if checkpointing:  # transformers >= 5 names gradient_checkpointing_enable so; the older name warns
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    optimizer = torch.optim.AdamW(model.parameters(), lr=ADAMW_LR, weight_decay=0.0)
    materialise_adamw_state(optimizer)
    k, m, prompts = spec["k"], spec["m"], spec["prompts"]
    lengths = (spec["prompt_len"], spec["thought_len"], spec["answer_len"])
    tree, thought_adv, answer_adv = synthetic_tree(prompts, k, m, lengths, vocab, pad_id, spec.get("seed", 0))
    cfg = loss_config(k, m, prompts, spec["micro_batch"], lengths)
    if spec["path"] == "flat":
        batch = flat_batch(tree, thought_adv, answer_adv, cfg, pad_id, device)
        forwarded = batch.ids.numel()
        lm_head_rows = forwarded

        def update():
            return flat_update(model, batch, cfg, vocab)
    else:
        batches = tree_batches(tree, thought_adv, answer_adv, cfg, pad_id, device)
        forwarded = sum(b.prefix_ids.numel() + b.answer_ids[:, :-1].numel() for b in batches)
        lm_head_rows = sum(lm_head_positions(b) for b in batches)

        def update():
            return tree_update(model, batches, cfg, vocab)

    gc.collect()
    synchronize(device)
    start_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peak_reset = reset_peak_rss()
    baseline_kib = proc_status_kib("VmRSS")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        cuda_baseline = torch.cuda.memory_allocated()
    seconds, cpu_seconds = [], []
    load_before = os.getloadavg()[0]
    for rep in range(spec["warmup_reps"] + spec["reps"]):
        optimizer.zero_grad(set_to_none=True)  # as train_step: the gradients are made by the update
        synchronize(device)
        started, cpu_started = time.perf_counter(), time.process_time()
        with G.forward_precision(cfg, device):  # no optimizer step inside: see grpo_ma.forward_precision
            loss, logps = update()
        synchronize(device)
        if rep >= spec["warmup_reps"]:
            seconds.append(time.perf_counter() - started)
            cpu_seconds.append(time.process_time() - cpu_started)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grads = [p.grad.float().pow(2).sum() for p in model.parameters() if p.grad is not None]
    result = {
        "seconds": statistics.median(seconds),
        "seconds_all": seconds,
        "cpu_seconds": statistics.median(cpu_seconds),
        "load_average": [load_before, os.getloadavg()[0]],
        "parameters": parameters,
        "vocab": vocab,
        "gradient_checkpointing": checkpointing,
        "forwarded_tokens": forwarded,
        "lm_head_rows": lm_head_rows,
        "counted_tokens": len(logps),
        "torch_threads": torch.get_num_threads(),
        "loss": loss,
        "grad_norm": torch.stack(grads).sum().sqrt().item(),
        "logps": logps.cpu().tolist(),
        "peak_rss_kib": peak_kib,
        "peak_hwm_kib": proc_status_kib("VmHWM"),
        "baseline_rss_kib": baseline_kib,
        "peak_minus_baseline_kib": None if baseline_kib is None else peak_kib - baseline_kib,
        "maxrss_before_update_kib": start_maxrss,
        "peak_reset": peak_reset,
        "rss_at_start_kib": rss_at_start,
        "cuda_peak_bytes": None,
        "cuda_baseline_bytes": None,
        "cuda_peak_minus_baseline_bytes": None,
    }
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated()
        result |= {"cuda_peak_bytes": peak, "cuda_baseline_bytes": cuda_baseline}
        result["cuda_peak_minus_baseline_bytes"] = peak - cuda_baseline
    return result


def lm_head_positions(batch: G.TreeBatch) -> int:
    """Rows tree_logprobs sends through the LM head: the kept prefix positions and the answer inputs."""
    width = batch.prefix_ids.shape[1]
    first = int(batch.thought_mask.int().argmax(-1).masked_fill(~batch.thought_mask.any(-1), width).min())
    keep = width - max(first - 1, 0)
    return batch.prefix_ids.shape[0] * keep + batch.answer_ids[:, :-1].numel()


def measure_whole_steps(spec: dict) -> dict:
    """One supervised warm-up (grpo_ma.start_run + supervised_warmup), then for each configuration a fresh
    AdamW and Progress from the same warm weights, the same prompts and the same sampling seed, and `steps`
    grpo_ma.train_steps with the frozen warm policy as the KL reference, as grpo_ma.train runs them."""
    import copy

    device_name = spec["device"]
    torch.set_num_threads(spec.get("threads") or len(os.sched_getaffinity(0)))
    base = G.Config(device=device_name, warmup_steps=spec["warmup_steps"], steps=spec["steps"], seed=0)
    base = dataclasses.replace(base, prompts_per_step=spec.get("prompts_per_step", base.prompts_per_step))
    run = G.start_run(base)
    started = time.perf_counter()
    G.supervised_warmup(run, base)
    warmup_seconds = time.perf_counter() - started
    warm = copy.deepcopy(run.policy.state_dict())
    reference = copy.deepcopy(run.policy).eval().requires_grad_(False)
    data_state = run.data_rng.getstate()
    rows = []
    for k, m in spec["configs"]:
        cfg = dataclasses.replace(base, thoughts=k, answers=m)
        run.policy.load_state_dict(warm)
        run.data_rng.setstate(data_state)
        torch.manual_seed(1)
        optimizer = torch.optim.AdamW(run.policy.parameters(), lr=cfg.lr, weight_decay=0.0)
        state = G.Progress()
        records, cpu = [], []
        for step in range(1, cfg.steps + 1):
            cpu_started = time.process_time()
            records.append(G.train_step(step, run, optimizer, state, reference, cfg))
            cpu.append(time.process_time() - cpu_started)
        rollout = [r["rollout_seconds"] for r in records]
        train = [r["train_seconds"] for r in records]
        rows.append(
            {
                "config": label(k, m),
                "k": k,
                "m": m,
                "rollout_seconds": statistics.median(rollout),
                "train_seconds": statistics.median(train),
                "step_seconds": statistics.median([a + b for a, b in zip(rollout, train)]),
                "step_cpu_seconds": statistics.median(cpu),
                "rollout_seconds_all": rollout,
                "train_seconds_all": train,
                "tokens_generated": statistics.median(r["tokens_generated"] for r in records),
            }
        )
    return {
        "warmup_steps": spec["warmup_steps"],
        "warmup_seconds": warmup_seconds,
        "steps": spec["steps"],
        "prompts_per_step": base.prompts_per_step,
        "micro_batch": base.micro_batch,
        "torch_threads": torch.get_num_threads(),
        "rows": rows,
    }


def child_main(spec_path: str, out_path: str) -> None:
    """Entry point of a child process: one measurement, its result as JSON into out_path."""
    spec = json.loads(Path(spec_path).read_text())
    result = measure_whole_steps(spec) if spec["kind"] == "whole" else measure_update(spec)
    Path(out_path).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------
# running the children
# ------------------------------------------------------------------------------------------------
def run_isolated(spec: dict, cap_kib: int | None, timeout_s: float, isolate: bool = True) -> dict:
    """`spec` measured in a fresh child process, killed if its resident size passes cap_kib (the machine
    is shared) or it runs past timeout_s; {"error": why} then. isolate=False measures in this process
    (the tests: fast, but its memory numbers include everything this process holds)."""
    if not isolate:
        return measure_whole_steps(spec) if spec["kind"] == "whole" else measure_update(spec)
    with tempfile.TemporaryDirectory(prefix="bench_") as folder:
        spec_path, out_path, log_path = (Path(folder) / n for n in ("spec.json", "out.json", "log.txt"))
        spec_path.write_text(json.dumps(spec))
        command = [sys.executable, "-m", "paper_figures.bench", "--child", str(spec_path), str(out_path)]
        started = time.time()
        with log_path.open("w") as log:
            child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
            why = None
            while child.poll() is None:
                rss = proc_status_kib("VmRSS", str(child.pid))
                if cap_kib is not None and rss is not None and rss > cap_kib:
                    why = (
                        f"killed: resident size {rss / KIB**2:.1f} GiB passed the cap {cap_kib / KIB**2:.1f}"
                    )
                elif time.time() - started > timeout_s:
                    why = f"killed: ran past {timeout_s:.0f} s"
                if why:
                    child.kill()
                    child.wait()
                    break
                time.sleep(0.1)
        if why is None and child.returncode != 0:
            tail = log_path.read_text().strip().splitlines()[-3:]
            why = f"child failed (exit {child.returncode}): " + " | ".join(tail)
        if why is not None:
            return {"error": why, "wall_seconds": time.time() - started}
        result = json.loads(out_path.read_text())
        return result | {"wall_seconds": time.time() - started}


# ------------------------------------------------------------------------------------------------
# the plan, one child process at a time
# ------------------------------------------------------------------------------------------------
def update_spec(
    model: str, lengths, k: int, m: int, prompts: int, path: str, micro_batch: int, **run
) -> dict:
    prompt_len, thought_len, answer_len = lengths
    spec = dict(kind="update", model=model, prompt_len=prompt_len, thought_len=thought_len)
    spec |= dict(answer_len=answer_len, k=k, m=m, prompts=prompts, path=path, micro_batch=micro_batch)
    return spec | {"seed": 0} | run


def setting_lengths(setting: Setting | Sweep) -> tuple[int, int, int]:
    return setting.prompt_len, setting.thought_len, setting.answer_len


def agreement(flat: dict, tree: dict, device_type: str) -> dict:
    """Max relative difference between the flat and the tree update of the same step: per-token log-probs,
    the loss and the gradient norm (the loss value alone is nearly blind to the log-probs at mu = 1)."""
    a, b = tree["logps"], flat["logps"]
    if len(a) != len(b):
        return {"ok": False, "reason": f"{len(a)} tree tokens against {len(b)} flat tokens"}
    logp_abs = max(abs(x - y) for x, y in zip(a, b))
    logp_rel = max(abs(x - y) / max(abs(y), 1e-6) for x, y in zip(a, b))
    loss_rel = abs(tree["loss"] - flat["loss"]) / max(abs(flat["loss"]), 1e-12)
    grad_rel = abs(tree["grad_norm"] - flat["grad_norm"]) / max(abs(flat["grad_norm"]), 1e-12)
    worst = max(logp_rel, loss_rel, grad_rel)
    tolerance = AGREEMENT_TOLERANCE[device_type]
    return {
        "logp_max_abs_diff": logp_abs,
        "logp_max_rel_diff": logp_rel,
        "loss_rel_diff": loss_rel,
        "grad_norm_rel_diff": grad_rel,
        "max_rel_diff": worst,
        "tolerance": tolerance,
        "ok": worst <= tolerance,
    }


def tree_formula(parameters: int, m: int, thought_len: int, answer_len: int, vocab: int, device_type: str):
    """Expected peak of the tree update at micro-batch 1, in bytes: float32 weights, gradients and the two
    AdamW moments (16 bytes a parameter), one micro-batch's logits ((prefix positions kept + M x answer
    length) x vocab, in the compute dtype) and one float32 chunk of selected_logprobs."""
    logit_bytes = 2 if device_type == "cuda" else 4  # bf16 autocast on CUDA
    kept = thought_len + 1  # from the position before the first thought token to the prefix's end
    chunk_rows = min(max(thought_len, m * answer_len), max(1, 2**26 // vocab))
    terms = {
        "weights": 4 * parameters,
        "gradients": 4 * parameters,
        "adamw_moments": 8 * parameters,
        "logits": (kept + m * answer_len) * vocab * logit_bytes,
        "float32_chunk": chunk_rows * vocab * 4,
    }
    return {"terms_bytes": terms, "total_bytes": sum(terms.values()), "logit_bytes": logit_bytes}


def peak_bytes(result: dict | None, device_type: str, delta: bool = False) -> int | None:
    """The peak of a measurement in bytes: ru_maxrss on the CPU, max_memory_allocated on CUDA; with `delta`,
    minus the resident size (allocated bytes) just before the update."""
    if not result or "error" in result:
        return None
    if device_type == "cuda":
        return result["cuda_peak_minus_baseline_bytes" if delta else "cuda_peak_bytes"]
    kib = result["peak_minus_baseline_kib" if delta else "peak_rss_kib"]
    return None if kib is None else kib * KIB


def stripped(result: dict | None) -> dict | None:
    """A measurement as bench.json keeps it: without the per-token log-probs."""
    return None if result is None else {k: v for k, v in result.items() if k != "logps"}


def say(quiet: bool, text: str) -> None:
    if not quiet:
        print(text, flush=True)


def run_settings(plan: Plan, run: dict, measure, quiet: bool) -> list[dict]:
    """Section 1: every setting and configuration, flat and tree, one child each."""
    rows = []
    for setting in plan.settings:
        lengths = setting_lengths(setting)
        reps = dict(warmup_reps=setting.warmup_reps, reps=setting.reps)
        for k, m, micro_batches in setting.runs:
            common_args = (setting.model, lengths, k, m, setting.prompts)
            flat = None
            if setting.flat:
                spec = update_spec(*common_args, "flat", 0, checkpointing=setting.flat_checkpointing, **reps)
                flat = measure(spec | run)
                say(quiet, f"  {setting.name} {label(k, m)} flat: {brief(flat)}")
            for micro_batch in micro_batches:
                spec = update_spec(*common_args, "tree", micro_batch, checkpointing=False, **reps)
                tree = measure(spec | run)
                say(quiet, f"  {setting.name} {label(k, m)} tree micro-batch {micro_batch}: {brief(tree)}")
                check = None
                if flat and tree and "error" not in flat and "error" not in tree:
                    check = agreement(flat, tree, run["device"].split(":")[0])
                row = {"setting": setting.name, "model": setting.model, "config": label(k, m), "k": k, "m": m}
                row |= {
                    "prompts": setting.prompts,
                    "lengths": dict(zip(("prompt", "thought", "answer"), lengths)),
                }
                row |= {"tree_micro_batch": micro_batch, "flat": stripped(flat), "tree": stripped(tree)}
                row["agreement"] = check
                ok = flat and tree and "error" not in flat and "error" not in tree
                row["tree_over_flat_seconds"] = tree["seconds"] / flat["seconds"] if ok else None
                row["tree_over_flat_cpu_seconds"] = tree["cpu_seconds"] / flat["cpu_seconds"] if ok else None
                rows.append(row)
    return rows


def run_sweep(plan: Plan, run: dict, measure, quiet: bool) -> list[dict]:
    """Section 3: peak memory against prompts per step, tree at the sweep's micro-batch and flat."""
    sweep = plan.sweep
    if sweep is None:
        return []
    rows = []
    k, m = sweep.config
    for prompts in sweep.prompts:
        args = (sweep.model, setting_lengths(sweep), k, m, prompts)
        tree = measure(
            update_spec(*args, "tree", sweep.tree_micro_batch, checkpointing=False, reps=1, warmup_reps=0)
            | run
        )
        say(quiet, f"  sweep {label(k, m)} {prompts} prompt(s) tree: {brief(tree)}")
        flat = None
        if prompts in sweep.flat_prompts:
            flat = measure(
                update_spec(*args, "flat", 0, checkpointing=sweep.flat_checkpointing, reps=1, warmup_reps=0)
                | run
            )
            say(quiet, f"  sweep {label(k, m)} {prompts} prompt(s) flat: {brief(flat)}")
        row = {"prompts": prompts, "config": label(k, m), "tree": stripped(tree), "flat": stripped(flat)}
        row["agreement"] = None
        if flat and tree and "error" not in flat and "error" not in tree:
            row["agreement"] = agreement(flat, tree, run["device"].split(":")[0])
        rows.append(row)
    return rows


def brief(result: dict | None) -> str:
    if result is None:
        return "not run"
    if "error" in result:
        return result["error"]
    peak = result["cuda_peak_bytes"] or result["peak_rss_kib"] * KIB
    return f"{result['seconds']:.2f} s (cpu {result['cpu_seconds']:.2f} s), peak {peak / GIB:.2f} GiB"


def formula_rows(update_rows: list[dict], sweep_rows: list[dict], plan: Plan, device_type: str) -> list[dict]:
    """Section 4: the formula next to every tree measurement at micro-batch 1."""
    measured = [
        (row["setting"], row["k"], row["m"], row["prompts"], row["lengths"], row["tree"])
        for row in update_rows
        if row["tree_micro_batch"] == 1
    ]
    if plan.sweep is not None:
        lengths = dict(zip(("prompt", "thought", "answer"), setting_lengths(plan.sweep)))
        k, m = plan.sweep.config
        measured += [
            (f"sweep ({plan.sweep.model})", k, m, r["prompts"], lengths, r["tree"]) for r in sweep_rows
        ]
    rows = []
    for setting, k, m, prompts, lengths, tree in measured:
        if not tree or "error" in tree:
            continue
        formula = tree_formula(
            tree["parameters"], m, lengths["thought"], lengths["answer"], tree["vocab"], device_type
        )
        peak = peak_bytes(tree, device_type)
        start = 0 if device_type == "cuda" else (tree["rss_at_start_kib"] or 0) * KIB
        rows.append(
            {
                "setting": setting,
                "config": label(k, m),
                "prompts": prompts,
                "lengths": lengths,
                "parameters": tree["parameters"],
                "vocab": tree["vocab"],
                **formula,
                "measured_peak_bytes": peak,
                "process_start_bytes": start,
                "measured_over_formula": peak / formula["total_bytes"],
                "measured_minus_start_over_formula": (peak - start) / formula["total_bytes"],
            }
        )
    return rows


def find(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def headline(update_rows, whole, sweep_rows, device_type: str) -> dict:
    """The figures the project set targets for, each with its value and whether it is met."""

    def seconds(row, path, key="seconds"):
        result = (row or {}).get(path)
        return None if not result or "error" in result else result[key]

    t16 = find(update_rows, setting="embedded", config="T16A1")
    t4 = find(update_rows, setting="embedded", config="T4A4")
    whole_rows = {r["config"]: r for r in (whole or {}).get("rows", [])}
    step = {c: whole_rows.get(c, {}).get("step_seconds") for c in ("T4A4", "T16A1")}
    step_cpu = {c: whole_rows.get(c, {}).get("step_cpu_seconds") for c in ("T4A4", "T16A1")}
    qwen = find(update_rows, setting="qwen2.5-0.5b", config="T4A4", tree_micro_batch=1)
    qwen_long = find(update_rows, setting="qwen2.5-0.5b-gsm8k", config="T4A4", tree_micro_batch=1)
    one = find(sweep_rows, prompts=1)
    eight = find(sweep_rows, prompts=8)
    values = {
        "embedded_update_t4a4_over_t16a1": ratio(seconds(t4, "tree"), seconds(t16, "tree")),
        "embedded_update_t4a4_over_t16a1_cpu_seconds": ratio(
            seconds(t4, "tree", "cpu_seconds"), seconds(t16, "tree", "cpu_seconds")
        ),
        "embedded_flat_update_t4a4_over_t16a1": ratio(seconds(t4, "flat"), seconds(t16, "flat")),
        "embedded_whole_step_t4a4_over_t16a1": ratio(step["T4A4"], step["T16A1"]),
        "embedded_whole_step_t4a4_over_t16a1_cpu_seconds": ratio(step_cpu["T4A4"], step_cpu["T16A1"]),
        "qwen05_t4a4_micro_batch_1_peak_bytes": peak_bytes((qwen or {}).get("tree"), device_type),
        "qwen05_t4a4_micro_batch_1_peak_minus_baseline_bytes": peak_bytes(
            (qwen or {}).get("tree"), device_type, delta=True
        ),
        "qwen05_gsm8k_t4a4_micro_batch_1_peak_bytes": peak_bytes((qwen_long or {}).get("tree"), device_type),
        "memory_growth_1_to_8_prompts_tree": ratio(
            peak_bytes((eight or {}).get("tree"), device_type),
            peak_bytes((one or {}).get("tree"), device_type),
        ),
        "memory_growth_1_to_8_prompts_tree_peak_minus_baseline": ratio(
            peak_bytes((eight or {}).get("tree"), device_type, True),
            peak_bytes((one or {}).get("tree"), device_type, True),
        ),
    }
    flat_points = [r for r in sweep_rows if r["flat"] and "error" not in r["flat"]]
    if len(flat_points) >= 2 and one and one["flat"]:
        last = flat_points[-1]
        values["flat_memory_growth_1_to_largest_measured"] = {
            "prompts": last["prompts"],
            "growth": ratio(peak_bytes(last["flat"], device_type), peak_bytes(one["flat"], device_type)),
        }
    else:
        values["flat_memory_growth_1_to_largest_measured"] = None
    targets = {
        "embedded_update_t4a4_over_t16a1": ("<=", 0.45),
        "embedded_whole_step_t4a4_over_t16a1": ("<=", 0.5),
        "memory_growth_1_to_8_prompts_tree": ("<=", 1.2),
        "qwen05_t4a4_micro_batch_1_peak_bytes": ("<", 24e9),
    }
    checks = {}
    for name, (op, bound) in targets.items():
        value = values[name]
        met = None if value is None else (value <= bound if op == "<=" else value < bound)
        checks[name] = {"target": f"{op} {bound:g}", "value": value, "met": met}
    return {"values": values, "targets": checks}


def machine(device: torch.device, threads: int) -> dict:
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        cpu = next(
            (line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")),
            cpu,
        )
    except (OSError, subprocess.SubprocessError):
        pass
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)),
        "torch_threads": threads,
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "load_average_at_start": os.getloadavg(),
        "grpo_ma_sha256": hashlib.sha256(Path(G.__file__).read_bytes()).hexdigest()[:16],
    }


def plan_settings(plan: Plan) -> dict:
    return {
        "name": plan.name,
        "configs": [label(k, m) for k, m in CONFIGS],
        "settings": [dataclasses.asdict(s) for s in plan.settings],
        "sweep": None if plan.sweep is None else dataclasses.asdict(plan.sweep),
        "whole_step": {
            "model": plan.whole_step_model,
            "warmup_steps": plan.whole_step_warmup,
            "steps_per_config": plan.whole_step_steps,
            "prompts_per_step": plan.whole_step_prompts,
        },
        "qwen2.5-0.5b_config": QWEN05,
        "loss": "grpo_ma defaults (token mean, beta 0.04, temperature 1, mu 1); reference: uniform, log(1/V)",
    }


def run_bench(
    plan: Plan,
    device: str,
    threads: int,
    cap_gib: float,
    command: str = "python -m paper_figures.bench",
    isolate: bool = True,
    quiet: bool = False,
) -> dict:
    """Every measurement of `plan`, one at a time; returns the block bench.json keeps for this device."""
    started = time.time()
    device_type = device.split(":")[0]
    cap_kib = None if device_type == "cuda" else int(cap_gib * KIB**2)
    timeout = 1800.0

    def measure(spec: dict) -> dict:
        return run_isolated(spec, cap_kib, timeout, isolate)

    run = {"device": device, "threads": threads}
    say(quiet, f"bench ({plan.name}) on {device}, {threads} torch thread(s), cap {cap_gib} GiB resident")
    say(quiet, "1. update cost, flat vs tree")
    update_rows = run_settings(plan, run, measure, quiet)
    say(quiet, "3. peak memory vs prompts per step")
    sweep_rows = run_sweep(plan, run, measure, quiet)
    say(quiet, "2. whole step (rollout + update) after one shared warm-up")
    whole_spec = {"kind": "whole", "configs": CONFIGS, "warmup_steps": plan.whole_step_warmup}
    whole_spec |= {"steps": plan.whole_step_steps, "prompts_per_step": plan.whole_step_prompts} | run
    whole = measure(whole_spec)
    say(quiet, "  " + (whole.get("error") or f"warm-up {whole['warmup_seconds']:.0f} s, 5 configurations"))
    block = {
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "plan": plan_settings(plan),
        "machine": machine(torch.device(device), threads),
        "memory_cap_gib": cap_gib if cap_kib else None,
        "isolated": isolate,
        "update": update_rows,
        "whole_step": whole,
        "memory_sweep": sweep_rows,
        "formula": formula_rows(update_rows, sweep_rows, plan, device_type),
    }
    block["headline"] = headline(update_rows, None if "error" in whole else whole, sweep_rows, device_type)
    checks = [r["agreement"] for r in update_rows + sweep_rows if r["agreement"]]
    block["agreement_ok"] = all(c["ok"] for c in checks) if checks else None
    block["wall_seconds"] = time.time() - started
    return block


# ------------------------------------------------------------------------------------------------
# bench.md, bench.json and the figure
# ------------------------------------------------------------------------------------------------
def length_text(setting: dict) -> str:
    return f"prompt {setting['prompt_len']}, thought {setting['thought_len']}, answer {setting['answer_len']}"


def gib(value_bytes) -> str:
    return "–" if value_bytes is None else f"{value_bytes / GIB:.2f}"


def num(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def cell_seconds(result: dict | None, key: str = "seconds") -> str:
    if result is None:
        return "not run"
    return "failed" if "error" in result else num(result[key], 3)


def count(result: dict | None, key: str) -> str:
    return "–" if not result or "error" in result else f"{result[key]:,}"


def mb_name(micro_batch: int) -> str:
    return "all" if micro_batch == 0 else str(micro_batch)


def render_update(block: dict, device_type: str) -> list[str]:
    lines = []
    for setting in block["plan"]["settings"]:
        rows = [r for r in block["update"] if r["setting"] == setting["name"]]
        if not rows:
            continue
        params = next((r["tree"]["parameters"] for r in rows if r["tree"] and "error" not in r["tree"]), None)
        lengths = length_text(setting)
        ckpt = "on" if setting["flat_checkpointing"] else "off"
        lines += [
            f"### {setting['name']}: {MODELS.get(setting['model'], setting['model'])}"
            + (f" ({params:,} parameters)" if params else ""),
            "",
            f"Lengths (tokens, every rollout at its budget): {lengths}; {setting['prompts']} prompt(s) "
            "per step; "
            f"flat gradient checkpointing {ckpt}; {setting['warmup_reps']} warm-up + {setting['reps']} timed "
            f"repetition(s), median. {setting['note']}",
            "",
        ]
        body = []
        for r in rows:
            flat, tree = r["flat"], r["tree"]
            check = r["agreement"]
            agree = (
                "–"
                if check is None
                else f"{check['max_rel_diff']:.1e}" + ("" if check["ok"] else " DISAGREE")
            )
            body.append(
                [
                    r["config"],
                    mb_name(r["tree_micro_batch"]),
                    cell_seconds(flat),
                    cell_seconds(tree),
                    num(r["tree_over_flat_seconds"]),
                    cell_seconds(flat, "cpu_seconds"),
                    cell_seconds(tree, "cpu_seconds"),
                    gib(peak_bytes(flat, device_type)),
                    gib(peak_bytes(tree, device_type)),
                    gib(peak_bytes(flat, device_type, True)),
                    gib(peak_bytes(tree, device_type, True)),
                    f"{count(flat, 'lm_head_rows')} / {count(tree, 'lm_head_rows')}",
                    agree,
                ]
            )
        header = ["config", "tree micro-batch", "flat s", "tree s", "tree / flat", "flat CPU s", "tree CPU s"]
        header += ["flat peak GiB", "tree peak GiB", "flat peak − before GiB", "tree peak − before GiB"]
        lines += table(header + ["LM-head rows flat / tree", "flat vs tree max rel. diff"], body) + [""]
        errors = [
            f"{r['config']} {p}: {r[p]['error']}"
            for r in rows
            for p in ("flat", "tree")
            if r[p] and "error" in r[p]
        ]
        lines += [f"- not measured: {e}" for e in errors] + ([""] if errors else [])
    return lines


def render_whole(whole: dict | None) -> list[str]:
    if not whole or "error" in whole:
        return [f"Not measured: {(whole or {}).get('error', 'not run')}.", ""]
    base = next((r for r in whole["rows"] if r["config"] == "T16A1"), None)
    body = [
        [
            r["config"],
            num(r["rollout_seconds"]),
            num(r["train_seconds"]),
            num(r["step_seconds"]),
            num(r["step_cpu_seconds"]),
            num(ratio(r["step_seconds"], base and base["step_seconds"])),
            f"{r['tokens_generated']:.0f}",
        ]
        for r in whole["rows"]
    ]
    lines = [
        f"Embedded default, {whole['prompts_per_step']} prompts per step, micro-batch "
        f"{mb_name(whole['micro_batch'])}, after one shared supervised warm-up of {whole['warmup_steps']} "
        f"steps ({whole['warmup_seconds']:.0f} s); "
        f"per configuration a fresh AdamW and Progress from the same warm weights and prompts, "
        f"{whole['steps']} train_steps, median. train s includes the frozen reference's no-grad pass, as in "
        "train_step.",
        "",
    ]
    header = ["config", "rollout s", "train s", "step s", "step CPU s", "step / T16A1", "tokens generated"]
    return lines + table(header, body) + [""]


def render_sweep(block: dict, device_type: str) -> list[str]:
    sweep = block["plan"]["sweep"]
    if not sweep:
        return ["Not run.", ""]
    lines = [
        f"{sweep['model']} ({MODELS.get(sweep['model'], sweep['model'])}), "
        f"T{sweep['config'][0]}A{sweep['config'][1]}, lengths {length_text(sweep)}; tree at micro-batch "
        f"{sweep['tree_micro_batch']}, flat all rows in one batch (gradient checkpointing "
        f"{'on' if sweep['flat_checkpointing'] else 'off'}), flat run for {sweep['flat_prompts']} prompt(s) "
        "only: its logits grow with the prompts and each 2-layer flat update costs minutes here.",
        "",
    ]
    body = []
    for r in block["memory_sweep"]:
        body.append(
            [
                str(r["prompts"]),
                gib(peak_bytes(r["tree"], device_type)),
                gib(peak_bytes(r["tree"], device_type, True)),
                gib(peak_bytes(r["flat"], device_type)),
                gib(peak_bytes(r["flat"], device_type, True)),
                cell_seconds(r["tree"]),
                cell_seconds(r["flat"]),
            ]
        )
    header = ["prompts", "tree peak GiB", "tree peak − before GiB", "flat peak GiB", "flat peak − before GiB"]
    lines += table(header + ["tree s", "flat s"], body) + [""]
    values = block["headline"]["values"]
    growth = values["memory_growth_1_to_8_prompts_tree"]
    lines.append(
        f"Growth 1 → 8 prompts, tree at micro-batch {sweep['tree_micro_batch']}: {num(growth, 3)}x of the "
        "peak, "
        f"{num(values['memory_growth_1_to_8_prompts_tree_peak_minus_baseline'], 3)}x of peak − before."
    )
    flat = values["flat_memory_growth_1_to_largest_measured"]
    if flat:
        lines.append(f"Flat, 1 → {flat['prompts']} prompts: {num(flat['growth'], 3)}x of the peak.")
    return lines + [""]


def render_formula(block: dict) -> list[str]:
    rows = block["formula"]
    if not rows:
        return ["No tree measurement at micro-batch 1.", ""]
    logit_bytes = rows[0]["logit_bytes"]
    lines = [
        "peak ≈ parameters × (4 weights + 4 gradients + 8 AdamW moments) bytes"
        f" + (thought + 1 + M × answer) × vocab × {logit_bytes} (one micro-batch's logits)"
        " + min(max(thought, M × answer), 2^26 / vocab) × vocab × 4 (one float32 chunk of"
        " selected_logprobs).",
        "",
    ]
    body = []
    for r in rows:
        terms = r["terms_bytes"]
        state = terms["weights"] + terms["gradients"] + terms["adamw_moments"]
        body.append(
            [
                r["setting"],
                r["config"],
                str(r["prompts"]),
                gib(state),
                gib(terms["logits"]),
                gib(terms["float32_chunk"]),
                gib(r["total_bytes"]),
                gib(r["measured_peak_bytes"]),
                gib(r["process_start_bytes"]),
                num(r["measured_over_formula"]),
                num(r["measured_minus_start_over_formula"]),
                gib(r["measured_peak_bytes"] - r["process_start_bytes"] - r["total_bytes"]),
            ]
        )
    header = ["setting", "config", "prompts", "state GiB", "logits GiB", "chunk GiB", "formula GiB"]
    header += [
        "measured peak GiB",
        "process at start GiB",
        "measured / formula",
        "(measured − start) / formula",
        "measured − start − formula GiB",
    ]
    dense = QWEN05["vocab_size"] * QWEN05["hidden_size"] * 4
    notes = [
        "",
        "What the formula leaves out (the last column is their sum; this bench does not split it): the "
        "activations kept for the backward; the "
        "dense float32 gradient contributions of a tied embedding, which each backward makes before adding "
        f"them to the accumulated gradient (at the 0.5B vocabulary and width one is {dense / GIB:.2f} GiB: "
        "one from the LM head and one per embedding lookup, of which tree_logprobs makes two per "
        "micro-batch); the further copies of the logits in tree_logprobs (repeat_interleave, cat and boolean "
        "indexing of the answer logits, indexing of the thought logits) and their gradients; and, on the "
        "CPU, the pages the allocator keeps after a free.",
    ]
    return lines + table(header, body) + notes + [""]


def render_headline(block: dict) -> list[str]:
    values, targets = block["headline"]["values"], block["headline"]["targets"]
    names = {
        "embedded_update_t4a4_over_t16a1": "embedded default: tree update T4A4 / T16A1 (wall s)",
        "embedded_whole_step_t4a4_over_t16a1": "embedded default: whole step T4A4 / T16A1 (wall s)",
        "memory_growth_1_to_8_prompts_tree": "peak update memory 1 → 8 prompts, tree micro-batch 1",
        "qwen05_t4a4_micro_batch_1_peak_bytes": "0.5B shape, T4A4 tree update at micro-batch 1: peak",
    }
    body = []
    for name, check in targets.items():
        value = check["value"]
        shown = gib(value) + " GiB" if name.endswith("bytes") else num(value, 3)
        verdict = "not measured" if check["met"] is None else ("met" if check["met"] else "MISSED")
        target = check["target"].replace("2.4e+10", "24 GB")
        body.append([names[name], shown, target, verdict])
    lines = table(["figure", "measured", "target", "verdict"], body) + [""]
    lines.append(
        "CPU-second ratios (contention-robust, one torch thread): tree update T4A4 / T16A1 "
        f"{num(values['embedded_update_t4a4_over_t16a1_cpu_seconds'], 3)}, whole step "
        f"{num(values['embedded_whole_step_t4a4_over_t16a1_cpu_seconds'], 3)}; flat update T4A4 / T16A1 "
        f"{num(values['embedded_flat_update_t4a4_over_t16a1'], 3)} (wall s; the same rows: 16 per prompt)."
    )
    return lines + [""]


def render_block(block: dict, device_type: str) -> list[str]:
    m = block["machine"]
    lines = [
        f"Generated {block['generated']} by `{block['command']}` in {block['wall_seconds'] / 60:.1f} min "
        f"(plan `{block['plan']['name']}`).",
        "",
        f"Machine: {m['device']}; CPU {m['cpu']}, {m['cpu_cores']} cores ({m['cpu_cores_usable']} usable), "
        f"{m['memory_gib']} GiB memory; torch {m['torch']} with {m['torch_threads']} thread(s) per "
        "measurement, "
        f"transformers {m['transformers']}, Python {m['python']}, {m['platform']}. Load average at the start "
        f"{m['load_average_at_start'][0]:.1f} (the machine was shared; every measurement records its own). "
        f"grpo_ma.py sha256 {m.get('grpo_ma_sha256', '–')}.",
        "",
    ]
    agree = block["agreement_ok"]
    lines += [
        "Every flat/tree pair was checked on the same weights and rollouts: "
        + (
            "all agree within tolerance."
            if agree
            else "SOME DISAGREE, see the tables."
            if agree is False
            else "none."
        )
    ]
    lines += ["", "### Headline", ""] + render_headline(block)
    lines += ["### 1. Update cost, flat vs tree", ""] + render_update(block, device_type)
    lines += ["### 2. Whole step", ""] + render_whole(block["whole_step"])
    lines += ["### 3. Peak update memory vs prompts per step", ""] + render_sweep(block, device_type)
    lines += ["### 4. Memory formula of the tree update at micro-batch 1", ""] + render_formula(block)
    return lines


METHOD = """\
## Method

- **Data.** Fixed synthetic rollouts: a `grpo_ma.Tree` of random token ids, every prompt, thought and answer
  at the stated length (the budgets), random advantages. Flat and tree see the identical tree, the same
  weights (same seed in every process) and the same loss: grpo_ma's defaults (token mean, beta 0.04,
  temperature 1, mu = 1 so old = detached current), with a uniform reference policy log(1/V) per token as the
  KL reference, so the loss depends on every log-prob without a reference forward.
- **Flat update** (the reference, in bench.py): one right-padded row prompt + thought + answer per answer, all
  rows in one forward, `log_softmax` of the full float32 logits (B, T, V), thought tokens counted once (from
  each thought's first answer row), then `grpo_ma_loss` and one backward. On the 0.5B shape it runs with
  `model.gradient_checkpointing_enable()`, as the GSM8K demo's old flat update did; on the embedded default
  without (that default never checkpointed).
- **Tree update**: grpo_ma's own `loss_weights`, `build_tree_batch`, `tree_logprobs`, `grpo_ma_loss`, called
  as `train_step` calls them (one backward per micro-batch of `micro_batch` thoughts, gradients accumulated).
  It cannot use transformers' per-layer gradient checkpointing: a checkpointed layer drops the KV cache
  (transformers sets `use_cache=False`, `cache=None`), and the answers are forwarded against that cache.
- **Update seconds**: the loss forward + backward over the whole step (every micro-batch), wall clock and
  process CPU time. Excluded: building the batches (train_step counts it in rollout_seconds), reference
  and old log-probs (no reference forward here; in train_step it is one no-grad pass of the same path), the
  optimizer step and gradient clipping.
- **Agreement**: per pair, the max relative difference of the per-token log-probs, of the loss and of the
  gradient norm; tolerance 1e-3 in float32 on the CPU, 5e-2 under bf16 autocast on CUDA.
- **Peak memory, CPU**: one fresh child process per measurement, run one at a time. In the child the model,
  its float32 AdamW moments (created as AdamW's first step creates them, without stepping) and the inputs
  are built; then the peak RSS is reset to the current RSS (`/proc/self/clear_refs`, so the construction's
  own peak does not count), the resident size just before the update is read (VmRSS), the updates run, and
  the peak is `resource.getrusage(RUSAGE_SELF).ru_maxrss` (KiB on Linux). Reported: the absolute peak (it
  includes the Python process with torch loaded, `process at start`) and the peak minus the
  resident size just before the update (gradients are made by the update, as `zero_grad(set_to_none=True)`
  leaves them).
- **Peak memory, CUDA**: `torch.cuda.max_memory_allocated()` after `reset_peak_memory_stats()`, minus
  `memory_allocated()` before the update for the difference; bf16 autocast through
  `grpo_ma.forward_precision`.
- **Whole step**: `grpo_ma.start_run` + `supervised_warmup` once, then per configuration a fresh AdamW and
  `Progress`, the same warm weights, prompts and sampling seed, and `train_step`s with the frozen warm policy
  as KL reference; `rollout_seconds` and `train_seconds` are train_step's own (wall clock).
"""


def render_markdown(results: dict) -> str:
    lines = [
        "# Update cost: flat vs tree (`python -m paper_figures.bench`)",
        "",
        "Written by `paper_figures/bench.py`; every number is in `bench.json` with its settings. Figure: "
        "`paper_figures/out/bench.png` (update seconds per configuration, peak memory vs prompts per step).",
        "",
        METHOD,
    ]
    cpu = results["devices"].get("cpu")
    lines += ["## CPU", ""] + (render_block(cpu, "cpu") if cpu else ["No CPU run recorded.", ""])
    cuda = results["devices"].get("cuda")
    lines += ["## GPU", ""]
    if cuda:
        lines += render_block(cuda, "cuda")
    else:
        lines += [
            "No GPU measured: no GPU was lent to this run, so every GPU row in `bench.json` is null. On a "
            "CUDA "
            "machine, `python -m paper_figures.bench --device cuda` fills this section (bf16 autocast, "
            "`torch.cuda.max_memory_allocated`) and keeps the CPU block.",
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"


def draw(block: dict, out_dir: Path, device_type: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from paper_figures.plots import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for ax, names in zip(axes[:2], (("embedded",), ("qwen2.5-0.5b", "qwen2.5-0.5b-gsm8k"))):
        rows = [r for r in block["update"] if r["setting"] in names]
        shown = [s for s in block["plan"]["settings"] if s["name"] in names]
        labels = [f"{r['config']}\nmicro-batch {mb_name(r['tree_micro_batch'])}" for r in rows]
        if len(shown) > 1:
            labels = [f"{t}\n{r['setting']}" for t, r in zip(labels, rows)]
        flat = [r["flat"]["seconds"] if r["flat"] and "error" not in r["flat"] else 0.0 for r in rows]
        tree = [r["tree"]["seconds"] if r["tree"] and "error" not in r["tree"] else 0.0 for r in rows]
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], flat, width=0.4, color="C3", label="flat (one row per answer)")
        ax.bar([i + 0.2 for i in x], tree, width=0.4, color="C0", label="tree (grpo_ma)")
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_ylabel("update seconds (forward + backward)")
        title = "; ".join(
            f"{s['name']}: {s['prompts']} prompt(s), lengths {s['prompt_len']}/{s['thought_len']}/"
            f"{s['answer_len']}"
            for s in shown
        )
        ax.set_title(f"{title} ({block['machine']['device']})", fontsize=8)
        ax.legend(fontsize=7)
    ax = axes[2]
    for path, color in (("tree", "C0"), ("flat", "C3")):
        points = [(r["prompts"], peak_bytes(r[path], device_type)) for r in block["memory_sweep"]]
        points = [(p, v / GIB) for p, v in points if v is not None]
        if points:
            name = "tree, micro-batch 1" if path == "tree" else "flat, one batch"
            ax.plot(*zip(*points), "o-", color=color, label=name)
            ax.legend(fontsize=7)
    ax.set_xlabel("prompts per step")
    ax.set_ylabel("peak update memory (GiB)")
    ax.set_xscale("log", base=2)
    prompts = [r["prompts"] for r in block["memory_sweep"]]
    ax.set_xticks(prompts, [str(p) for p in prompts])
    ax.set_ylim(bottom=0)
    sweep = block["plan"]["sweep"]
    if sweep:
        lengths = f"{sweep['prompt_len']}/{sweep['thought_len']}/{sweep['answer_len']}"
        ax.set_title(
            f"{sweep['model']}, T{sweep['config'][0]}A{sweep['config'][1]}, lengths {lengths}", fontsize=8
        )
    fig.text(
        0.5,
        -0.03,
        f"{block['command']}; {block['machine']['cpu']}, torch {block['machine']['torch']}",
        ha="center",
        fontsize=7,
        color="0.35",
    )
    fig.tight_layout()
    return save_figure(fig, out_dir, "bench")


def write_results(block: dict, device_type: str, results_dir: Path, out_dir: Path) -> dict:
    """bench.json (this device's block replaced, the other device's kept), bench.md and the figure."""
    results_dir.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / "bench.json"
    results = {"devices": {"cpu": None, "cuda": None}}
    if path.exists():
        try:
            previous = json.loads(path.read_text())
            results["devices"] |= {
                k: v for k, v in previous.get("devices", {}).items() if k in ("cpu", "cuda")
            }
        except json.JSONDecodeError:
            pass
    results["devices"][device_type] = block
    results["about"] = "paper_figures/bench.py: update cost of the flat vs the tree update; see bench.md"
    path.write_text(json.dumps(results, indent=1))
    (results_dir / "bench.md").write_text(render_markdown(results))
    draw(block, out_dir, device_type)
    return results


def redraw(device_type: str, results_dir: Path, out_dir: Path) -> dict:
    """bench.md and the figure again from bench.json, nothing measured."""
    path = results_dir / "bench.json"
    if not path.exists():
        raise SystemExit(f"error: --redraw needs {path}; run the bench first")
    results = json.loads(path.read_text())
    block = results["devices"].get(device_type)
    if block is None:
        raise SystemExit(f"error: {path} holds no {device_type} block")
    out_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "bench.md").write_text(render_markdown(results))
    draw(block, out_dir, device_type)
    return block


# ------------------------------------------------------------------------------------------------
# command line
# ------------------------------------------------------------------------------------------------
def parse_args(argv=None):
    parser = common.parser(
        "python -m paper_figures.bench",
        __doc__,
        "fast",
        "out_dir",
        "results_dir",
        "quiet",
        "threads",
        helps={
            "fast": "shorter lengths, fewer repetitions and a short warm-up (a few minutes on a CPU)",
            "threads": "torch threads per CPU measurement; on a shared CPU more threads spin and wait "
            "(default: %(default)s; CUDA measurements use every core)",
        },
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="(default: %(default)s)")
    parser.add_argument(
        "--memory-cap-gib",
        type=float,
        default=13.5,
        help="CPU: kill a measurement whose resident size passes this (default: %(default)s)",
    )
    parser.add_argument(
        "--gsm8k", action="store_true", help="add the 0.5B tree update at micro-batch 1 at GSM8K-like lengths"
    )
    parser.add_argument(
        "--redraw", action="store_true", help="rewrite bench.md and the figure from bench.json"
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.child:  # a measurement child process started by run_isolated
        child_main(*args.child)
        return None
    if args.redraw:
        return redraw(args.device, Path(args.results_dir), Path(args.out_dir))
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device")
    plan = PLANS["fast" if args.fast else "full"]
    if args.gsm8k:
        plan = dataclasses.replace(plan, settings=plan.settings + (GSM8K_SETTING,))
    threads = args.threads if args.device == "cpu" else len(os.sched_getaffinity(0))
    command = " ".join(["python -m paper_figures.bench", shlex.join(sys.argv[1:] if argv is None else argv)])
    block = run_bench(plan, args.device, threads, args.memory_cap_gib, command.strip(), quiet=args.quiet)
    write_results(block, args.device, Path(args.results_dir), Path(args.out_dir))
    print(summary_line(block))
    if block["agreement_ok"] is False:
        raise SystemExit("error: a flat and a tree update disagree beyond tolerance (see bench.md)")
    return block


def summary_line(block: dict) -> str:
    values = block["headline"]["values"]
    return (
        f"bench done in {block['wall_seconds'] / 60:.1f} min: embedded T4A4/T16A1 update "
        f"{num(values['embedded_update_t4a4_over_t16a1'], 3)}, whole step "
        f"{num(values['embedded_whole_step_t4a4_over_t16a1'], 3)}; 0.5B T4A4 micro-batch 1 peak "
        f"{gib(values['qwen05_t4a4_micro_batch_1_peak_bytes'])} GiB; memory 1->8 prompts "
        f"{num(values['memory_growth_1_to_8_prompts_tree'], 3)}x"
    )


if __name__ == "__main__":
    main()
