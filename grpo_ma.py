"""GRPO-MA in one file: tree-style GRPO, K thoughts per prompt and M answers per thought.

GRPO-MA (arXiv 2509.24494) samples K thoughts per prompt, then M answers per thought. A thought's
value is the mean reward of its M answers, so its advantage is estimated from M signals instead
of one; thought and answer tokens get separate advantages. `python grpo_ma.py` trains a small
Qwen2 on a synthetic arithmetic task on a CPU.

The file reads in the order the algorithm runs: 1. config, 2. task and model, 3. two-stage
sampling, 4. rewards, 5. advantages, 6. loss on the tree, 7. train loop, 8. CLI.
docs/algorithm.md states the algorithm and where this code departs from the paper.
grpo_ma_run.py runs the same step for days: checkpoints, resume, several GPUs.
"""

import argparse
import copy
import dataclasses
import functools
import json
import os
import random
import re
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
FORMAT_MARKERS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
EMBEDDED = "embedded"
MAX_ABS_REWARD = 1e150  # beyond this the float64 squares in the std overflow
AGGREGATIONS = ("token", "sequence", "grpo", "dr_grpo")  # TRL: dapo, -, grpo, dr_grpo
TASK_FAMILIES = {"addsub": "+-", "muladd": "+-*"}  # the operators a problem draws from
LORA_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
VISION_MARKERS = ("image", "video", "vision_start", "vision_end")  # Qwen2-VL's <name>_token_id


# ================================================================================================
# 1. Config: every default visible, every field a CLI flag, every bound checked before any work
# ================================================================================================
def setting(default, help: str, **extra):
    """A Config field: help text, and `choices` or bounds: low (>=), above (>), below (<)."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class Config:
    # the tree: T{K}A{M}
    thoughts: int = setting(4, "K: thoughts per prompt (stage 1)", low=2)
    answers: int = setting(4, "M: answers per thought (stage 2); 1 is GRPO", low=1)
    prompts_per_step: int = setting(8, "prompts per optimizer step", low=1)
    steps: int = setting(150, "GRPO-MA optimizer steps", low=0)
    micro_batch_tokens: int = setting(4096, "padded tokens a forward holds", low=1)
    # the embedded model's supervised warm-up
    warmup_steps: int = setting(450, "supervised warm-up steps before RL", low=0)
    warmup_lr: float = setting(1e-3, "warm-up learning rate", above=0)
    warmup_batch: int = setting(64, "examples per warm-up step", low=1)
    # optimisation
    lr: float = setting(5e-5, "AdamW learning rate", above=0)
    grad_clip: float = setting(1.0, "clip the gradient norm to this", above=0)
    num_iterations: int = setting(1, "mu: optimizer steps per rollout batch", low=1)
    # loss
    beta: float = setting(0.04, "KL weight (constant schedule)", low=0)
    kl_schedule: str = setting(
        "constant", "beta(s): constant or dynamic (GRPO-D)", choices=("constant", "dynamic")
    )
    beta_min: float = setting(0.04, "GRPO-D: beta at the end of exploration", low=0)
    beta_max: float = setting(0.10, "GRPO-D: beta at the last step", low=0)
    explore_share: float = setting(0.3, "GRPO-D: share of steps beta falls", above=0, below=1)
    epsilon: float = setting(0.2, "clip: ratio >= 1 - epsilon", low=0, below=1)
    epsilon_high: float = setting(0.2, "clip: ratio <= 1 + epsilon_high", low=0)
    loss_agg: str = setting("token", "loss aggregation", choices=AGGREGATIONS)
    kl_bias_correction: bool = setting(False, "weigh the KL term by the ratio (TRL)")
    mask_truncated: bool = setting(False, "leave answers that never closed out")
    # advantages
    answer_pool: str = setting("all", "answer group: K*M or M", choices=("all", "thought"))
    scale_rewards: bool = setting(True, "divide by the group std (no: Dr. GRPO)")
    ddof: int = setting(1, "std's delta degrees of freedom", choices=(0, 1))
    # rewards
    reward: str = setting("accuracy,format", "accuracy, format, steprar, steprvr")
    reward_weights: str = setting("", "one weight per reward (empty: all 1)")
    step_alpha: float = setting(0.1, "StepRAR: weight of matched key steps")
    # sampling
    temperature: float = setting(1.0, "sampling temperature (the loss's too)", above=0)
    max_thought_tokens: int = setting(40, "thought budget (then closed)", low=1)
    max_answer_tokens: int = setting(10, "answer budget", low=1)
    compile_decode: str = setting(
        "auto", "static cache + compiled decode (auto: CUDA)", choices=("auto", "on", "off")
    )
    # task and model
    task: str = setting("addsub", "embedded task family", choices=tuple(TASK_FAMILIES))
    eval_task: str = setting("", "held-out family ('': --task)", choices=("", *TASK_FAMILIES))
    model: str = setting(EMBEDDED, "'embedded', a hub id or a folder")
    lora_rank: int = setting(0, "LoRA rank (0: full fine-tuning)", low=0)
    lora_alpha: int = setting(16, "LoRA alpha: scale alpha / rank", low=1)
    lora_dropout: float = setting(0.0, "LoRA dropout", low=0, below=1)
    lora_targets: str = setting(LORA_TARGETS, "the modules LoRA adapts")
    freeze_vision: bool = setting(False, "never train a VLM's vision tower")
    device: str = setting("auto", "auto, cpu or cuda", choices=("auto", "cpu", "cuda"))
    precision: str = setting("auto", "auto: bf16 on CUDA", choices=("auto", "fp32", "bf16"))
    seed: int = setting(0, "seed of data, model and sampling")
    # the run's folder
    out: str = setting("runs/default", "output folder")
    save_merged: bool = setting(False, "LoRA: also save OUT/final-merged")
    eval_every: int = setting(50, "held-out evaluation every N steps", low=1)
    eval_size: int = setting(200, "held-out prompts per evaluation", low=1)
    gss_window: int = setting(50, "steps in the gradient spike score", low=1)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate_config(cfg: Config) -> None:
    """Reject, before any work, every setting that would fail later or give a wrong result."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        bounds = f.metadata
        if "choices" in bounds and value not in bounds["choices"]:
            raise ValueError(f"{flag(f.name)} must be one of {bounds['choices']}, got {value!r}")
        if "low" in bounds and value < bounds["low"]:
            raise ValueError(f"{flag(f.name)} must be >= {bounds['low']}, got {value}")
        if "above" in bounds and value <= bounds["above"]:
            raise ValueError(f"{flag(f.name)} must be > {bounds['above']}, got {value}")
        if "below" in bounds and value >= bounds["below"]:
            raise ValueError(f"{flag(f.name)} must be < {bounds['below']}, got {value}")
    if cfg.answer_pool == "thought" and cfg.answers < 2:
        raise ValueError("--answer-pool thought needs --answers >= 2")
    if cfg.beta_min > cfg.beta_max:
        raise ValueError(f"--beta-min {cfg.beta_min} exceeds --beta-max {cfg.beta_max}")
    if cfg.kl_schedule == "dynamic" and cfg.steps < 1:
        raise ValueError("--kl-schedule dynamic needs --steps >= 1")
    # a hub id is 'name' or 'org/name'; anything else is meant as a folder, which must exist
    path = Path(cfg.model).expanduser()
    is_path = cfg.model.startswith((".", "/", "~")) or cfg.model.count("/") > 1
    if cfg.model != EMBEDDED and (is_path or path.exists()) and not path.is_dir():
        raise ValueError(f"--model {cfg.model}: no such folder")
    reward_functions(cfg)  # raises on unknown names or a wrong number of weights


# ================================================================================================
# 2. Task, tokenizer and model: the embedded default, or a real checkpoint through the same code
# ================================================================================================
@dataclass
class Example:
    question: str  # "2+9-6": operations applied left to right
    thought: str  # the reference reasoning: "1:2+9=11;</think>"
    key_steps: list[list[str]]  # each key step: equivalent strings (StepRAR)
    answer: str  # "5": the answer applies the last operation itself
    images: list = field(default_factory=list)  # PIL images (vision-language models)


STEP_PATTERN = re.compile(r"(\d+):(\d+)([-+*])(\d+)=(-?\d+);")  # "2:11-6=5;"


def make_example(rng: random.Random, family: str) -> Example:
    """A problem of 2-3 operations. The thought writes each result but the last, which the
    answer must compute: one thought's answers can differ, so they carry signal."""
    value = rng.randint(1, 9)
    question, steps, key_steps = str(value), [], []
    for _ in range(rng.randint(2, 3)):
        op = rng.choice(TASK_FAMILIES[family])
        operand = rng.randint(1, 9)
        if op == "*":  # small factors keep the numbers short
            operand = rng.randint(2, 3)
        if op == "-" and operand > value:  # keep every intermediate result non-negative
            op = "+"
        result = {"+": value + operand, "-": value - operand, "*": value * operand}[op]
        step = f"{value}{op}{operand}={result}"
        commuted = [f"{operand}{op}{value}={result}"] if op in "+*" else []
        question += f"{op}{operand}"
        steps.append(step)
        key_steps.append([step, *commuted])
        value = result
    thought = "".join(f"{i}:{s};" for i, s in enumerate(steps[:-1], 1)) + THINK_CLOSE
    return Example(question, thought, key_steps[:-1], str(value))


def sample_examples(rng: random.Random, family: str, n: int, held_out: bool) -> list[Example]:
    """n examples of one split: a stable hash holds one question in five out of training."""
    examples = []
    while len(examples) < n:
        example = make_example(rng, family)
        if (zlib.crc32(example.question.encode()) % 5 == 0) == held_out:
            examples.append(example)
    return examples


def held_out_examples(cfg: Config, family: str | None = None) -> list[Example]:
    family = family or cfg.eval_task or cfg.task
    return sample_examples(random.Random(10_000 + cfg.seed), family, cfg.eval_size, held_out=True)


def draw_examples(rng: random.Random, n: int, cfg: Config, pool: list | None) -> list[Example]:
    """n training examples: from a recipe's pool, or from the embedded generator."""
    if pool is not None:
        return rng.sample(pool, n)
    return sample_examples(rng, cfg.task, n, held_out=False)


SYSTEM_PROMPT = (
    f"Solve the problem step by step inside {THINK_OPEN} {THINK_CLOSE}, then give only the final "
    f"number inside {ANSWER_OPEN} {ANSWER_CLOSE}."
)


def format_prompt(tokenizer, question: str, images: int = 0) -> str:
    """The prompt ends with <think>: what the policy writes up to </think> is the thought. With
    images, `tokenizer` is a processor; its chat template puts image markers before the text."""
    if not getattr(tokenizer, "chat_template", None):
        return f"{question}=?{THINK_OPEN}"
    content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
    user = {"role": "user", "content": content if images else question}
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, user]
    chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return chat + THINK_OPEN


def build_char_tokenizer():
    """One token per character (BPE with no merges, built with `tokenizers`), the four format
    markers as single tokens, wrapped as a transformers fast tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    # the task needs no letters, but transformers' stop-string matcher probes them
    chars = list("0123456789+-*=?:;,. ()abcdefghijklmnopqrstuvwxyz\n")
    vocab = {token: i for i, token in enumerate(specials + chars)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(s, special=True) for s in specials])
    markers = [AddedToken(m, special=False, normalized=False) for m in FORMAT_MARKERS]
    core.add_tokens(markers)
    names = dict(pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=core, **names)


def build_embedded_model(tokenizer):
    """A small Qwen2ForCausalLM from a Qwen2Config: Qwen2.5's architecture, 598,656 parameters."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    size = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3)
    heads = dict(num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    tokens = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    tokens |= dict(bos_token_id=None, eos_token_id=tokenizer.eos_token_id)
    return Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **size, **heads, **tokens))


def check_format_markers(tokenizer) -> None:
    """The thought/answer split needs each marker to survive encode -> decode unchanged."""
    for marker in FORMAT_MARKERS:
        ids = tokenizer.encode(marker, add_special_tokens=False)
        if tokenizer.decode(ids) != marker or tokenizer.unk_token_id in ids:
            raise ValueError(f"tokenizer cannot write the format marker {marker!r} ({ids})")
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token: answers could never end")


def load_policy(cfg: Config, device: torch.device):
    """The embedded model (no download), or a checkpoint through the same code: a causal LM, or
    a vision-language model with the processor that reads images. A LoRA run's OUT/final loads as
    its adapter merged into the base it names. Returns (model, tokenizer, processor or None)."""
    import transformers as hf

    processor = None
    if cfg.model == EMBEDDED:
        tokenizer = build_char_tokenizer()
        model = build_embedded_model(tokenizer)
    else:
        try:
            adapter = Path(cfg.model).expanduser() / "adapter_config.json"
            base = cfg.model
            if adapter.is_file():
                base = json.loads(adapter.read_text())["base_model_name_or_path"]
            if hasattr(hf.AutoConfig.from_pretrained(base), "vision_config"):
                processor = hf.AutoProcessor.from_pretrained(cfg.model)
                tokenizer = processor.tokenizer
                auto_model = hf.AutoModelForImageTextToText
            else:
                tokenizer = hf.AutoTokenizer.from_pretrained(cfg.model)
                auto_model = hf.AutoModelForCausalLM
            # float32 master weights: AdamW on bf16 weights rounds away updates of lr ~1e-6
            model = auto_model.from_pretrained(base, dtype=torch.float32)
            if adapter.is_file():
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, cfg.model).merge_and_unload()
        except (OSError, ValueError) as error:
            reason = str(error).strip().splitlines()[0]
            raise ValueError(f"--model {cfg.model}: cannot load it ({reason})") from error
    check_format_markers(tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation appends on the right
    return model.to(device), tokenizer, processor


def freeze_vision_tower(model) -> None:
    """Stop training the vision tower (Qwen2-VL's `visual` module, adapters in it included)."""
    frozen = [p for name, p in model.named_parameters() if "visual" in name.split(".")]
    if not frozen:
        raise ValueError("--freeze-vision: the model has no vision tower")
    for parameter in frozen:
        parameter.requires_grad_(False)


def add_lora(model, cfg: Config):
    """peft LoRA adapters on the attention and MLP projections: only they train, and the model
    under `disable_adapter()` is the start policy, the KL reference (no second copy)."""
    from peft import LoraConfig, get_peft_model

    targets = [name.strip() for name in cfg.lora_targets.split(",") if name.strip()]
    sizes = dict(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout)
    return get_peft_model(model, LoraConfig(**sizes, target_modules=targets))


# ================================================================================================
# 3. Two-stage sampling: K thoughts per prompt, then M answers per thought
# ================================================================================================
@dataclass
class Tree:
    """One step's rollouts as nested lists: prompt p, its thought k, that thought's answer m.
    A rollout's place in the (P, K, M) tree is its position in these lists, nothing else."""

    prompt_ids: list[list[int]]  # [P][tokens]
    thought_ids: list[list[list[int]]]  # [P][K][tokens] sampled, </think> unless forced
    forced_close: list[list[list[int]]]  # [P][K][tokens] </think> added to an unclosed thought
    answer_ids: list[list[list[list[int]]]]  # [P][K][M][tokens] sampled
    thoughts: list[list[str]]  # [P][K] decoded, </think> included
    answers: list[list[list[str]]]  # [P][K][M] decoded
    answer_ended: list = field(default_factory=list)  # [P][K][M] 'stop', 'eos' or 'budget'
    vision: list = field(default_factory=list)  # [P] a prompt's image inputs, or None

    def thought_slots(self) -> list[tuple[int, int]]:
        """Every (p, k), prompt-major: the order of thoughts in generate() and micro-batches."""
        return [(p, k) for p, thoughts in enumerate(self.thought_ids) for k in range(len(thoughts))]

    def answer_slots(self) -> list[tuple[int, int, int]]:
        slots = self.thought_slots()
        return [(p, k, m) for p, k in slots for m in range(len(self.answer_ids[p][k]))]


def group_rows(rows: list, size: int) -> list[list]:
    """[a, b, c, d], 2 -> [[a, b], [c, d]]: generate()'s flat rows back into the tree."""
    return [rows[start : start + size] for start in range(0, len(rows), size)]


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids -> (ids, attention mask), both (B, width), padded on the left."""
    width = max(len(row) for row in rows)
    ids = [[pad_id] * (width - len(row)) + row for row in rows]
    mask = [[0] * (width - len(row)) + [1] * len(row) for row in rows]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)


def right_pad(rows: list[list], value) -> list[list]:
    width = max(len(row) for row in rows)
    return [row + [value] * (width - len(row)) for row in rows]


def rope_index_module(model):
    """A vision-language Qwen's module with get_rope_index and the rows' rope offsets (rope_deltas),
    or None for a text model."""
    return next((module for module in model.modules() if hasattr(module, "get_rope_index")), None)


def model_inputs(model, ids: torch.Tensor, mask: torch.Tensor, vision: list | None = None) -> dict:
    """Inputs of a left-padded batch (B, L), positions counted from a row's first real token,
    as generate() counts. A vision-language Qwen also takes its rows' images (`vision`: [B]
    image inputs or None) and 3-D rotary positions (3, B, L) from its own get_rope_index. Its
    rope offsets (B, 1), from which generate() continues each row's positions, are set on every
    call: a text-only batch's are zero, never the previous batch's."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions)
    rope = rope_index_module(model)
    images = [row for row in vision or [] if row is not None]
    if rope is not None and not images:
        rope.rope_deltas = torch.zeros_like(ids[:, :1])
    if not images:
        return inputs
    grid = torch.cat([row["image_grid_thw"] for row in images]).to(ids.device)
    inputs["pixel_values"] = torch.cat([row["pixel_values"] for row in images]).to(ids.device)
    image_tokens = (ids == model.config.image_token_id).int()
    positions, deltas = rope.get_rope_index(ids, image_tokens, grid, attention_mask=mask)
    rope.rope_deltas = deltas  # (B, 1): generate() continues each row's positions from these
    return inputs | dict(image_grid_thw=grid, position_ids=positions)


def cut_at_stop(ids: list[int], tokenizer, stop: str) -> tuple[list[int], str]:
    """Cut a generated row after the token that completes the text `stop`, or after eos.
    Returns (ids, 'stop', 'eos' or 'budget'). Once a prefix holds `stop` every longer one
    does, so bisection finds the shortest in log2(length) decodes."""
    eos = tokenizer.eos_token_id
    end = ids.index(eos) + 1 if eos in ids else len(ids) + 1
    if stop not in tokenizer.decode(ids[:end]):
        return (ids[:end], "eos") if end <= len(ids) else (ids, "budget")
    low, high = 1, min(end, len(ids))  # the shortest prefix holding `stop` ends in (low, high]
    while low < high:
        middle = (low + high) // 2
        if stop in tokenizer.decode(ids[:middle]):
            high = middle
        else:
            low = middle + 1
    return ids[:high], "stop"


@functools.lru_cache
def stop_at(tokenizer, stop: str) -> Callable:
    """generate()'s stopping criterion, built once per tokenizer: whether each row (B, L) ends
    with the ids of `stop`, one tensor compare per token step. A marker spelt by other tokens
    does not stop its row early; `cut_at_stop`, which reads the text, still cuts it."""
    marker = torch.tensor(tokenizer.encode(stop, add_special_tokens=False))

    def ends_with_marker(rows: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        nonlocal marker
        marker = marker.to(rows.device)  # moved once: a copy to a GPU each step would wait for it
        last = F.pad(rows, (len(marker), 0), value=-1)[:, -len(marker) :]  # -1: a short row
        return (last == marker).all(-1)

    return ends_with_marker


@torch.no_grad()
def read_prefixes(model, tokenizer, prefixes: list[list[int]], vision=None):
    """Left-pad the prefixes (with their images, `vision` [B]) and read all but their last token
    ONCE for all their samples. Returns ids, mask (B, L) and the KV cache of L - 1 columns."""
    from transformers import DynamicCache

    ids, mask = left_pad(prefixes, tokenizer.pad_token_id, model.device)
    cache = DynamicCache(config=model.config)
    if ids.shape[1] > 1:
        inputs = model_inputs(model, ids[:, :-1], mask[:, :-1], vision)
        model(**inputs, cache=cache, use_cache=True, logits_to_keep=1)
    return ids, mask, cache


class StaticCaches:
    """Compiled decoding's KV caches (transformers' StaticCache), kept for the whole run: one per
    row count, its length rounded up to `bucket` columns and only ever grown, so later steps reuse
    the decode graphs the first compiled (and CUDA graphs find the same tensors every call)."""

    def __init__(self, config, bucket: int = 64):
        self.config = config.get_text_config(decoder=True)
        self.bucket = bucket
        self.caches = {}

    def get(self, rows: int, length: int):
        from transformers import StaticCache

        length = -(-length // self.bucket) * self.bucket
        if rows not in self.caches or self.caches[rows].get_max_length() < length:
            self.caches[rows] = StaticCache(config=self.config, max_cache_len=length)
        self.caches[rows].reset()
        return self.caches[rows]


def repeat_into(source, target, n: int) -> None:
    """target's first columns <- source's, each row repeated n times: batch_repeat_interleave
    into a static cache, which has none of its own."""
    columns = int(source.get_seq_length())
    if columns == 0:  # a prompt of one token: nothing was prefilled
        return
    for source_layer, layer in zip(source.layers, target.layers):
        keys = source_layer.keys[:, :, :columns].repeat_interleave(n, 0)
        values = source_layer.values[:, :, :columns].repeat_interleave(n, 0)
        if not layer.is_initialized:
            layer.lazy_initialization(keys, values)  # the source's dtypes, autocast's included
        layer.keys[:, :, :columns].copy_(keys)
        layer.values[:, :, :columns].copy_(values)
        layer.cumulative_length.fill_(columns)


def compile_config(device: torch.device):
    """How generate() compiles its one-token decode forward: whole graphs of fixed shapes; on CUDA
    as CUDA graphs (mode reduce-overhead), which remove the per-token kernel launches."""
    from transformers import CompileConfig

    mode = "reduce-overhead" if device.type == "cuda" else "default"
    config = CompileConfig(fullgraph=True, dynamic=False, mode=mode)
    config._compile_all_devices = True  # generate() compiles on accelerators only: let a CPU test run it
    return config


@torch.no_grad()
def sample_rows(model, tokenizer, rows, cache, n, budget, stop, cfg, do_sample, static=None, rules=None):
    """n continuations of each row of rows = (ids, mask), (B, L), from exactly softmax(logits / T)
    (every knob a checkpoint's generation_config may set is pinned), cut by `cut_at_stop`. The
    cache of the rows' first columns is repeated n times, never recomputed: in place, or into
    `static`, a StaticCache that compiled decoding continues. With `rules` (ThoughtThenAnswer) in
    place of the stop check and eos, the rows come back uncut: ([], (ids, None)).
    Returns ([(ids, how it ended)] row-major: continuation j of row i is i*n+j, and the B*n rows
    with their continuations: (ids, mask 1 on the kept tokens)); the cache then holds them."""
    if do_sample:
        kwargs = dict(do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0)
    else:
        kwargs = dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    kwargs |= dict(max_new_tokens=budget, repetition_penalty=1.0, pad_token_id=tokenizer.pad_token_id)
    if rules is None:
        kwargs |= dict(stopping_criteria=[stop_at(tokenizer, stop)], eos_token_id=tokenizer.eos_token_id)
    else:  # the rules end the rows (an eos may end a thought, not its row) and force the closes
        kwargs |= dict(
            stopping_criteria=[rules.done], logits_processor=[rules.force_close], eos_token_id=None
        )
    # a VLM never writes an image marker: one in a thought would read as a missing image
    markers = [getattr(model.config, f"{name}_token_id", None) for name in VISION_MARKERS]
    kwargs["suppress_tokens"] = [token for token in markers if token is not None]
    if static is None:
        cache.batch_repeat_interleave(n)
    else:
        repeat_into(cache, static, n)
        cache = static
        kwargs["compile_config"] = compile_config(model.device)
    rope = rope_index_module(model)
    if rope is not None and rope.rope_deltas is not None:  # a VLM's offsets follow its rows
        rope.rope_deltas = rope.rope_deltas.repeat_interleave(n, dim=0)
    ids, mask = (part.repeat_interleave(n, dim=0) for part in rows)
    out = model.generate(input_ids=ids, attention_mask=mask, cache=cache, **kwargs)
    if rules is not None:
        return [], (out, None)
    new = out[:, ids.shape[1] :]
    continuations = [cut_at_stop(row, tokenizer, stop) for row in new.tolist()]
    lengths = torch.tensor([len(kept) for kept, _ in continuations], device=out.device)
    kept = torch.arange(new.shape[1], device=out.device) < lengths[:, None]
    return continuations, (out, torch.cat([mask, kept.long()], 1))


def continue_after(rows, cache, tails: list[list[int]], pad_id: int):
    """Rows (ids, mask), (B, L), continued by `tails` [B] after their last kept token (mask 1).
    The mask hides the cached columns past a row's end; positions count along the mask, so the
    holes shift nothing. The last kept token is fed again: its logits, which no cache holds,
    give the next token. Returns (ids, mask), (B, C + tail) with C cached columns."""
    ids, mask = rows
    columns = int(cache.get_seq_length())
    last = mask.cumsum(1).argmax(1, keepdim=True)  # (B, 1) a row's last kept column
    heads = ids.gather(1, last).squeeze(1).tolist()
    tail_rows = [[head, *tail] for head, tail in zip(heads, tails)]
    tail_ids, tail_mask = left_pad(tail_rows, pad_id, ids.device)
    mask = torch.cat([mask.scatter(1, last, 0)[:, :columns], tail_mask], 1)
    return torch.cat([ids[:, :columns], tail_ids], 1), mask


class ThoughtThenAnswer:
    """M = 1 in ONE generate() call: each answer follows its thought in the same row, so no row
    waits for the longest thought, and the two stages' rules hold row by row, read from the rows
    (B, prompt + t) generated so far. As a logits processor it makes a row whose thought ended by
    eos or budget write </think> next, token by token (the forced close); as a stopping criterion
    it ends a row once its answer wrote </answer>, eos or its budget."""

    def __init__(self, tokenizer, width: int, cfg: Config):
        self.width = width  # prompt columns: the generated tokens follow them
        self.close = tokenizer.encode(THINK_CLOSE, add_special_tokens=False)
        self.closed = stop_at(tokenizer, THINK_CLOSE)
        self.answered = stop_at(tokenizer, ANSWER_CLOSE)
        self.eos = tokenizer.eos_token_id
        self.budgets = (cfg.max_thought_tokens, cfg.max_answer_tokens)
        self.answer_start = None  # (B,) tokens generated before a row's answer; -1 while it thinks

    def done(self, rows: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        t = rows.shape[1] - self.width
        if self.answer_start is None:
            self.answer_start = torch.full((len(rows),), -1, device=rows.device)
            self.close_ids = torch.tensor(self.close, device=rows.device)  # once: a copy waits
        last, thinking = rows[:, -1], self.answer_start < 0
        closed = thinking & self.closed(rows, scores)
        ended = thinking & ~closed & ((last == self.eos) | (t >= self.budgets[0]))
        self.answer_start = torch.where(closed, t, self.answer_start)
        self.answer_start = torch.where(ended, t + len(self.close), self.answer_start)
        answer = t - self.answer_start  # its tokens so far, once it thinks no more
        stop = self.answered(rows, scores) | (last == self.eos) | (answer >= self.budgets[1])
        return ~thinking & (answer > 0) & stop

    def force_close(self, rows: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.answer_start is None:  # the first token: every row thinks
            return scores
        t = rows.shape[1] - self.width
        closing = self.answer_start > t  # rows still owing close tokens
        j = (t - self.answer_start + len(self.close)).clamp(0, len(self.close) - 1)
        token = self.close_ids[j]
        kept = scores.gather(1, token[:, None])  # (B, 1) the others' scores of that token
        scores.masked_fill_(closing[:, None], -float("inf"))
        return scores.scatter_(1, token[:, None], torch.where(closing[:, None], 0.0, kept))


def sample_thought_then_answer(model, tokenizer, prompt_ids, rows, cache, k, cfg, do_sample, static, vision):
    """M = 1: K continuations of each prompt (rows, cache as for `sample_rows`), each a thought and
    its answer, cut into the two as the stages cut them. A thought the text check closes before
    the token check saw its marker (a marker spelt by other tokens) gets its answer from its
    re-encoded prompt (and images) + thought instead, as the stages sample it.
    Returns (thoughts, forced closes, [(answer, how it ended)]), row-major."""
    rules = ThoughtThenAnswer(tokenizer, rows[0].shape[1], cfg)
    budget = cfg.max_thought_tokens + len(rules.close) + cfg.max_answer_tokens
    _, (out, _) = sample_rows(model, tokenizer, rows, cache, k, budget, None, cfg, do_sample, static, rules)
    thoughts, forced, answers, again = [], [], [], []
    for i, (row, start) in enumerate(zip(out[:, rows[0].shape[1] :].tolist(), rules.answer_start.tolist())):
        thought, ended = cut_at_stop(row[: cfg.max_thought_tokens], tokenizer, THINK_CLOSE)
        thoughts.append(thought)
        forced.append([] if ended == "stop" else rules.close)
        answer = row[start : start + cfg.max_answer_tokens]
        answers.append(cut_at_stop(answer, tokenizer, ANSWER_CLOSE))
        if len(thought) + len(forced[-1]) != start:
            again.append(i)
    if again:
        heads = [prompt_ids[i // k] + thoughts[i] + forced[i] for i in again]
        images = [vision[i // k] for i in again] if vision else None
        ids, mask, cache = read_prefixes(model, tokenizer, heads, images)
        budget = cfg.max_answer_tokens
        redone, _ = sample_rows(model, tokenizer, (ids, mask), cache, 1, budget, ANSWER_CLOSE, cfg, do_sample)
        for i, answer in zip(again, redone):
            answers[i] = answer
    return thoughts, forced, answers


def sample_tree(
    model, tokenizer, prompt_ids, k: int, m: int, cfg: Config, do_sample=True, vision=None, caches=None
):
    """GRPO-MA's two-stage rollout: K thoughts per prompt, then M answers per thought, which
    continue the thoughts' KV cache. A thought that ended by eos or budget is closed by appending
    </think> (never trained on); a sampled eos stays in it and is trained on, or nothing would
    teach the policy not to end a thought. `vision`: [P] image inputs (or None) for a VLM.
    With the run's `caches` (StaticCaches), it decodes on static caches, compiled."""
    was_training = model.training
    model.eval()
    close = tokenizer.encode(THINK_CLOSE, add_special_tokens=False)
    ids, mask, cache = read_prefixes(model, tokenizer, prompt_ids, vision)
    stages = [None, None]  # the static caches of stage 1 (P*K rows) and stage 2 (P*K*M rows)
    if caches is not None:
        length = ids.shape[1] + cfg.max_thought_tokens + 1 + len(close) + cfg.max_answer_tokens
        stages = [caches.get(len(prompt_ids) * k, length), caches.get(len(prompt_ids) * k * m, length)]
    if m == 1:  # nothing branches after a thought: its answer follows it in the same call
        sampled, forced, answers = sample_thought_then_answer(
            model, tokenizer, prompt_ids, (ids, mask), cache, k, cfg, do_sample, stages[0], vision
        )
    else:
        budget = cfg.max_thought_tokens
        thoughts, rows = sample_rows(
            model, tokenizer, (ids, mask), cache, k, budget, THINK_CLOSE, cfg, do_sample, stages[0]
        )
        if stages[0] is not None:
            cache = stages[0]  # the thoughts' rows, which the answers continue
        sampled = [ids for ids, _ in thoughts]
        forced = [[] if ended == "stop" else close for _, ended in thoughts]
        rows = continue_after(rows, cache, forced, tokenizer.pad_token_id)
        budget = cfg.max_answer_tokens
        answers, _ = sample_rows(
            model, tokenizer, rows, cache, m, budget, ANSWER_CLOSE, cfg, do_sample, stages[1]
        )
    model.train(was_training)
    thought_texts = tokenizer.batch_decode([s + f for s, f in zip(sampled, forced)], skip_special_tokens=True)
    answer_texts = tokenizer.batch_decode([ids for ids, _ in answers], skip_special_tokens=True)
    return Tree(
        prompt_ids,
        thought_ids=group_rows(sampled, k),
        forced_close=group_rows(forced, k),
        answer_ids=group_rows(group_rows([ids for ids, _ in answers], m), k),
        thoughts=group_rows(thought_texts, k),
        answers=group_rows(group_rows(answer_texts, m), k),
        answer_ended=group_rows(group_rows([ended for _, ended in answers], m), k),
        vision=vision or [],
    )


# ================================================================================================
# 4. Rewards: R[k, m] = sum_f w_f * f(prompt, thought_k, answer_km, example)
# ================================================================================================
RewardFn = Callable[[list[str], list[str], list[str], list[Example]], Sequence[float]]
# the number must fill the block: "<answer>18.5</answer>" is not 18 (an unclosed answer may stop)
ANSWER_PATTERN = re.compile(re.escape(ANSWER_OPEN) + r"\s*(-?\d+)\s*(?:" + re.escape(ANSWER_CLOSE) + r"|$)")
FORMAT_PATTERN = re.compile(re.escape(ANSWER_OPEN) + r"-?\d+" + re.escape(ANSWER_CLOSE))


def per_answer(fn: Callable[[str, str, str, Example], float]) -> RewardFn:
    """A per-answer score as a batched reward function (lists in, list out, as in TRL)."""

    def batched(prompts, thoughts, answers, examples):
        return [fn(p, t, a, e) for p, t, a, e in zip(prompts, thoughts, answers, examples)]

    batched.__name__ = fn.__name__
    return batched


def extract_answer(answer: str) -> str | None:
    found = ANSWER_PATTERN.search(answer)
    return found.group(1) if found else None


def answer_is_correct(answer: str, example: Example) -> bool:
    return extract_answer(answer) == example.answer


@per_answer
def accuracy(prompt, thought, answer, example) -> float:
    return float(answer_is_correct(answer, example))


@per_answer
def format_reward(prompt, thought, answer, example) -> float:
    """1 for an answer that is exactly <answer>NUMBER</answer>."""
    return float(FORMAT_PATTERN.fullmatch(answer.strip()) is not None)


def key_step_fraction(thought: str, key_steps: list[list[str]]) -> float:
    """The share of reference key steps in the thought; a step matches when any equivalent occurs."""
    text = thought.lower()
    found = sum(any(alt.lower() in text for alt in alternatives) for alternatives in key_steps)
    return found / max(len(key_steps), 1)


def reasoning_is_valid(thought: str, answer: str) -> bool:
    """StepRVR (R1-VL): the thought closes and holds only steps "n:a op b=c;", numbered 1..n,
    each from the previous result, and a closed answer block with a number follows."""
    body = thought.removesuffix(THINK_CLOSE)
    steps = STEP_PATTERN.findall(body)
    return (
        thought.endswith(THINK_CLOSE)
        and bool(steps)
        and "".join(f"{n}:{a}{op}{b}={c};" for n, a, op, b, c in steps) == body
        and [int(step[0]) for step in steps] == list(range(1, len(steps) + 1))
        and all(following[1] == previous[4] for previous, following in zip(steps, steps[1:]))
        and extract_answer(answer) is not None
        and ANSWER_CLOSE in answer
    )


def make_steprar(alpha: float) -> RewardFn:
    """StepRAR (R1-VL): correct + alpha * (share of key steps matched in the thought)."""

    def steprar(prompt, thought, answer, example) -> float:
        matched = key_step_fraction(thought, example.key_steps)
        return float(answer_is_correct(answer, example)) + alpha * matched

    return per_answer(steprar)


@per_answer
def steprvr(prompt, thought, answer, example) -> float:
    return float(reasoning_is_valid(thought, answer))


def reward_functions(cfg: Config) -> list[tuple[RewardFn, float]]:
    registry = dict(accuracy=accuracy, format=format_reward, steprvr=steprvr)
    registry["steprar"] = make_steprar(cfg.step_alpha)
    names = [name.strip() for name in cfg.reward.split(",") if name.strip()]
    unknown = [name for name in names if name not in registry]
    if not names or unknown:
        raise ValueError(f"--reward {cfg.reward!r}: unknown {unknown}; choose from {sorted(registry)}")
    try:
        weights = [float(w) for w in cfg.reward_weights.split(",")] if cfg.reward_weights else None
    except ValueError:
        raise ValueError(f"--reward-weights {cfg.reward_weights!r}: expected numbers") from None
    weights = weights or [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"--reward-weights has {len(weights)} values for {len(names)} rewards")
    return [(registry[name], weight) for name, weight in zip(names, weights)]


def score_answers(reward_fns, tree: Tree, examples: list[Example], prompts: list[str]) -> dict:
    """R[p, k, m] = sum_f w_f * f(prompt_p, thought_pk, answer_pkm, example_p), each answer on
    its own. Returns float32 (P, K, M) tensors: "total", and each f's values as "reward/<name>".
    A non-finite value or a wrong count is an error that names the function."""
    slots = tree.answer_slots()
    texts = [tree.answers[p][k][m] for p, k, m in slots]
    thoughts = [tree.thoughts[p][k] for p, k, _ in slots]
    inputs = ([prompts[p] for p, _, _ in slots], thoughts, texts, [examples[p] for p, _, _ in slots])
    shape = (len(tree.prompt_ids), len(tree.thought_ids[0]), len(tree.answer_ids[0][0]))
    scores = {"total": torch.zeros(shape, dtype=torch.float64)}
    for fn, weight in reward_fns:
        name = getattr(fn, "__name__", repr(fn))
        values = [float(v) for v in fn(*inputs)]
        if len(values) != len(slots):
            raise ValueError(f"reward function {name!r} gave {len(values)} values for {len(slots)} answers")
        bad = [i for i, v in enumerate(values) if not np.isfinite(v)]
        if bad:
            raise ValueError(f"reward function {name!r} gave {values[bad[0]]} for {texts[bad[0]]!r}")
        scores[f"reward/{name}"] = torch.tensor(values, dtype=torch.float64).view(shape)
        scores["total"] += weight * scores[f"reward/{name}"]
    return {name: values.float() for name, values in scores.items()}


# ================================================================================================
# 5. Advantages: one group-normalise helper, used at the thought and the answer level
# ================================================================================================
def group_normalise(values: torch.Tensor, *, scale: bool = True, ddof: int = 1, eps: float = 1e-4):
    """A = (x - mean x) / (std x + eps) over the last dim, in float64; scale=False: x - mean x.
    A group of equal values gets exactly 0. Scaled, A is computed in units of the group's range,
    u = (x - min x) / (max x - min x), as (u - mean u) / (std u + eps / range): otherwise values
    a few roundings apart round their mean onto one of them. (..., G) -> (..., G), dtype kept."""
    if values.shape[-1] <= ddof:  # no std from one value: only a constant group can occur
        return torch.zeros_like(values)
    x = values.double()
    low = x.amin(-1, keepdim=True)
    spread = x.amax(-1, keepdim=True) - low
    constant = spread == 0
    if scale:
        units = (x - low) / torch.where(constant, 1.0, spread)
        centred = units - units.mean(-1, keepdim=True)
        advantage = centred / (units.std(-1, correction=ddof, keepdim=True) + eps / spread)
    else:
        advantage = x - x.mean(-1, keepdim=True)
    return torch.where(constant, torch.zeros_like(advantage), advantage).to(values.dtype)


def ma_advantages(
    rewards: torch.Tensor, *, answer_pool: str = "all", scale: bool = True, ddof: int = 1, eps: float = 1e-4
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO-MA advantages (paper Eq. 3-5).

        V_k           = mean_m R[k, m]                           thought value
        A_thought[k]  = (V_k - mean_j V_j) / (std_j V_j + eps)    over the K thoughts
        A_answer[k,m] = (R[k,m] - mean R) / (std R + eps)         over all K*M answers ('all')
                                                                  or thought k's M ('thought')
    rewards: (..., K, M) -> (..., K), (..., K, M). With M = 1 both are GRPO's."""
    if rewards.dim() < 2:
        raise ValueError(f"rewards must have shape (..., K, M), got {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")
    if rewards.numel() and rewards.abs().max() > MAX_ABS_REWARD:
        raise ValueError(f"rewards must lie within +-{MAX_ABS_REWARD:g}: their squares would overflow")
    if answer_pool not in ("all", "thought"):
        raise ValueError(f"answer_pool must be 'all' or 'thought', got {answer_pool!r}")
    norm = dict(scale=scale, ddof=ddof, eps=eps)
    thought_adv = group_normalise(rewards.double().mean(-1), **norm).to(rewards.dtype)
    if answer_pool == "all":
        return thought_adv, group_normalise(rewards.flatten(-2), **norm).view_as(rewards)
    return thought_adv, group_normalise(rewards, **norm)


def zero_std_groups(values: torch.Tensor) -> int:
    """Groups (last dim) whose values are all equal: no signal (TRL's frac_reward_zero_std)."""
    return int((values.amax(-1) == values.amin(-1)).sum().item())


# ================================================================================================
# 6. Loss: PPO-clip surrogate + beta(s) * k3 KL, thought tokens counted once, computed on the tree
# ================================================================================================
def loss_weights(tree: Tree, aggregation: str, counted=None, max_length: int = 1, total=None):
    """w_t of each thought's [P][K] and each answer's [P][K][M] tokens in loss = sum_t w_t * L_t,
    fixed for the whole step, so micro-batches change nothing. Answers not `counted` ([P][K][M]
    bools) weigh 0; `total` sums the counts over processes. With N counted answers:
    token: 1 / counted tokens (a thought's counted once); GRPO's token mean at M = 1.
    sequence: 1 / (thoughts * its length), 1 / (N * its length): the paper's J_clip.
    grpo: each path thought + answer weighs 1 / (N * its length), the thought's share split
    among its M paths. dr_grpo: 1 / (N * max_length). grpo, dr_grpo: TRL's at M = 1."""
    counted = counted or [[[True] * len(by_k) for by_k in by_p] for by_p in tree.answer_ids]
    slots = tree.answer_slots()
    thought_len = {(p, k): len(tree.thought_ids[p][k]) for p, k in tree.thought_slots()}
    answer_len = {(p, k, m): len(tree.answer_ids[p][k][m]) for p, k, m in slots}
    is_counted = {(p, k, m): counted[p][k][m] for p, k, m in slots}
    counts = {
        "answers": sum(is_counted.values()),
        "tokens": sum(thought_len.values()) + sum(answer_len[s] * is_counted[s] for s in slots),
        "thoughts": sum(n > 0 for n in thought_len.values()),  # an empty thought has no mean
    }
    n = {key: max(value, 1) for key, value in (total(counts) if total else counts).items()}
    thought_w = [[0.0] * len(by_p) for by_p in tree.thought_ids]
    answer_w = [[[0.0] * len(by_k) for by_k in by_p] for by_p in tree.answer_ids]
    for p, k, m in slots:
        length, thought = answer_len[p, k, m], thought_len[p, k]
        share = {
            "token": 1 / n["tokens"],
            "sequence": 1 / (n["answers"] * max(length, 1)),
            "grpo": 1 / (n["answers"] * max(thought + length, 1)),
            "dr_grpo": 1 / (n["answers"] * max_length),
        }[aggregation]
        answer_w[p][k][m] = share * is_counted[p, k, m]
        if aggregation == "grpo":  # the mean of its M paths' shares
            thought_w[p][k] += answer_w[p][k][m] / len(answer_w[p][k])
        elif aggregation == "sequence":
            thought_w[p][k] = 1 / (n["thoughts"] * max(thought, 1))
        else:
            thought_w[p][k] = share
    return thought_w, answer_w


@dataclass
class TreeBatch:
    """A micro-batch of whole thoughts with their answers, laid out as the tree: each prompt
    once, each thought after its prompt, each answer after its thought. One advantage and one
    weight per counted token, in tree_logprobs' order: thought tokens, then answer tokens."""

    prompt_ids: torch.Tensor  # (P, Lp) left-padded
    prompt_mask: torch.Tensor  # (P, Lp)
    thought_ids: torch.Tensor  # (B, Lt) thought + forced close, right-padded
    thought_mask: torch.Tensor  # (B, Lt) bool: a real token
    thought_scored: torch.Tensor  # (B, Lt) bool: a sampled thought token (not a forced close)
    thought_prompt: torch.Tensor  # (B,) the prompt row each thought continues
    answer_ids: torch.Tensor  # (A, La) right-padded, thought-major
    answer_mask: torch.Tensor  # (A, La) bool: a sampled answer token
    answer_thought: torch.Tensor  # (A,) the thought row each answer continues
    advantages: torch.Tensor  # (Nt + Na,) A_thought on thought tokens, A_answer on answers'
    weights: torch.Tensor  # (Nt + Na,) each token's w_t
    vision: list = field(default_factory=list)  # [P] each prompt's image inputs, or empty


def padded_tokens(tree: Tree, slots: list[tuple[int, int]]) -> int:
    """A micro-batch's size as `build_tree_batch` lays it out: prompts, thoughts and answers,
    each level padded to its longest row."""
    prompts = {p for p, _ in slots}
    thoughts = [len(tree.thought_ids[p][k]) + len(tree.forced_close[p][k]) for p, k in slots]
    answers = [len(ids) for p, k in slots for ids in tree.answer_ids[p][k]]
    width = max(len(tree.prompt_ids[p]) for p in prompts)
    return len(prompts) * width + len(thoughts) * max(thoughts) + len(answers) * max(answers, default=0)


def pack_thoughts(tree: Tree, budget: int) -> list[list[tuple[int, int]]]:
    """Whole thoughts with their answers, in tree order, into micro-batches of at most `budget`
    padded tokens (a thought alone over it gets its own). Memory changes, the gradient not."""
    packs = [[]]
    for slot in tree.thought_slots():
        if packs[-1] and padded_tokens(tree, packs[-1] + [slot]) > budget:
            packs.append([])
        packs[-1].append(slot)
    return packs


def build_tree_batch(tree: Tree, slots, thought_adv, answer_adv, weights, pad_id: int, device) -> TreeBatch:
    """The micro-batch of thoughts `slots` [(p, k)] with their answers, advantages (thought_adv
    (P, K), answer_adv (P, K, M)) and `loss_weights`. A forced </think> is context, like the prompt."""
    prompt_row = {p: row for row, p in enumerate(dict.fromkeys(p for p, _ in slots))}
    thought_row = {slot: row for row, slot in enumerate(slots)}
    thoughts = [tree.thought_ids[p][k] + tree.forced_close[p][k] for p, k in slots]
    scored = [[True] * len(tree.thought_ids[p][k]) + [False] * len(tree.forced_close[p][k]) for p, k in slots]
    answers = [(p, k, m) for p, k in slots for m in range(len(tree.answer_ids[p][k]))]
    rows = [tree.answer_ids[p][k][m] for p, k, m in answers]
    thought_w, answer_w = weights
    per_token = [(thought_adv[p, k].item(), thought_w[p][k], len(tree.thought_ids[p][k])) for p, k in slots]
    per_token += [(answer_adv[s].item(), answer_w[s[0]][s[1]][s[2]], len(r)) for s, r in zip(answers, rows)]

    def tensor(values):
        return torch.tensor(values, device=device)

    return TreeBatch(
        *left_pad([tree.prompt_ids[p] for p in prompt_row], pad_id, device),
        thought_ids=tensor(right_pad(thoughts, pad_id)),
        thought_mask=tensor(right_pad([[True] * len(row) for row in thoughts], False)),
        thought_scored=tensor(right_pad(scored, False)),
        thought_prompt=tensor([prompt_row[p] for p, _ in slots]),
        answer_ids=tensor(right_pad(rows, pad_id)),
        answer_mask=tensor(right_pad([[True] * len(row) for row in rows], False)),
        answer_thought=tensor([thought_row[p, k] for p, k, _ in answers]),
        advantages=tensor([a for a, _, n in per_token for _ in range(n)]).float(),
        weights=tensor([w for _, w, n in per_token for _ in range(n)]).float(),
        vision=[tree.vision[p] for p in prompt_row] if tree.vision else [],
    )


def selected_logprobs(hidden: torch.Tensor, head, targets: torch.Tensor, temperature: float, chunk: int = 0):
    """log softmax(head(hidden) / T)[target] in float32 (as TRL: over the sampling temperature,
    so the ratio compares the distribution that sampled), a chunk of rows at a time, each
    recomputed in the backward: the logits (N, V) never exist at once.
    hidden: (N, H), targets: (N,) -> (N,) float32."""
    chunk = chunk or max(1, 2**26 // head.out_features)  # about 256 MB of float32 logits

    def chunk_logprobs(hidden_chunk, targets_chunk):
        scaled = head(hidden_chunk).float() / temperature
        return scaled.gather(-1, targets_chunk[:, None]).squeeze(-1) - scaled.logsumexp(-1)

    parts = [hidden.new_zeros(0, dtype=torch.float32)]
    for start in range(0, hidden.shape[0], chunk):
        args = (hidden[start : start + chunk], targets[start : start + chunk])
        if torch.is_grad_enabled():
            parts.append(checkpoint(chunk_logprobs, *args, use_reentrant=False))
        else:
            parts.append(chunk_logprobs(*args))
    return torch.cat(parts)


def continue_rows(body, cache, parents, context_mask, context_end, ids, mask):
    """Forward right-padded rows ids (B, L) that continue the cached rows `parents` (B,): the
    cache keeps a copy of its parent per row, attention covers the parent's real tokens and the
    row's, and positions count on from the parent's last, context_end ((P, 1), M-RoPE (3, P, 1)).
    Returns (hidden states (B, L, H), the attention mask so far (B, parent's width + L))."""
    cache.batch_select_indices(parents)
    attention = torch.cat([context_mask[parents], mask], 1).long()
    positions = context_end.index_select(-2, parents) + torch.arange(1, ids.shape[1] + 1, device=ids.device)
    out = body(input_ids=ids, attention_mask=attention, position_ids=positions, cache=cache, use_cache=True)
    return out.last_hidden_state, attention


def tree_logprobs(model, batch: TreeBatch, temperature: float) -> torch.Tensor:
    """log pi(token) of every counted token, computed the way the tree was sampled: each prompt
    is forwarded ONCE, images included; its KV cache is repeated for its thoughts, and each
    thought's for its M answers. No row re-encodes its prefix; a prefix's gradient collects
    what follows it through the cache. A row's first token is scored from its parent's last
    position. Returns (Nt + Na,) float32, in TreeBatch order."""
    from transformers import DynamicCache

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # LoRA
    body, head = causal_lm.model, causal_lm.lm_head
    cache = DynamicCache(config=model.config)
    inputs = model_inputs(model, batch.prompt_ids, batch.prompt_mask, batch.vision)
    prompt_last = body(**inputs, cache=cache, use_cache=True).last_hidden_state[:, -1:]  # (P, 1, H)
    prompt_end = inputs["position_ids"][..., -1:]
    rows = (batch.thought_prompt, batch.prompt_mask, prompt_end, batch.thought_ids, batch.thought_mask)
    thought_hidden, attention = continue_rows(body, cache, *rows)
    scorer = torch.cat([prompt_last[batch.thought_prompt], thought_hidden], 1)  # (B, Lt + 1, H)
    scored = batch.thought_scored
    thought_logps = selected_logprobs(scorer[:, :-1][scored], head, batch.thought_ids[scored], temperature)
    lengths = batch.thought_mask.sum(-1, keepdim=True)  # (B, 1), the forced close included
    thought_last = scorer.gather(1, lengths[..., None].expand(-1, 1, scorer.shape[-1]))  # (B, 1, H)
    thought_end = prompt_end.index_select(-2, batch.thought_prompt) + lengths
    answer_scorer = thought_last[batch.answer_thought]  # (A, 1, H)
    answer_ids, answer_mask = batch.answer_ids, batch.answer_mask
    if answer_ids.shape[1] > 1:  # the last answer token scores nothing: it is not fed
        rows = (batch.answer_thought, attention, thought_end, answer_ids[:, :-1], answer_mask[:, :-1])
        answer_scorer = torch.cat([answer_scorer, continue_rows(body, cache, *rows)[0]], 1)  # (A, La, H)
    answer_logps = selected_logprobs(answer_scorer[answer_mask], head, answer_ids[answer_mask], temperature)
    return torch.cat([thought_logps, answer_logps])


class TreeForward(torch.nn.Module):
    """`tree_logprobs` as one module call: DistributedDataParallel sees one forward per backward."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, batch: TreeBatch, temperature: float) -> torch.Tensor:
        return tree_logprobs(self.policy, batch, temperature)


def clipped_surrogate(logps, old_logps, advantages, eps_low: float, eps_high: float) -> torch.Tensor:
    """L_t = -min(rho_t * A, clip(rho_t, 1 - eps_low, 1 + eps_high) * A),
    rho_t = exp(logp - logp_old). All (N,) -> (N,)."""
    ratio = torch.exp(logps - old_logps)
    return -torch.min(ratio * advantages, ratio.clamp(1 - eps_low, 1 + eps_high) * advantages)


def k3_kl(logps, ref_logps) -> torch.Tensor:
    """KL_t = exp(ref - logp) - (ref - logp) - 1 (Schulman's k3: unbiased, >= 0). (N,) -> (N,)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def kl_beta(step: int, total_steps: int, cfg: Config) -> float:
    """beta(s). constant: cfg.beta. dynamic (GRPO-D, OThink-MR1): with w = explore_share * t and
    beta_mid = (beta_min + beta_max) / 2, fall linearly from beta_mid to beta_min over [0, w],
    then rise linearly to beta_max at t: explore first, then hold the policy near the reference."""
    if cfg.kl_schedule == "constant":
        return cfg.beta
    w = cfg.explore_share * total_steps
    beta_mid = (cfg.beta_min + cfg.beta_max) / 2
    if step <= w:
        return beta_mid - (beta_mid - cfg.beta_min) * step / w
    return cfg.beta_min + (cfg.beta_max - cfg.beta_min) * (step - w) / (total_steps - w)


def grpo_ma_loss(logps, old_logps, ref_logps, advantages, weights, beta: float, cfg: Config):
    """loss = sum_t w_t * (L_t + beta * KL_t), all (N,); w_t holds the aggregation. Returns
    (loss, sums for the metrics): clip_frac counts ratios outside the range, clip_ratio those
    it binds."""
    per_token = clipped_surrogate(logps, old_logps, advantages, cfg.epsilon, cfg.epsilon_high)
    ratio = torch.exp(logps - old_logps)
    sums = {"tokens": float(len(logps)), "kl": 0.0}
    if ref_logps is not None:
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * (ratio * kl if cfg.kl_bias_correction else kl)
        sums["kl"] = kl.sum().item()
    low, high = ratio.detach() < 1 - cfg.epsilon, ratio.detach() > 1 + cfg.epsilon_high
    sums["clip_frac"] = (low | high).sum().item()
    sums["clip_ratio"] = ((low & (advantages < 0)) | (high & (advantages > 0))).sum().item()
    return (weights * per_token).sum(), sums


# ================================================================================================
# 7. Train loop: warm-up -> evaluate -> [sample tree -> rewards -> advantages -> loss -> step]
# ================================================================================================
METRIC_KEYS = (
    "step", "reward_mean", "reward_std", "train_accuracy", "loss", "kl", "beta", "clip_frac", "clip_ratio",
    "grad_norm", "gss", "gss_over_10", "zero_std_thought_frac", "zero_std_answer_frac", "thought_len",
    "answer_len", "truncated_frac", "tokens_generated", "micro_batches", "rollout_seconds", "train_seconds",
    "eval_greedy_accuracy", "eval_sampled_accuracy",
)  # fmt: skip
FINAL = "final"  # the trained policy (LoRA: its adapter), as save_pretrained writes it
BASE = "base"  # a LoRA run's base model when it exists nowhere else (see `saves_base`)


def uses_bf16(cfg: Config, device: torch.device) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def forward_precision(cfg: Config, device: torch.device):
    """The context of every forward: bf16 autocast where `uses_bf16` (on a CPU, CPU autocast: CI
    runs the GPU numerics). Weights stay float32, AdamW's master copy. Never around an optimizer
    step: autocast keeps its bf16 copy of each weight until its context exits."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(cfg, device))


def pick_device(cfg: Config) -> torch.device:
    """The CPU, or the current CUDA device (grpo_ma_run.py sets each process's)."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def encode_prompts(tokenizer, examples: list[Example], processor=None) -> tuple[list, list, list]:
    """(prompt texts, token ids, image inputs: [] for a text model, else [P] dicts of
    pixel_values and image_grid_thw, or None). The processor expands each image marker."""
    if processor is None and any(e.images for e in examples):
        raise ValueError("the examples carry images, but the model is a text model")
    if processor is None or not any(e.images for e in examples):
        prompts = [format_prompt(tokenizer, e.question) for e in examples]
        return prompts, [tokenizer.encode(p, add_special_tokens=False) for p in prompts], []
    prompts = [format_prompt(processor, e.question, len(e.images)) for e in examples]
    prompt_ids, vision = [], []
    for prompt, example in zip(prompts, examples):
        encoded = processor(text=[prompt], images=example.images or None, return_tensors="pt")
        prompt_ids.append(encoded["input_ids"][0].tolist())
        images = {key: encoded[key] for key in ("pixel_values", "image_grid_thw") if key in encoded}
        vision.append(images or None)
    return prompts, prompt_ids, vision


@dataclass
class Run:
    """What a run trains, where, and on what: the policy, its tokenizer (and processor), the
    training pool (None: the embedded generator), the held-out set, the rewards, the answer
    check and the data stream."""

    policy: torch.nn.Module
    tokenizer: object
    processor: object | None
    device: torch.device
    data_rng: random.Random
    pool: list[Example] | None
    eval_examples: list[Example]
    reward_fns: list[tuple[RewardFn, float]]
    is_correct: Callable[[str, Example], bool]
    forward: torch.nn.Module | None = None  # TreeForward(policy), in DDP under torchrun
    sampler: torch.nn.Module | None = None  # LoRA: a copy of the base for rollouts (`rollout_policy`)
    decode_caches: StaticCaches | None = None  # with --compile-decode: rollouts' static caches


def start_run(
    cfg: Config, train_pool=None, eval_examples=None, reward_fns=None, is_correct=answer_is_correct
):
    """Seed every RNG, then load the policy: the order of draws every run starts from, so a warm
    start made elsewhere (paper_figures/) is train()'s. By default the embedded task."""
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg)
    policy, tokenizer, processor = load_policy(cfg, device)
    if cfg.freeze_vision:
        freeze_vision_tower(policy)
    pool = None if train_pool is None else list(train_pool)
    eval_examples = held_out_examples(cfg) if eval_examples is None else list(eval_examples)
    task = (pool, eval_examples, reward_fns or reward_functions(cfg), is_correct)
    run = Run(policy, tokenizer, processor, device, random.Random(cfg.seed), *task, TreeForward(policy))
    run.decode_caches = static_decode_caches(cfg, policy, device)
    return run


def static_decode_caches(cfg: Config, policy, device: torch.device) -> StaticCaches | None:
    """The rollouts' static caches when decoding is compiled: --compile-decode on, or auto on CUDA."""
    if cfg.compile_decode == "on" or (cfg.compile_decode == "auto" and device.type == "cuda"):
        return StaticCaches(policy.config)
    return None


def supervised_warmup(run: Run, cfg: Config) -> list[float]:
    """Cross-entropy on reference solutions (thought and answer tokens, never the prompt), so the
    start policy knows the format and is partly right: RL has signal and room. Returns losses."""
    losses, tokenizer = [], run.tokenizer
    optimizer = torch.optim.AdamW(run.policy.parameters(), lr=cfg.warmup_lr)
    run.policy.train()
    for _ in tqdm(range(cfg.warmup_steps), desc="warm-up", leave=False):
        examples = draw_examples(run.data_rng, cfg.warmup_batch, cfg, run.pool)
        _, prompt_ids, vision = encode_prompts(tokenizer, examples, run.processor)
        solutions = [e.thought + ANSWER_OPEN + e.answer + ANSWER_CLOSE for e in examples]
        eos = [tokenizer.eos_token_id]
        completions = [tokenizer.encode(s, add_special_tokens=False) + eos for s in solutions]
        rows = [p + c for p, c in zip(prompt_ids, completions)]
        ids = torch.tensor(right_pad(rows, tokenizer.pad_token_id), device=run.device)
        mask = torch.tensor(right_pad([[1] * len(row) for row in rows], 0), device=run.device)
        targets = right_pad([[-100] * len(p) + c for p, c in zip(prompt_ids, completions)], -100)
        targets = torch.tensor(targets, device=run.device)[:, 1:]  # position t predicts token t + 1
        with forward_precision(cfg, run.device):
            logits = run.policy(**model_inputs(run.policy, ids, mask, vision)).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    optimizer.zero_grad(set_to_none=True)  # frozen weights keep .grad: none may reach RL's clipping
    return losses


@torch.no_grad()
def evaluate(run: Run, cfg: Config, examples: list[Example] | None = None) -> dict[str, float]:
    """Held-out accuracy with one thought and one answer per prompt, greedy and sampled (from
    torch's global RNG, like training)."""
    examples = run.eval_examples if examples is None else examples
    policy = rollout_policy(run)  # once, outside autocast: the adapters fold in at full precision
    accuracy = {}
    for mode in ("greedy", "sampled"):
        correct = 0
        for start in range(0, len(examples), 100):
            part = examples[start : start + 100]
            _, prompt_ids, vision = encode_prompts(run.tokenizer, part, run.processor)
            with forward_precision(cfg, run.device):
                tree = sample_tree(
                    policy, run.tokenizer, prompt_ids, 1, 1, cfg, mode == "sampled", vision, run.decode_caches
                )
            correct += sum(run.is_correct(tree.answers[p][0][0], e) for p, e in enumerate(part))
        accuracy[f"eval_{mode}_accuracy"] = correct / len(examples)
    return accuracy


@dataclass
class Progress:
    """How far the run has come, besides weights, optimizer and RNGs."""

    step: int = 0
    grad_norms: list[float] = field(default_factory=list)
    gss_over_10: int = 0
    start_eval: dict = field(default_factory=dict)
    last_eval: dict = field(default_factory=dict)
    wall_seconds: float = 0.0  # of the run's finished parts, when it was resumed

    def gradient_spike_score(self, grad_norm: float, window: int) -> float | None:
        """GSS = |g_t| / mean |g| of the previous `window` steps (None before any gradient);
        counts the steps with GSS > 10 (GSS@10)."""
        previous = self.grad_norms[-window:]
        mean = sum(previous) / len(previous) if previous else 0.0
        gss = grad_norm / mean if mean > 0 else None
        self.grad_norms = [*previous, grad_norm]
        self.gss_over_10 += int(gss is not None and gss > 10)
        return gss


@dataclass(frozen=True)
class Processes:
    """The processes that share a step: this one's rank, their count, and how a dict of numbers
    is summed over them. One by default; grpo_ma_run.py hands in torchrun's."""

    rank: int = 0
    count: int = 1
    sum: Callable[[dict], dict] | None = None  # None: one process, its numbers are the totals

    def total(self, numbers: dict) -> dict:
        return numbers if self.sum is None else self.sum(numbers)


def rollout_sums(tree: Tree, scores: dict, examples: list[Example], cfg: Config, is_correct) -> dict:
    """The step's rollouts as sums and counts, which processes add before `rollout_metrics`."""
    rewards = scores["total"].double()  # (P, K, M)
    answer_groups = rewards.flatten(-2) if cfg.answer_pool == "all" else rewards
    thoughts, answers = tree.thought_slots(), tree.answer_slots()
    sums = {
        "answers": rewards.numel(),
        "reward": rewards.sum().item(),
        "reward_squared": rewards.square().sum().item(),
        "correct": sum(is_correct(tree.answers[p][k][m], examples[p]) for p, k, m in answers),
        "thoughts": len(thoughts),
        "thought_tokens": sum(len(tree.thought_ids[p][k]) for p, k in thoughts),
        "answer_tokens": sum(len(tree.answer_ids[p][k][m]) for p, k, m in answers),
        "truncated": sum(bool(tree.forced_close[p][k]) for p, k in thoughts),
        "thought_groups": rewards.shape[0],
        "zero_std_thought": zero_std_groups(rewards.mean(-1)),
        "answer_groups": answer_groups[..., 0].numel(),
        "zero_std_answer": zero_std_groups(answer_groups),
    }
    return sums | {name: values.double().sum().item() for name, values in scores.items() if name != "total"}


def rollout_metrics(sums: dict) -> dict:
    """The step's rollouts: reward, accuracy, zero-std groups, lengths, truncation."""
    n = sums["answers"]
    mean = sums["reward"] / n
    variance = max(sums["reward_squared"] - n * mean**2, 0.0) / max(n - 1, 1)  # unbiased, as torch.std
    metrics = {
        "reward_mean": mean,
        "reward_std": variance**0.5,
        "train_accuracy": sums["correct"] / n,
        "zero_std_thought_frac": sums["zero_std_thought"] / sums["thought_groups"],
        "zero_std_answer_frac": sums["zero_std_answer"] / sums["answer_groups"],
        "thought_len": sums["thought_tokens"] / sums["thoughts"],
        "answer_len": sums["answer_tokens"] / n,
        "truncated_frac": sums["truncated"] / sums["thoughts"],
        "tokens_generated": sums["thought_tokens"] + sums["answer_tokens"],
    }
    return metrics | {name: value / n for name, value in sums.items() if name.startswith("reward/")}


def reference_logprobs(reference, batch: TreeBatch, cfg: Config) -> torch.Tensor:
    """log pi_ref: the frozen start policy, or with LoRA the policy with its adapter off."""
    with reference.disable_adapter() if cfg.lora_rank else nullcontext():
        return tree_logprobs(reference, batch, cfg.temperature)


def train_step(
    step: int, run: Run, optimizer, progress: Progress, reference, cfg: Config, processes=Processes()
):
    """One GRPO-MA step: sample the tree, score it, advantages, then num_iterations optimizer
    steps, each accumulated over micro-batches of whole thoughts. With several processes each
    grows whole trees for its share of the prompts and DDP averages the gradients.
    Returns the step's metrics."""
    rollout_start = time.time()
    examples = draw_examples(run.data_rng, cfg.prompts_per_step, cfg, run.pool)  # same everywhere
    share = cfg.prompts_per_step // processes.count
    examples = examples[processes.rank * share : (processes.rank + 1) * share]
    prompts, prompt_ids, vision = encode_prompts(run.tokenizer, examples, run.processor)
    policy = rollout_policy(run)  # outside autocast: the adapters fold in at full precision
    with forward_precision(cfg, run.device):
        tree = sample_tree(
            policy, run.tokenizer, prompt_ids, cfg.thoughts, cfg.answers, cfg, True, vision, run.decode_caches
        )
    scores = score_answers(run.reward_fns, tree, examples, prompts)  # "total": (P, K, M)
    pool = dict(answer_pool=cfg.answer_pool, scale=cfg.scale_rewards, ddof=cfg.ddof)
    thought_adv, answer_adv = ma_advantages(scores["total"], **pool)  # (P, K), (P, K, M)
    counted = None
    if cfg.mask_truncated:  # leave out answers that hit their budget with neither </answer> nor eos
        counted = [[[ended != "budget" for ended in by_k] for by_k in by_p] for by_p in tree.answer_ended]
    max_length = cfg.max_thought_tokens + cfg.max_answer_tokens
    weights = loss_weights(tree, cfg.loss_agg, counted, max_length, processes.total)
    advantages = (thought_adv, answer_adv, weights, run.tokenizer.pad_token_id, run.device)
    batches = [
        build_tree_batch(tree, pack, *advantages) for pack in pack_thoughts(tree, cfg.micro_batch_tokens)
    ]
    rollout_seconds = time.time() - rollout_start

    train_start = time.time()
    beta = kl_beta(step, cfg.steps, cfg)
    run.policy.train()
    with torch.no_grad(), forward_precision(cfg, run.device):
        ref_logps = [None if reference is None else reference_logprobs(reference, b, cfg) for b in batches]
        old_logps = [tree_logprobs(run.policy, b, cfg.temperature) for b in batches if cfg.num_iterations > 1]
    grad_norms = []
    for _ in range(cfg.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        sums = {}
        for i, batch in enumerate(batches):  # gradients accumulate; the weights normalise the step
            last = i == len(batches) - 1
            with nullcontext() if processes.count == 1 or last else run.forward.no_sync():  # DDP syncs once
                with forward_precision(cfg, run.device):  # the forward only: see `forward_precision`
                    logps = run.forward(batch, cfg.temperature)
                # mu = 1: the sampling policy IS the current one, so rho = exp(0) = 1 exactly
                old = old_logps[i] if old_logps else logps.detach()
                loss, batch_sums = grpo_ma_loss(
                    logps, old, ref_logps[i], batch.advantages, batch.weights, beta, cfg
                )
                (loss * processes.count).backward()  # DDP averages over processes; the weights count all
            batch_sums["loss"] = loss.item()
            sums = {key: sums.get(key, 0.0) + value for key, value in batch_sums.items()}
        grad_norms.append(torch.nn.utils.clip_grad_norm_(run.policy.parameters(), cfg.grad_clip).item())
        optimizer.step()

    sums |= rollout_sums(tree, scores, examples, cfg, run.is_correct) | {"micro_batches": len(batches)}
    sums = processes.total(sums)
    grad_norm = max(grad_norms)  # with mu > 1 the largest: spikes are what it is logged for
    record = {"step": step, "loss": sums["loss"], "beta": beta, "grad_norm": grad_norm}
    record["kl"] = None if reference is None else sums["kl"] / sums["tokens"]
    record["clip_frac"] = sums["clip_frac"] / sums["tokens"]
    record["clip_ratio"] = sums["clip_ratio"] / sums["tokens"]
    record["gss"] = progress.gradient_spike_score(grad_norm, cfg.gss_window)
    record["gss_over_10"] = progress.gss_over_10
    record["micro_batches"] = round(sums["micro_batches"])  # forwards an iteration, all processes
    record |= rollout_metrics(sums)
    return record | {"rollout_seconds": rollout_seconds, "train_seconds": time.time() - train_start}


def saves_base(cfg: Config) -> bool:
    """A LoRA run whose base exists nowhere else (the embedded model, or weights the warm-up
    changed) saves it once in OUT/base, where its adapters (OUT/final) and a resume find it."""
    return cfg.lora_rank > 0 and (cfg.warmup_steps > 0 or cfg.model == EMBEDDED)


def base_source(cfg: Config, out: Path) -> str:
    """Where a LoRA run's base loads from: OUT/base, a hub id, or an absolute folder."""
    if saves_base(cfg):
        return str((out / BASE).resolve())
    return str(Path(cfg.model).resolve()) if Path(cfg.model).expanduser().is_dir() else cfg.model


def add_adapters(run: Run, cfg: Config, out: Path) -> None:
    """With --lora-rank, LoRA adapters on the (warmed-up) policy, named by their base
    (`base_source`), and a copy of the base that rollouts run on (`rollout_policy`). Where
    forwards run in bf16 the frozen base is held in bf16: nothing updates it, so it needs no
    float32 master copy; the adapters stay float32 with their AdamW state."""
    if not cfg.lora_rank:
        return
    if uses_bf16(cfg, run.device):
        run.policy.to(torch.bfloat16)
    run.sampler = copy.deepcopy(run.policy).requires_grad_(False)
    run.policy = add_lora(run.policy, cfg)
    run.policy.peft_config["default"].base_model_name_or_path = base_source(cfg, out)
    if cfg.freeze_vision:
        freeze_vision_tower(run.policy)
    run.forward = TreeForward(run.policy)


@torch.no_grad()
def rollout_policy(run: Run) -> torch.nn.Module:
    """The model rollouts are drawn from: the policy, or with LoRA the copy of its base with the
    current adapters folded in, W + (alpha / r) B A for each adapted weight W, refreshed at every
    call: decoding then runs no adapter matmuls. The KL reference stays the adapter-off policy."""
    if run.sampler is None:
        return run.policy
    from peft.tuners.lora import LoraLayer

    for name, module in run.policy.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            folded = module.base_layer.weight + module.get_delta_weight("default")
            run.sampler.get_submodule(name).weight.copy_(folded)
    return run.sampler


def kl_reference(run: Run, cfg: Config):
    """pi_ref: None when beta(s) is 0 throughout; with LoRA the policy itself (adapter off when
    scored); else a frozen copy of the start policy (a copy: building a new model would draw
    from the RNG that sampling continues from)."""
    if (cfg.beta if cfg.kl_schedule == "constant" else cfg.beta_max) == 0:
        return None
    if cfg.lora_rank:
        return run.policy
    return copy.deepcopy(run.policy).eval().requires_grad_(False)


def write_metrics(path: Path, record: dict) -> None:
    """One JSON line per step, the same keys every time (null where nothing was measured)."""
    keys = list(METRIC_KEYS) + sorted(key for key in record if key.startswith("reward/"))
    with path.open("a") as f:
        f.write(json.dumps({key: record.get(key) for key in keys}) + "\n")


def save_model(run: Run, folder: Path, model=None) -> None:
    """A model (the policy by default) and its tokenizer or processor, as transformers saves
    them: a folder that --model and from_pretrained load."""
    (model or run.policy).save_pretrained(folder)
    (run.processor or run.tokenizer).save_pretrained(folder)


def say_accuracy(what: str, start: dict, end: dict | None = None) -> None:
    """One line: held-out accuracy, greedy and sampled (start -> end)."""
    parts = []
    for mode in ("greedy", "sampled"):
        key = f"eval_{mode}_accuracy"
        parts.append(f"{mode} {start[key]:.3f}" + (f" -> {end[key]:.3f}" if end else ""))
    print(f"{what}: held-out accuracy " + ", ".join(parts))


def summarise(cfg: Config, progress: Progress, device: torch.device, processes: int = 1) -> dict:
    """The run in numbers: held-out accuracy at the start and the end, spikes, time, device."""
    summary = {"config": f"T{cfg.thoughts}A{cfg.answers}", "seed": cfg.seed, "steps": cfg.steps}
    for when, accuracy in (("start", progress.start_eval), ("final", progress.last_eval)):
        summary |= {
            f"{when}_{mode}_accuracy": accuracy[f"eval_{mode}_accuracy"] for mode in ("greedy", "sampled")
        }
    summary |= {"gss_over_10": progress.gss_over_10, "wall_seconds": progress.wall_seconds}
    summary["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return summary | {"processes": processes}


def finish(run: Run, cfg: Config, progress: Progress, out: Path, processes: int = 1) -> dict:
    """The end of a run: the policy in OUT/final (LoRA: its adapter; --save-merged adds the merged
    model), OUT/summary.json, and one line."""
    save_model(run, out / FINAL)
    if cfg.lora_rank and cfg.save_merged:
        save_model(run, out / "final-merged", rollout_policy(run))
    summary = summarise(cfg, progress, run.device, processes)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    say_accuracy("after GRPO-MA", progress.start_eval, progress.last_eval)
    return summary


def train(cfg: Config, train_pool=None, eval_examples=None, reward_fns=None, is_correct=answer_is_correct):
    """The whole run in one process: warm-up, evaluate, cfg.steps GRPO-MA steps, evaluate.
    Writes OUT/config.json, metrics.jsonl, summary.json and final/; returns the summary. A recipe
    (demos/) passes its own examples, held-out set, rewards and answer check."""
    started = time.time()
    validate_config(cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun's processes would each write OUT
        raise ValueError("grpo_ma.py trains in one process: under torchrun, run grpo_ma_run.py")
    out = Path(cfg.out)
    if any((out / name).exists() for name in ("config.json", "metrics.jsonl", "summary.json", FINAL)):
        raise ValueError(f"--out {out} holds another run: choose another folder (grpo_ma_run.py resumes)")
    run = start_run(cfg, train_pool, eval_examples, reward_fns, is_correct)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    supervised_warmup(run, cfg)
    if saves_base(cfg):
        save_model(run, out / BASE)
    add_adapters(run, cfg, out)  # after the warm-up: the adapter switched off is the start policy
    reference = kl_reference(run, cfg)
    trainable = [p for p in run.policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)

    progress = Progress(start_eval=evaluate(run, cfg))
    progress.last_eval = progress.start_eval
    (out / "metrics.jsonl").write_text("")
    write_metrics(out / "metrics.jsonl", {"step": 0, **progress.start_eval})
    say_accuracy("start policy", progress.start_eval)
    for step in tqdm(range(1, cfg.steps + 1), desc="GRPO-MA", unit="step"):
        record = train_step(step, run, optimizer, progress, reference, cfg)
        progress.step = step
        if step % cfg.eval_every == 0 or step == cfg.steps:
            progress.last_eval = evaluate(run, cfg)
            record |= progress.last_eval
        write_metrics(out / "metrics.jsonl", record)
    progress.wall_seconds = time.time() - started
    return finish(run, cfg, progress, out)


# ================================================================================================
# 8. CLI: one flag per Config field
# ================================================================================================
def build_parser(defaults: Config | None = None, parser: argparse.ArgumentParser | None = None):
    """One flag per field of the defaults' dataclass (Config, or a subclass with more fields);
    a recipe passes its own defaults (and parser) to reuse every flag."""
    defaults = defaults or Config()
    parser = parser or argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    for f in dataclasses.fields(defaults):
        default = getattr(defaults, f.name)
        text = f.metadata["help"] + " (default: %(default)s)"
        if isinstance(default, bool):
            parser.add_argument(
                flag(f.name), action=argparse.BooleanOptionalAction, default=default, help=text
            )
        else:
            parser.add_argument(flag(f.name), type=type(default), default=default, help=text)
    return parser


def run_cli(entry: Callable, *args, debug: bool = False, say_errors: bool = True):
    """entry(*args) as a command: an error is one line on stderr (unless say_errors is False:
    another process says it) and exit status 1; the traceback only under --debug."""
    try:
        return entry(*args)
    except (ValueError, OSError, RuntimeError) as error:
        if debug:
            raise
        if say_errors:
            print(f"error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def parse_args(argv: Sequence[str] | None = None, defaults: Config | None = None) -> Config:
    """Flags -> a Config (or the dataclass of `defaults`)."""
    defaults = defaults or Config()
    args = vars(build_parser(defaults).parse_args(argv))
    args.pop("debug")
    return type(defaults)(**args)


def main(argv: Sequence[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    return run_cli(train, parse_args(argv), debug="--debug" in argv)


if __name__ == "__main__":
    main()
