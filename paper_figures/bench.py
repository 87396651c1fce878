"""Whole GRPO-MA steps (grpo_ma.train_step: sampling, rewards, advantages, update) at the recipes' shapes,
with random weights, each setting in a fresh child process: seconds, decode steps, micro-batches, peak memory.

    python -m paper_figures.bench --device cuda     # the recipes' shapes on one GPU (minutes)
    python -m paper_figures.bench                   # the CPU plan: two layers, short budgets, CPU figures
    python -m paper_figures.bench --plan tiny       # tiny shapes through every code path (the tests)
    python -m paper_figures.bench --render          # bench.md again from bench.json, nothing measured

RESULTS/bench.json keeps one block per device that measured it (a run replaces its own device's block only)
and defines every field in its "about"; bench.md is rendered from it. The method: paper_figures/README.md.
"""

import argparse
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import random
import shlex
import subprocess
import sys
import tempfile
import time
import unittest.mock
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from PIL import Image
from tokenizers import AddedToken, Tokenizer, decoders, models
from torch._dynamo.utils import counters

import grpo_ma as G
from demos import counting_vlm, gsm8k_qwen, vlm_qwen
from paper_figures import common

FULL_VOCAB = 151_936  # Qwen2.5's vocabulary: the LM head and the sampling softmax see all of it
IMAGE_PIXELS = 448  # the VLM recipe's image side: 16 x 16 merged vision tokens
# Qwen2.5-0.5B's config.json, where it differs from Qwen2Config's defaults (every text setting)
QWEN25_05B = dict(hidden_size=896, intermediate_size=4_864, num_hidden_layers=24, rope_theta=1e6)
QWEN25_05B |= dict(num_attention_heads=14, num_key_value_heads=2)
# Qwen2.5-VL-3B's config.json: its text model and its vision tower
QWEN25_VL_3B_TEXT = dict(hidden_size=2_048, intermediate_size=11_008, num_hidden_layers=36, rms_norm_eps=1e-6)
QWEN25_VL_3B_TEXT |= dict(num_attention_heads=16, num_key_value_heads=2, max_position_embeddings=128_000)
QWEN25_VL_3B_VISION = dict(depth=32, hidden_size=1_280, intermediate_size=3_420, num_heads=16)
QWEN25_VL_3B_VISION |= dict(out_hidden_size=2_048, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
QWEN25_VL_3B_VISION |= dict(window_size=112, fullatt_block_indexes=[7, 15, 23, 31])
# the grpo_ma.Config fields each measured row repeats
ROW_CONFIG = (
    "prompts_per_step",
    "max_thought_tokens",
    "max_answer_tokens",
    "micro_batch_tokens",
    "lora_rank",
)
CHILD_TIMEOUT_S = 1_800
GIB = 1024**3

ABOUT = {
    "rollout_seconds": "second step's train_step rollout_seconds: sampling, rewards, advantages, batching",
    "update_seconds": "second step's train_step train_seconds: reference pass, forward, backward, AdamW step",
    "first_step_extra_seconds": "first step's rollout + update seconds minus the second's: start-up costs",
    "generate_steps": "decode steps of the second step's rollout: the columns its generate() calls added "
    "(each call runs until its last row stops; at M = 1 one call writes thought and answer)",
    "decode_ms_per_step": "1000 * rollout_seconds / generate_steps (prefills, rewards, batching included)",
    "tokens_generated": "thought and answer tokens sampled in the second step, all rows together",
    "micro_batches": "forward passes of the update per optimizer iteration (train_step's micro_batches)",
    "peak_bytes": "the child process's peak: torch.cuda.max_memory_allocated on CUDA; on the CPU VmHWM, the "
    "peak resident set size in /proc/self/status",
    "update_peak_bytes": "the same peak from the end of the second step's sampling to the end of that step",
    "learning": "grpo_ma.py's defaults, `steps` steps after its warm-up: held-out greedy accuracy",
    "compiled_decode": "whether rollouts decoded on static caches through the compiled step (on CUDA)",
    "graphs_compiled_in_second_step": "graphs torch compiled in the second step: 0 when nothing recompiles",
    "cudagraph_skips": "compiled graphs run without CUDA graphs, both steps (on CUDA: 0 when all replay)",
}


@dataclass(frozen=True)
class Scale:
    """How a plan shrinks the recipes' settings (the defaults: not at all)."""

    learning: dict  # grpo_ma.Config changes of the learning run
    text: dict = field(default_factory=dict)  # changes to every text config
    vision: dict = field(default_factory=dict)  # changes to the vision tower
    budgets: dict = field(default_factory=dict)  # grpo_ma.Config changes of the whole-step settings
    image_pixels: int = IMAGE_PIXELS
    figures: dict | None = None  # grpo_ma.Config changes of the CPU figures; None: no CPU figures
    fixed_budget: int = 256  # micro-batch tokens of the memory figure, 1 and 8 prompts
    swept_budgets: tuple[int, ...] = (32, 64, 256)  # micro-batch tokens of the forward-pass figure


TINY_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
TINY_TEXT |= dict(num_key_value_heads=2, vocab_size=512)
TINY_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
TINY_VISION["fullatt_block_indexes"] = [1]
TINY_BUDGETS = dict(prompts_per_step=2, max_thought_tokens=8, max_answer_tokens=4)
SCALES = {
    "gpu": Scale(learning={"steps": 40}),
    # every width and the full vocabulary, but two layers, short budgets and smaller images: minutes on a CPU
    "cpu": Scale(
        learning={"steps": 40},
        text=dict(num_hidden_layers=2),
        vision=dict(depth=2, fullatt_block_indexes=[1]),
        budgets=dict(prompts_per_step=1, max_thought_tokens=16, max_answer_tokens=4),
        image_pixels=224,
        figures=dict(max_thought_tokens=8, max_answer_tokens=2),
    ),
    "tiny": Scale(
        learning=TINY_BUDGETS | dict(steps=2, warmup_steps=2, warmup_batch=4, eval_size=4),
        text=TINY_TEXT,
        vision=TINY_VISION,
        budgets=TINY_BUDGETS,
        image_pixels=56,
        figures=TINY_BUDGETS,
        swept_budgets=(1, 64, 100_000),
    ),
}


@dataclass(frozen=True)
class Setting:
    """One whole-step measurement: a model shape and the grpo_ma.Config it trains with."""

    name: str
    model: str  # "embedded", "qwen2.5-0.5b" or "qwen2.5-vl-3b"
    config: dict  # grpo_ma.Config fields that differ from Config()
    plan: str  # the key of SCALES that sizes its model
    section: str = "whole step"  # or the CPU figures': "memory" (1 vs 8 prompts), "passes" (vs budget)


def recipe_config(defaults: dict, k: int, m: int, changes: dict) -> dict:
    """A recipe's GPU defaults that are grpo_ma.Config fields (device and folder left out), as T{k}A{m}."""
    fields = {f.name for f in dataclasses.fields(G.Config)} - {"device", "out"}
    recipe = {name: value for name, value in defaults.items() if name in fields}
    return recipe | changes | dict(thoughts=k, answers=m)


def plan_settings(plan: str) -> list[Setting]:
    """The embedded default, the GSM8K recipe's 0.5B and the VLM recipe's 3B with LoRA as T16A1 and T4A4,
    then (with the scale's `figures`) the CPU figures at the 0.5B shape: the update's peak for 1 and 8
    prompts per step at one micro-batch token budget, and one step's forward passes at growing budgets."""
    scale = SCALES[plan]
    gsm8k = gsm8k_qwen.GPU_DEFAULTS
    settings = [Setting("embedded default T4A4", "embedded", {}, plan)]  # grpo_ma.Config() in every plan
    for k, m in ((16, 1), (4, 4)):
        config = recipe_config(gsm8k, k, m, scale.budgets)
        settings.append(Setting(f"0.5B GSM8K T{k}A{m}", "qwen2.5-0.5b", config, plan))
    for k, m in ((4, 4), (16, 1)):
        config = recipe_config(vlm_qwen.GPU_DEFAULTS, k, m, scale.budgets)
        settings.append(Setting(f"VL-3B LoRA T{k}A{m}", "qwen2.5-vl-3b", config, plan))
    if scale.figures is None:
        return settings
    for prompts in (1, 8):
        changes = scale.figures | dict(prompts_per_step=prompts, micro_batch_tokens=scale.fixed_budget)
        config = recipe_config(gsm8k, 4, 4, changes)
        settings.append(Setting(f"0.5B memory, {prompts} prompt(s)", "qwen2.5-0.5b", config, plan, "memory"))
    for budget in scale.swept_budgets:
        changes = scale.figures | dict(prompts_per_step=2, micro_batch_tokens=budget)
        config = recipe_config(gsm8k, 4, 4, changes)
        settings.append(Setting(f"0.5B budget {budget} tokens", "qwen2.5-0.5b", config, plan, "passes"))
    return settings


# ======== random-weight policies of the recipes' shapes (nothing is downloaded) =================
def full_vocab_tokenizer(vocab_size: int, vision: bool):
    """A tokenizer of exactly `vocab_size` tokens: one token per printable character for the prompts, the
    format markers (and a VLM's vision markers) as single tokens, and filler tokens up to the size. Every id
    a random policy samples decodes, and the stop markers are 2 ids among the vocabulary, so rollouts run to
    their budgets, as long real thoughts do."""
    specials = ["<pad>", "<eos>", "<unk>"]
    chars = [chr(code) for code in range(32, 127)] + ["\n"]
    markers = list(G.FORMAT_MARKERS)
    vision_markers = list(counting_vlm.VISION_MARKERS) if vision else []
    fillers = vocab_size - len(specials) - len(chars) - len(markers) - len(vision_markers)
    vocab = specials + chars + [f"<{i}>" for i in range(fillers)]
    by_id = {token: i for i, token in enumerate(vocab)}
    core = Tokenizer(models.BPE(vocab=by_id, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(s, special=True) for s in specials])
    core.add_tokens([AddedToken(m, special=False, normalized=False) for m in markers])
    core.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in vision_markers])
    named = dict(pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=core, **named)
    tokenizer.padding_side = "left"  # as grpo_ma.load_policy sets it: generation appends on the right
    return tokenizer


def build_policy(setting: Setting):
    """(model in float32, tokenizer, processor or None), random weights of the setting's shape."""
    scale = SCALES[setting.plan]
    vision = setting.model == "qwen2.5-vl-3b"
    base = QWEN25_VL_3B_TEXT if vision else QWEN25_05B
    text = base | {"vocab_size": FULL_VOCAB} | scale.text
    tokenizer = full_vocab_tokenizer(text["vocab_size"], vision)
    text |= dict(pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    if not vision:
        config = transformers.Qwen2Config(tie_word_embeddings=True, **text)
        return transformers.Qwen2ForCausalLM(config), tokenizer, None
    # M-RoPE splits a head's head_dim / 2 rotary frequencies 2 : 3 : 3 into time, height and width, as
    # Qwen2.5-VL-3B's [16, 24, 24] does
    unit = text["hidden_size"] // text["num_attention_heads"] // 16
    sections = [2 * unit, 3 * unit, 3 * unit]
    text["rope_parameters"] = dict(rope_type="default", rope_theta=1e6, mrope_section=sections)
    tower = QWEN25_VL_3B_VISION | scale.vision
    ids = {name: tokenizer.convert_tokens_to_ids(m) for name, m in counting_vlm.MARKER_CONFIG_FIELDS.items()}
    ids["tie_word_embeddings"] = True
    config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=tower, **ids)
    pixels = scale.image_pixels**2  # min = max pixels: every image is resized to image_pixels square
    patches = dict(patch_size=14, merge_size=2, temporal_patch_size=2)
    size = {"shortest_edge": pixels, "longest_edge": pixels}
    image_processor = transformers.Qwen2VLImageProcessorPil(size=size, **patches)
    template = counting_vlm.CHAT_TEMPLATE  # each image's markers, then the question
    processor = counting_vlm.ImageOnlyQwen2VLProcessor(image_processor, tokenizer, chat_template=template)
    return transformers.Qwen2_5_VLForConditionalGeneration(config), tokenizer, processor


def start_setting(setting: Setting, device: str) -> tuple[G.Run, G.Config]:
    """The run a step needs: grpo_ma.start_run for the embedded model; for a recipe's shape the same Run
    around a random-weight model (start_run would load a checkpoint), with LoRA added by add_adapters."""
    cfg = dataclasses.replace(G.Config(device=device, warmup_steps=0), **setting.config)
    if setting.model == "embedded":
        return G.start_run(cfg), cfg
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device_ = G.pick_device(cfg)
    with torch.device(device_):  # initialised where it runs: a 3B model's init on one CPU core takes minutes
        model, tokenizer, processor = build_policy(setting)
    pool = None  # text: the embedded task's generator
    if processor:  # each question with one grey image: it costs its tokens and patches, whatever it shows
        image = Image.new("RGB", (SCALES[setting.plan].image_pixels,) * 2, "grey")
        examples = G.sample_examples(random.Random(cfg.seed), cfg.task, 64, held_out=False)
        pool = [dataclasses.replace(example, images=[image]) for example in examples]
    task = dict(pool=pool, eval_examples=pool or G.held_out_examples(cfg), is_correct=G.answer_is_correct)
    task |= dict(reward_fns=G.reward_functions(cfg), data_rng=random.Random(cfg.seed))
    run = G.Run(model, tokenizer, processor, device_, **task, forward=G.TreeForward(model))
    run.decode_caches = G.static_decode_caches(cfg, model, device_)  # as grpo_ma.start_run sets them
    with tempfile.TemporaryDirectory() as out:  # add_adapters only names the base in the adapter's config
        G.add_adapters(run, cfg, Path(out))
    return run, cfg


# ======== memory readings =======================================================================
def proc_status_bytes(name: str) -> int:
    """A field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(fields[name].split()[0]) * 1024  # reported in kB


def memory_peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else proc_status_bytes("VmHWM")


def reset_memory_peak(device: torch.device) -> None:
    """Start the peak again from what is held now (on Linux, writing 5 to clear_refs resets VmHWM)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")


def watching_rollouts(peaks: list, device: torch.device):
    """After each rollout, note the peak so far in `peaks` and start it again, so that the peak read after
    the step is the update's."""
    sample_tree = G.sample_tree

    def sample_and_note_peak(*args, **kwargs):
        tree = sample_tree(*args, **kwargs)
        peaks.append(memory_peak(device))
        reset_memory_peak(device)
        return tree

    return unittest.mock.patch.object(G, "sample_tree", sample_and_note_peak)


def counting_decode_steps(steps: list):
    """Note in `steps` the decode steps of each generate() call grpo_ma makes (the columns it added)."""
    sample_rows = G.sample_rows

    def sample_and_count(model, tokenizer, rows, *args, **kwargs):
        continuations, (out, mask) = sample_rows(model, tokenizer, rows, *args, **kwargs)
        steps.append(out.shape[1] - rows[0].shape[1])
        return continuations, (out, mask)

    return unittest.mock.patch.object(G, "sample_rows", sample_and_count)


# ======== the measurements (each in a fresh child process) ======================================
def measure_setting(setting: Setting, device: str) -> dict:
    """Two grpo_ma.train_steps from a fresh start, the second one reported (seconds, decode steps, tokens,
    micro-batches, memory in bytes); the first one's extra seconds are its start-up cost."""
    run, cfg = start_setting(setting, device)
    reference = G.kl_reference(run, cfg)
    trainable = [p for p in run.policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)  # as grpo_ma.train builds it
    progress = G.Progress()
    records = []
    peaks = []  # the process's peak, in parts: the watcher restarts it after each rollout
    for step in (1, 2):
        steps = []
        graphs = counters["stats"]["unique_graphs"]
        with watching_rollouts(peaks, run.device), counting_decode_steps(steps):
            record = G.train_step(step, run, optimizer, progress, reference, cfg)
        if run.device.type == "cuda":  # the optimizer step's kernels may still be queued
            torch.cuda.synchronize()
        record |= dict(generate_steps=sum(steps), update_peak_bytes=memory_peak(run.device))
        record["graphs_compiled"] = counters["stats"]["unique_graphs"] - graphs
        records.append(record)
    first, second = records
    text_config = run.policy.config.get_text_config()
    row = dict(name=setting.name, section=setting.section, model=setting.model, vocab=text_config.vocab_size)
    row |= dict(config=f"T{cfg.thoughts}A{cfg.answers}", text_layers=text_config.num_hidden_layers)
    row["parameters"] = sum(p.numel() for p in run.policy.parameters())
    row["trainable_parameters"] = sum(p.numel() for p in trainable)
    row |= {name: getattr(cfg, name) for name in ROW_CONFIG}
    row["image_pixels"] = SCALES[setting.plan].image_pixels if run.processor else None
    row |= dict(rollout_seconds=second["rollout_seconds"], update_seconds=second["train_seconds"])
    seconds = second["rollout_seconds"] + second["train_seconds"]
    row["first_step_extra_seconds"] = first["rollout_seconds"] + first["train_seconds"] - seconds
    row["generate_steps"] = second["generate_steps"]
    row["decode_ms_per_step"] = 1000 * second["rollout_seconds"] / second["generate_steps"]
    row |= dict(tokens_generated=second["tokens_generated"], micro_batches=second["micro_batches"])
    row["peak_bytes"] = max(peaks + [memory_peak(run.device)])
    row["update_peak_bytes"] = second["update_peak_bytes"]
    row["compiled_decode"] = run.decode_caches is not None
    row["graphs_compiled_in_second_step"] = second["graphs_compiled"]
    row["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"]
    return row


def measure_learning(changes: dict, device: str) -> dict:
    """python grpo_ma.py's defaults (with `changes`) through grpo_ma.train: warm-up, held-out accuracy,
    GRPO-MA steps, held-out accuracy again."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        cfg = dataclasses.replace(G.Config(device=device, out=out), **changes)
        cfg = dataclasses.replace(cfg, eval_every=cfg.steps)  # evaluated at the start and the end only
        summary = G.train(cfg)
    accuracy = {key: value for key, value in summary.items() if key.endswith("_accuracy")}
    learned = summary["final_greedy_accuracy"] > summary["start_greedy_accuracy"]
    row = dict(config=changes, steps=cfg.steps, warmup_steps=cfg.warmup_steps, eval_size=cfg.eval_size)
    return row | accuracy | dict(learned=learned, wall_seconds=time.perf_counter() - started)


def measure(spec: dict) -> dict:
    """One measurement in this process: spec {"kind": "setting" or "learning", "device", "threads", ...}."""
    torch.set_num_threads(spec["threads"])
    if spec["kind"] == "learning":
        return measure_learning(spec["changes"], spec["device"])
    return measure_setting(Setting(**spec["setting"]), spec["device"])


def measure_in_child(spec: dict) -> dict:
    """`measure(spec)` in a fresh Python process, so that its peak memory is its own; {"error": why} when
    it fails or runs past CHILD_TIMEOUT_S."""
    # a fixed mmap threshold: freed large buffers go back to the system, so resident size follows use
    env = os.environ | {"MALLOC_MMAP_THRESHOLD_": "65536"}
    with tempfile.TemporaryDirectory(prefix="bench_") as folder:
        spec_path = Path(folder) / "spec.json"
        out_path = Path(folder) / "result.json"
        spec_path.write_text(json.dumps(spec))
        command = [sys.executable, "-m", "paper_figures.bench", "--child", str(spec_path), str(out_path)]
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            return {"error": f"ran past {CHILD_TIMEOUT_S} s"}
        if done.returncode != 0:
            tail = done.stderr.strip().splitlines()[-3:]
            return {"error": f"exit {done.returncode}: " + " | ".join(tail)}
        return json.loads(out_path.read_text())


def machine(device: str, threads: int) -> dict:
    """What the numbers were measured on."""
    names = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
    cpu = names[0].split(":", 1)[1].strip() if names else platform.machine()
    found = dict(device=torch.cuda.get_device_name() if device == "cuda" else "cpu", cpu=cpu)
    found |= dict(cpu_cores_usable=len(os.sched_getaffinity(0)), torch_threads=threads)
    found["grpo_ma_sha256"] = hashlib.sha256(Path(G.__file__).read_bytes()).hexdigest()[:16]  # the code timed
    return found | dict(torch=torch.__version__, transformers=transformers.__version__)


def run_bench(plan: str, device: str, threads: int, learn: bool, isolate: bool = True) -> dict:
    """Every setting of the plan, one process at a time, then the learning run; returns the device's block
    of bench.json. isolate=False measures in this process (the tests: its peaks mix)."""
    started = time.perf_counter()
    scale = SCALES[plan]
    run_one = measure_in_child if isolate else measure
    rows = []
    for setting in plan_settings(plan):
        spec = dict(kind="setting", setting=dataclasses.asdict(setting), device=device, threads=threads)
        rows.append({"name": setting.name, "section": setting.section} | run_one(spec))
        print(f"{setting.name}: {json.dumps(rows[-1])}", flush=True)
    spec = dict(kind="learning", changes=scale.learning, device=device, threads=threads)
    learning = run_one(spec) if learn else None
    print(f"learning: {json.dumps(learning)}", flush=True)
    block = dict(plan=plan, scale=dataclasses.asdict(scale), machine=machine(device, threads), settings=rows)
    block["generated"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    block |= dict(memory_growth_1_to_8_prompts=memory_growth(rows), learning=learning)
    return block | {"wall_seconds": time.perf_counter() - started}


def memory_growth(rows: list[dict]) -> float | None:
    """The update's peak at 8 prompts per step over its peak at 1, at the same micro-batch token budget."""
    measured = [row for row in rows if row["section"] == "memory" and "error" not in row]
    peaks = {row["prompts_per_step"]: row["update_peak_bytes"] for row in measured}
    return peaks[8] / peaks[1] if 1 in peaks and 8 in peaks else None


# ======== bench.json and bench.md ===============================================================
def write_results(block: dict, device: str, results_dir: Path) -> dict:
    """bench.json with this device's block replaced (the other device's kept as it was), then bench.md."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / "bench.json"
    previous = json.loads(path.read_text()).get("devices", {}) if path.exists() else {}
    devices = {name: kept for name, kept in previous.items() if kept is not None}
    results = {"about": ABOUT, "devices": devices | {device: block}}
    path.write_text(json.dumps(results, indent=1) + "\n")
    (results_dir / "bench.md").write_text(render_markdown(results))
    return results


# bench.md's table: its header, and one measured row as a template of the row's fields
HEADER = (
    "| device | setting | layers | prompts | thought/answer budget | micro-batch tokens | rollout s "
    "| update s | first-step extra s | decode steps | decode ms/step | tokens | micro-batches | peak GiB "
    "| update peak GiB | compiled decode: new graphs in step 2, CUDA-graph skips |"
)
ROW = (
    "| {device} | {name} | {text_layers} | {prompts_per_step} | {max_thought_tokens}/{max_answer_tokens} "
    "| {micro_batch_tokens} | {rollout_seconds:.2f} | {update_seconds:.2f} | {first_step_extra_seconds:.2f} "
    "| {generate_steps} | {decode_ms_per_step:.1f} | {tokens_generated:,} | {micro_batches} | {peak_gib:.2f} "
    "| {update_peak_gib:.2f} | {compiled} |"
)


def render_markdown(results: dict) -> str:
    """bench.md: one table of every measured setting, by device, then a few lines per device."""
    lines = ["# Whole-step bench (`python -m paper_figures.bench`)", ""]
    lines += ["Rendered from `bench.json`, whose `about` defines each field; the method: ../README.md.", ""]
    lines += [HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    notes = []
    for device, block in results["devices"].items():
        for row in block["settings"]:
            if "error" in row:
                lines.append(f"| {device} | {row['name']} | failed: {row['error']} |")
                continue
            gib = dict(peak_gib=row["peak_bytes"] / GIB, update_peak_gib=row["update_peak_bytes"] / GIB)
            graphs = (row.get("graphs_compiled_in_second_step"), row.get("cudagraph_skips"))
            compiled = f"{graphs[0]}, {graphs[1]}" if row.get("compiled_decode") else "off"
            lines.append(ROW.format(device=device, **row, **gib, compiled=compiled))
        where = f"{block['machine']['device']} ({block['machine']['cpu']})"
        notes.append(f"- {device}: {where}, plan `{block['plan']}`, {block['generated']}.")
        if block["memory_growth_1_to_8_prompts"] is not None:
            growth = block["memory_growth_1_to_8_prompts"]
            notes.append(f"  Update peak at 8 prompts per step over 1 prompt: {growth:.3f}x.")
        learning = block["learning"]
        if learning and "error" not in learning:
            notes.append(
                f"  `grpo_ma.py` defaults, {learning['steps']} steps after a {learning['warmup_steps']}-step "
                f"warm-up: held-out greedy accuracy {learning['start_greedy_accuracy']:.3f} → "
                f"{learning['final_greedy_accuracy']:.3f} ({learning['eval_size']} prompts)."
            )
    if "cuda" not in results["devices"]:
        notes.append("- cuda: not measured (GPU figures come only from a run on a GPU).")
    return "\n".join(lines + [""] + notes) + "\n"


# ======== command line ==========================================================================
def parse_args(argv=None) -> argparse.Namespace:
    parser = common.parser("python -m paper_figures.bench", __doc__, "results_dir", "threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="(default: %(default)s)")
    parser.add_argument(
        "--plan",
        choices=tuple(SCALES),
        help="gpu: the recipes' shapes; cpu: 2 layers, short budgets, CPU figures; tiny: the tests' sizes "
        "(default: gpu with --device cuda, else cpu)",
    )
    parser.add_argument("--no-learning", action="store_true", help="skip the grpo_ma.py learning run")
    parser.add_argument("--render", action="store_true", help="bench.md from bench.json, nothing measured")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.child:  # a measurement started by measure_in_child
        spec_path, out_path = args.child
        Path(out_path).write_text(json.dumps(measure(json.loads(Path(spec_path).read_text()))))
        return None
    results_dir = Path(args.results_dir)
    if args.render:
        results = json.loads((results_dir / "bench.json").read_text())
        (results_dir / "bench.md").write_text(render_markdown(results))
        return None
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device")
    plan = args.plan or {"cuda": "gpu", "cpu": "cpu"}[args.device]
    threads = args.threads if args.device == "cpu" else torch.get_num_threads()  # CUDA: torch's default
    block = run_bench(plan, args.device, threads, learn=not args.no_learning)
    block["command"] = shlex.join(["python", "-m", "paper_figures.bench", *(argv or sys.argv[1:])])
    write_results(block, args.device, results_dir)
    print(f"bench ({plan}, {args.device}) done in {block['wall_seconds'] / 60:.1f} min")
    return block


if __name__ == "__main__":
    main()
