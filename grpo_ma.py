"""GRPO-MA in one file: tree-style GRPO with K thoughts per prompt and M answers per thought.

GRPO-MA (arXiv 2509.24494, "Why Tree-Style Branching Matters for Thought Advantage Estimation in GRPO")
samples K thoughts per prompt, then M answers per thought. A thought's value is the mean reward of its M
answers, so its advantage is estimated from M signals instead of one; thought tokens and answer tokens get
separate advantages. `python grpo_ma.py` trains a small Qwen2 on a synthetic arithmetic task on a CPU.

The file reads in the order the algorithm runs: 1. config, 2. task and model, 3. two-stage sampling,
4. rewards, 5. advantages, 6. loss on the tree, 7. train loop, 8. CLI. docs/algorithm.md states the
algorithm in full and ends with the one list of where this code departs from the paper or chooses where it
is silent; theory/README.md states the variance claims that theory/ checks.
"""

import argparse
import copy
import dataclasses
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

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
ANSWER_OPEN = "<answer>"
ANSWER_CLOSE = "</answer>"
FORMAT_MARKERS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
EMBEDDED = "embedded"
MAX_ABS_REWARD = 1e150  # beyond this the float64 squares in the std overflow
AGGREGATIONS = ("token", "sequence", "grpo", "dr_grpo")  # TRL's names: dapo/bnpo, -, grpo, dr_grpo
SCHEDULES = ("constant", "dynamic")
TASK_FAMILIES = {"addsub": "+-", "muladd": "+-*"}  # the operators a problem draws from
PRECISIONS = ("auto", "fp32", "bf16")
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VISION_MARKERS = ("image", "video", "vision_start", "vision_end")  # a Qwen2-VL config's <name>_token_id
PROGRESS_BARS = True  # grpo_ma_run.py turns them off in every process but the first


# ================================================================================================
# 1. Config: every default visible, every field a CLI flag, every bound checked before any work
# ================================================================================================
def setting(default, help: str, **extra):
    """A Config field: its help text and optionally `choices` or bounds: low (>=), above (>), below (<)."""
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class Config:
    # the tree: T{K}A{M}
    thoughts: int = setting(4, "K: thoughts sampled per prompt (stage 1); a group needs 2", low=2)
    answers: int = setting(4, "M: answers sampled per thought (stage 2); M=1 is plain GRPO", low=1)
    prompts_per_step: int = setting(8, "prompts per optimizer step", low=1)
    steps: int = setting(150, "GRPO-MA optimizer steps", low=0)
    micro_batch_tokens: int = setting(4096, "padded tokens per forward: whole thoughts are packed", low=1)
    # the embedded model's supervised warm-up
    warmup_steps: int = setting(450, "supervised warm-up steps on reference solutions before RL", low=0)
    warmup_lr: float = setting(1e-3, "learning rate of the supervised warm-up", above=0)
    warmup_batch: int = setting(64, "examples per supervised warm-up step", low=1)
    # optimisation
    lr: float = setting(5e-5, "AdamW learning rate for GRPO-MA", above=0)
    grad_clip: float = setting(1.0, "clip the global gradient norm to this value", above=0)
    num_iterations: int = setting(1, "mu: optimizer steps per rollout batch (1: ratio == 1)", low=1)
    # loss
    beta: float = setting(0.04, "KL weight for --kl-schedule constant (TRL's default)", low=0)
    kl_schedule: str = setting("constant", "beta(s): constant, or dynamic (GRPO-D)", choices=SCHEDULES)
    beta_min: float = setting(0.04, "GRPO-D: lowest beta, reached at the end of exploration", low=0)
    beta_max: float = setting(0.10, "GRPO-D: beta at the last step", low=0)
    explore_share: float = setting(0.3, "GRPO-D: w/t, the share of steps where beta falls", above=0, below=1)
    epsilon: float = setting(0.2, "lower clip range: ratio >= 1 - epsilon", low=0, below=1)
    epsilon_high: float = setting(0.2, "upper clip range: ratio <= 1 + epsilon_high (clip-higher)", low=0)
    loss_agg: str = setting("token", "token, sequence (J_clip), grpo, dr_grpo", choices=AGGREGATIONS)
    kl_bias_correction: bool = setting(False, "multiply the KL term by the ratio rho_t (TRL's default)")
    mask_truncated: bool = setting(False, "leave answers that never closed out of the loss")
    # advantages
    answer_pool: str = setting("all", "answer advantage group: K*M answers, or M", choices=("all", "thought"))
    scale_rewards: bool = setting(True, "divide by the group std (--no-scale-rewards: Dr. GRPO)")
    ddof: int = setting(1, "delta degrees of freedom of the std (1: unbiased)", choices=(0, 1))
    # rewards
    reward: str = setting("accuracy,format", "comma-separated: accuracy, format, steprar, steprvr")
    reward_weights: str = setting("", "comma-separated weights, one per reward (empty: all 1)")
    step_alpha: float = setting(0.1, "StepRAR: weight of the key-step match fraction")
    # sampling
    temperature: float = setting(1.0, "sampling temperature; the loss divides logits by it too", above=0)
    max_thought_tokens: int = setting(40, "token budget of a thought (then closed by force)", low=1)
    max_answer_tokens: int = setting(10, "token budget of an answer", low=1)
    # task and model
    task: str = setting("addsub", "embedded task family for training", choices=tuple(TASK_FAMILIES))
    eval_task: str = setting("", "held-out task family (empty: --task)", choices=("", *TASK_FAMILIES))
    model: str = setting(EMBEDDED, "'embedded' (built here), or a hub id or folder of a Qwen model")
    lora_rank: int = setting(0, "LoRA rank, adapters added after the warm-up; 0: full fine-tuning", low=0)
    lora_alpha: int = setting(16, "LoRA alpha: the adapters' update is scaled by alpha / rank", low=1)
    lora_dropout: float = setting(0.0, "LoRA dropout", low=0, below=1)
    lora_targets: str = setting(",".join(LORA_TARGETS), "the modules LoRA adapts")
    freeze_vision: bool = setting(False, "never train a VLM's vision tower (nor adapters in it)")
    device: str = setting("auto", "auto (cuda if available), cpu or cuda", choices=("auto", "cpu", "cuda"))
    precision: str = setting("auto", "forwards: auto (bf16 on CUDA), fp32, bf16", choices=PRECISIONS)
    seed: int = setting(0, "seed of data, model init and sampling")
    # the run's folder
    out: str = setting("runs/default", "output folder: config, metrics, summary, final/ (LoRA: base/)")
    save_merged: bool = setting(False, "with LoRA: also save the merged model in OUT/final-merged")
    eval_every: int = setting(50, "held-out evaluation every N steps (and at start and end)", low=1)
    eval_size: int = setting(200, "held-out prompts per evaluation", low=1)
    gss_window: int = setting(50, "steps in the gradient-spike-score running mean", low=1)


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def validate_config(cfg: Config) -> None:
    """Reject, before any work, every setting that would fail later or give a silent wrong result."""
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
    rules = [
        (cfg.answer_pool != "thought" or cfg.answers >= 2, "--answer-pool thought needs --answers >= 2"),
        (cfg.beta_min <= cfg.beta_max, f"--beta-min {cfg.beta_min} exceeds --beta-max {cfg.beta_max}"),
        (cfg.kl_schedule != "dynamic" or cfg.steps >= 1, "--kl-schedule dynamic needs --steps >= 1"),
    ]
    for ok, message in rules:
        if not ok:
            raise ValueError(message)
    # a hub id is 'name' or 'org/name'; anything else is meant as a folder, which must exist
    as_path = cfg.model.startswith((".", "/", "~")) or cfg.model.count("/") > 1 or Path(cfg.model).exists()
    if cfg.model != EMBEDDED and as_path and not Path(cfg.model).expanduser().is_dir():
        raise ValueError(f"--model {cfg.model}: no such folder")
    reward_functions(cfg)  # raises on unknown names or a weight count that does not match


# ================================================================================================
# 2. Task, tokenizer and model: the embedded default, or a real checkpoint through the same code
# ================================================================================================
@dataclass
class Example:
    question: str  # "2+9-6": operations applied left to right
    thought: str  # reference reasoning, the intermediate results: "1:2+9=11;</think>"
    key_steps: list[list[str]]  # each key step: a set of equivalent strings (StepRAR)
    answer: str  # "5": the answer applies the last operation to the last intermediate result
    images: list = field(default_factory=list)  # PIL images the question shows (vision-language models)


STEP_PATTERN = re.compile(r"(\d+):(\d+)([-+*])(\d+)=(-?\d+);")  # "2:11-6=5;"


def make_example(rng: random.Random, family: str) -> Example:
    """One problem of 2-3 operations. The thought writes every intermediate result; the answer must apply
    the last operation itself, so answers to one thought can differ: the M answers carry signal."""
    value = rng.randint(1, 9)
    question = str(value)
    steps = []
    key_steps = []
    for _ in range(rng.randint(2, 3)):
        op = rng.choice(TASK_FAMILIES[family])
        operand = rng.randint(1, 9)
        if op == "*":
            operand = rng.randint(2, 3)
        if op == "-" and operand > value:  # keep every intermediate result non-negative
            op = "+"
        result = {"+": value + operand, "-": value - operand, "*": value * operand}[op]
        step = f"{value}{op}{operand}={result}"
        question += f"{op}{operand}"
        value = result
        steps.append(step)
        commuted = [f"{operand}{op}{step.split(op)[0]}={result}"] if op in "+*" else []
        key_steps.append([step, *commuted])
    thought = "".join(f"{i}:{s};" for i, s in enumerate(steps[:-1], 1)) + THINK_CLOSE
    return Example(question, thought, key_steps[:-1], str(value))


def sample_examples(rng: random.Random, family: str, n: int, held_out: bool) -> list[Example]:
    """n examples from the training or the held-out split: a stable hash puts one question in five in the
    held-out split, so training never sees an evaluation question."""
    examples = []
    while len(examples) < n:
        example = make_example(rng, family)
        if (zlib.crc32(example.question.encode()) % 5 == 0) == held_out:
            examples.append(example)
    return examples


def held_out_examples(cfg: Config, family: str | None = None) -> list[Example]:
    """A run's evaluation set: fixed by the seed, from --eval-task (or `family`), never seen in training."""
    family = family or cfg.eval_task or cfg.task
    return sample_examples(random.Random(10_000 + cfg.seed), family, cfg.eval_size, held_out=True)


def draw_examples(rng: random.Random, n: int, cfg: Config, pool: list[Example] | None) -> list[Example]:
    """n training examples: from a recipe's pool, or fresh from the embedded generator."""
    if pool is not None:
        return rng.sample(pool, n)
    return sample_examples(rng, cfg.task, n, held_out=False)


SYSTEM_PROMPT = (
    f"Solve the problem step by step inside {THINK_OPEN} {THINK_CLOSE}, then give only the final "
    f"number inside {ANSWER_OPEN} {ANSWER_CLOSE}."
)


def format_prompt(tokenizer, question: str, images: int = 0) -> str:
    """The prompt ends with <think>, so everything the policy writes up to </think> is the thought. With
    images, `tokenizer` is a processor whose chat template places each image's marker before the question."""
    if getattr(tokenizer, "chat_template", None):
        content = [{"type": "image"}] * images + [{"type": "text", "text": question}]
        user = {"role": "user", "content": content if images else question}
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, user]
        chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return chat + THINK_OPEN
    return f"{question}=?{THINK_OPEN}"


def build_char_tokenizer():
    """Character-level tokenizer made with `tokenizers` (BPE with no merges = one token per character),
    with the four format markers as single added tokens, wrapped as a transformers fast tokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>"]
    # lowercase letters are not used by the task, but transformers' stop-string matcher probes them
    chars = list("0123456789+-*=?:;,. ()abcdefghijklmnopqrstuvwxyz\n")
    vocab = {token: i for i, token in enumerate(specials + chars)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(s, special=True) for s in specials])
    core.add_tokens([AddedToken(m, special=False, normalized=False) for m in FORMAT_MARKERS])
    specials = dict(pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    return PreTrainedTokenizerFast(tokenizer_object=core, **specials)


def build_embedded_model(tokenizer):
    """A small Qwen2ForCausalLM from a Qwen2Config: the architecture of Qwen2.5, 598,656 parameters."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    size = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, max_position_embeddings=128)
    heads = dict(num_attention_heads=4, num_key_value_heads=2)
    tokens = dict(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    tokens["eos_token_id"] = tokenizer.eos_token_id
    return Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=True, **size, **heads, **tokens))


def check_format_markers(tokenizer) -> None:
    """The thought/answer split needs each format marker to survive encode -> decode unchanged."""
    for marker in FORMAT_MARKERS:
        ids = tokenizer.encode(marker, add_special_tokens=False)
        if tokenizer.decode(ids) != marker or tokenizer.unk_token_id in ids:
            raise ValueError(f"tokenizer cannot write the format marker {marker!r} (encodes to {ids})")
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token: answers could never end")


def load_policy(cfg: Config, device: torch.device):
    """The embedded model (built here, no download) or a real checkpoint through the same code path: a causal
    LM, or a vision-language model (its config has a vision tower) with the processor that reads images.
    Returns (model, tokenizer, processor or None)."""
    import transformers as hf

    processor = None
    if cfg.model == EMBEDDED:
        tokenizer = build_char_tokenizer()
        model = build_embedded_model(tokenizer)
    else:
        try:
            # float32 master weights: AdamW on bf16 weights rounds away updates of lr ~1e-6; CUDA computes
            # in bf16 through autocast (see `forward_precision`)
            base = cfg.model
            adapter = Path(cfg.model).expanduser() / "adapter_config.json"  # a LoRA run's OUT/final
            if adapter.is_file():
                base = json.loads(adapter.read_text())["base_model_name_or_path"]
            if hasattr(hf.AutoConfig.from_pretrained(base), "vision_config"):
                processor = hf.AutoProcessor.from_pretrained(cfg.model)
                tokenizer = processor.tokenizer
                model = hf.AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
            else:
                tokenizer = hf.AutoTokenizer.from_pretrained(cfg.model)
                model = hf.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
            if adapter.is_file():  # the trained policy: the adapter merged into the base it names
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
    """Stop training the vision tower (Qwen2-VL's `visual` module, with any adapters inside it)."""
    frozen = [p for name, p in model.named_parameters() if "visual" in name.split(".")]
    if not frozen:
        raise ValueError("--freeze-vision: the model has no vision tower")
    for parameter in frozen:
        parameter.requires_grad_(False)


def add_lora(model, cfg: Config):
    """peft LoRA adapters on the attention and MLP projections: only they train, and the same model with
    `disable_adapter()` is the frozen start policy, the KL reference (no second copy in memory)."""
    from peft import LoraConfig, get_peft_model

    targets = [name.strip() for name in cfg.lora_targets.split(",") if name.strip()]
    sizes = dict(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout)
    return get_peft_model(model, LoraConfig(**sizes, target_modules=targets))


# ================================================================================================
# 3. Two-stage sampling: K thoughts per prompt, then M answers per thought
# ================================================================================================
@dataclass
class Tree:
    """One step's rollouts as nested lists: prompt p, its thought k, that thought's answer m. A rollout's
    place in the (P, K, M) tree is its position in these lists; nothing else encodes it."""

    prompt_ids: list[list[int]]  # [P][tokens]
    thought_ids: list[list[list[int]]]  # [P][K][tokens] sampled (ends with </think> unless forced)
    forced_close: list[list[list[int]]]  # [P][K][tokens] marker appended to a thought that never closed
    answer_ids: list[list[list[list[int]]]]  # [P][K][M][tokens] sampled (to </answer>, eos or budget)
    thoughts: list[list[str]]  # [P][K] decoded thought text, including </think>
    answers: list[list[list[str]]]  # [P][K][M] decoded answer text
    answer_ended: list = field(default_factory=list)  # [P][K][M] 'stop' (</answer>), 'eos' or 'budget'
    vision: list = field(default_factory=list)  # [P] a prompt's image inputs (see `model_inputs`) or None

    def thought_slots(self) -> list[tuple[int, int]]:
        """Every (p, k), prompt-major: the order of thoughts in generate() and in micro-batches."""
        return [(p, k) for p, thoughts in enumerate(self.thought_ids) for k in range(len(thoughts))]

    def answer_slots(self) -> list[tuple[int, int, int]]:
        """Every (p, k, m), prompt-major, then thought, then answer."""
        return [(p, k, m) for p, k in self.thought_slots() for m in range(len(self.answer_ids[p][k]))]

    def prefix(self, p: int, k: int) -> list[int]:
        """Prompt + thought + forced close: the context every answer of thought (p, k) continues."""
        return self.prompt_ids[p] + self.thought_ids[p][k] + self.forced_close[p][k]


def group_rows(rows: list, size: int) -> list[list]:
    """[a, b, c, d], 2 -> [[a, b], [c, d]]: generate()'s flat rows back into the tree."""
    return [rows[start : start + size] for start in range(0, len(rows), size)]


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids -> (ids, attention mask), both (B, width), padded on the left."""
    width = max(len(row) for row in rows)
    ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in rows], device=device)
    mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows], device=device)
    return ids, mask


def right_pad(rows: list[list], value) -> list[list]:
    width = max(len(row) for row in rows)
    return [row + [value] * (width - len(row)) for row in rows]


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded batch as generate() derives them: each row's first real token is 0."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def model_inputs(model, ids: torch.Tensor, mask: torch.Tensor, vision: list | None = None) -> dict:
    """Inputs of a padded batch (B, L) with explicit positions: for a text model each row's real tokens count
    from 0, as generate() derives them. A vision-language Qwen (Qwen2-VL, Qwen2.5-VL) also takes its rows'
    images (`vision`: [B] of that row's prompt's image inputs, or None) and 3-D rotary positions (M-RoPE:
    time, height, width; (3, B, L)) from its own get_rope_index: image tokens sit on their grid, and text
    continues after the largest position. This is the one place that knows about that model family."""
    inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask))
    images = [row for row in vision or [] if row is not None]
    if not images:
        return inputs
    grid = torch.cat([row["image_grid_thw"] for row in images]).to(ids.device)
    inputs |= dict(pixel_values=torch.cat([row["pixel_values"] for row in images]).to(ids.device))
    rope = next(module for module in model.modules() if hasattr(module, "get_rope_index"))
    image_tokens = (ids == model.config.image_token_id).int()
    positions, deltas = rope.get_rope_index(ids, image_tokens, image_grid_thw=grid, attention_mask=mask)
    rope.rope_deltas = deltas  # (B, 1): generate() continues each row's positions from these
    return inputs | dict(image_grid_thw=grid, position_ids=positions)


def cut_at_stop(ids: list[int], tokenizer, stop: str) -> tuple[list[int], str]:
    """Cut a generated row after the token that completes `stop`, or after eos, or keep it all.
    Returns (kept ids, how it ended: 'stop', 'eos' or 'budget'). Once a prefix's text holds `stop`, every
    longer prefix's does, so the shortest such prefix is found by bisection: log2(length) decodes, not one
    per token."""
    eos_end = ids.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in ids else len(ids) + 1
    if stop not in tokenizer.decode(ids[:eos_end]):
        return (ids[:eos_end], "eos") if eos_end <= len(ids) else (ids, "budget")
    low, high = 1, min(eos_end, len(ids))  # the shortest prefix holding `stop` ends within (low, high]
    while low < high:
        middle = (low + high) // 2
        if stop in tokenizer.decode(ids[:middle]):
            high = middle
        else:
            low = middle + 1
    return ids[:high], "stop"


@torch.no_grad()
def sample_continuations(
    model, tokenizer, prefixes, n: int, budget: int, stop: str, cfg: Config, do_sample: bool, vision=None
) -> list[tuple[list[int], str]]:
    """n continuations of every prefix, each cut by `cut_at_stop`, at exactly softmax(logits / T) (every
    knob a checkpoint's generation_config may set is pinned). The shared prefix (with its images, `vision`
    [B]) is prefilled ONCE and its KV cache repeated n times. Returns (ids, how it ended), prefix-major:
    continuation j of prefix i is i*n+j."""
    from transformers import DynamicCache

    ids, mask = left_pad(prefixes, tokenizer.pad_token_id, model.device)
    if do_sample:
        kwargs = dict(do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0)
    else:
        kwargs = dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    kwargs |= dict(max_new_tokens=budget, repetition_penalty=1.0, pad_token_id=tokenizer.pad_token_id)
    stop_ids = tokenizer.encode(stop, add_special_tokens=False)
    if len(stop_ids) == 1:  # a marker of one token ends a row like eos does: nothing to match per step
        kwargs["eos_token_id"] = [tokenizer.eos_token_id, *stop_ids]
    else:  # transformers matches the text, whichever tokens spell it
        kwargs |= dict(eos_token_id=tokenizer.eos_token_id, stop_strings=[stop], tokenizer=tokenizer)
    # a VLM never writes an image marker: one in a thought would be read as an image that is not there
    markers = [getattr(model.config, f"{name}_token_id", None) for name in VISION_MARKERS]
    kwargs["suppress_tokens"] = [token for token in markers if token is not None]
    if ids.shape[1] > 1:  # all but the last token: generate() feeds that one and continues the cache
        kwargs["cache"] = DynamicCache(config=model.config)
        inputs = model_inputs(model, ids[:, :-1], mask[:, :-1], vision)
        model(**inputs, cache=kwargs["cache"], use_cache=True, logits_to_keep=1)
        kwargs["cache"].batch_repeat_interleave(n)
        for module in model.modules():  # a VLM's rope offsets follow its rows (see `model_inputs`)
            if getattr(module, "rope_deltas", None) is not None:
                module.rope_deltas = module.rope_deltas.repeat_interleave(n, dim=0)
    ids = ids.repeat_interleave(n, dim=0)
    mask = mask.repeat_interleave(n, dim=0)
    new = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1] :]
    return [cut_at_stop(row, tokenizer, stop) for row in new.tolist()]


def sample_tree(
    model, tokenizer, prompt_ids, k: int, m: int, cfg: Config, do_sample: bool = True, vision=None
) -> Tree:
    """The two stages of GRPO-MA rollout: K thoughts per prompt, then M answers per thought. A thought that
    ended by eos or budget is closed by appending the marker (never trained on). A sampled eos stays in the
    thought and is trained on with it: dropped, nothing would ever teach the policy not to end a thought.
    `vision`: [P] each prompt's image inputs (or None) for a vision-language model."""
    was_training = model.training
    model.eval()
    close_ids = tokenizer.encode(THINK_CLOSE, add_special_tokens=False)
    thoughts = sample_continuations(
        model, tokenizer, prompt_ids, k, cfg.max_thought_tokens, THINK_CLOSE, cfg, do_sample, vision
    )
    sampled = [ids for ids, _ in thoughts]
    forced = [[] if ended == "stop" else close_ids for _, ended in thoughts]
    tree = Tree(prompt_ids, group_rows(sampled, k), group_rows(forced, k), [], [], [], [], vision or [])
    prefixes = [tree.prefix(p, j) for p, j in tree.thought_slots()]
    rows = [tree.vision[p] for p, _ in tree.thought_slots()] if tree.vision else None
    answers = sample_continuations(
        model, tokenizer, prefixes, m, cfg.max_answer_tokens, ANSWER_CLOSE, cfg, do_sample, rows
    )
    model.train(was_training)
    tree.answer_ids = group_rows(group_rows([ids for ids, _ in answers], m), k)
    tree.answer_ended = group_rows(group_rows([ended for _, ended in answers], m), k)
    texts = tokenizer.batch_decode([s + f for s, f in zip(sampled, forced)], skip_special_tokens=True)
    tree.thoughts = group_rows(texts, k)
    texts = tokenizer.batch_decode([ids for ids, _ in answers], skip_special_tokens=True)
    tree.answers = group_rows(group_rows(texts, m), k)
    return tree


# ================================================================================================
# 4. Rewards: R[k, m] = sum_f w_f * f(prompt, thought_k, answer_km, example)
# ================================================================================================
RewardFn = Callable[[list[str], list[str], list[str], list[Example]], Sequence[float]]
# the number must fill the answer block: "<answer>18.5</answer>" is not 18 (an unclosed answer may just stop)
ANSWER_PATTERN = re.compile(re.escape(ANSWER_OPEN) + r"\s*(-?\d+)\s*(?:" + re.escape(ANSWER_CLOSE) + r"|$)")
FORMAT_PATTERN = re.compile(re.escape(ANSWER_OPEN) + r"-?\d+" + re.escape(ANSWER_CLOSE))


def per_answer(fn: Callable[[str, str, str, Example], float]) -> RewardFn:
    """Lift a per-answer score to a batched reward function (lists in, list out, as in TRL)."""

    def batched(prompts, thoughts, answers, examples):
        return [fn(p, t, a, e) for p, t, a, e in zip(prompts, thoughts, answers, examples)]

    batched.__name__ = fn.__name__
    return batched


def extract_answer(answer: str) -> str | None:
    """The number after <answer>; an answer that never closed is read as it stands."""
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
    """Fraction of reference key steps found in the thought; a step matches when any equivalent occurs."""
    text = thought.lower()
    found = sum(any(alt.lower() in text for alt in alternatives) for alternatives in key_steps)
    return found / max(len(key_steps), 1)


def reasoning_is_valid(thought: str, answer: str) -> bool:
    """StepRVR (R1-VL): the reasoning is complete and in order: the thought closes and holds only steps
    "n:a op b=c;", numbered 1..n, each starting from the previous step's result; a closed answer block with a
    number follows the last step."""
    if not thought.endswith(THINK_CLOSE):
        return False
    body = thought[: -len(THINK_CLOSE)]
    steps = STEP_PATTERN.findall(body)
    if not steps or "".join(f"{n}:{a}{op}{b}={c};" for n, a, op, b, c in steps) != body:
        return False
    if [int(step[0]) for step in steps] != list(range(1, len(steps) + 1)):
        return False
    if any(following[1] != previous[4] for previous, following in zip(steps, steps[1:])):
        return False
    return extract_answer(answer) is not None and ANSWER_CLOSE in answer


def make_steprar(alpha: float) -> RewardFn:
    """StepRAR (R1-VL): correct + alpha * (fraction of key steps matched in the thought)."""

    def steprar(prompt, thought, answer, example) -> float:
        matched = key_step_fraction(thought, example.key_steps)
        return float(answer_is_correct(answer, example)) + alpha * matched

    return per_answer(steprar)


@per_answer
def steprvr(prompt, thought, answer, example) -> float:
    return float(reasoning_is_valid(thought, answer))


def reward_functions(cfg: Config) -> list[tuple[RewardFn, float]]:
    registry = {"accuracy": accuracy, "format": format_reward, "steprar": make_steprar(cfg.step_alpha)}
    registry["steprvr"] = steprvr
    names = [name.strip() for name in cfg.reward.split(",") if name.strip()]
    unknown = [name for name in names if name not in registry]
    if not names or unknown:
        raise ValueError(f"--reward {cfg.reward!r}: unknown {unknown}; choose from {sorted(registry)}")
    weights = [1.0] * len(names)
    if cfg.reward_weights:
        try:
            weights = [float(w) for w in cfg.reward_weights.split(",")]
        except ValueError:
            raise ValueError(f"--reward-weights {cfg.reward_weights!r}: expected numbers") from None
    if len(weights) != len(names):
        raise ValueError(f"--reward-weights has {len(weights)} values for {len(names)} reward functions")
    return [(registry[name], weight) for name, weight in zip(names, weights)]


def score_answers(reward_fns, tree: Tree, examples: list[Example], prompts: list[str]) -> dict:
    """R[p, k, m] = sum_f w_f * f(prompt_p, thought_pk, answer_pkm, example_p). Every answer is scored on its
    own; a function may read the thought. Returns float32 (P, K, M) tensors: "total", and each function's
    unweighted values under "reward/<name>". A non-finite value or a wrong count is an error naming it."""
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
            answer = texts[bad[0]]
            raise ValueError(f"reward function {name!r} gave {values[bad[0]]} for answer {answer!r}")
        scores[f"reward/{name}"] = torch.tensor(values, dtype=torch.float64).view(shape)
        scores["total"] += weight * scores[f"reward/{name}"]
    return {name: values.float() for name, values in scores.items()}


# ================================================================================================
# 5. Advantages: one group-normalise helper, used at the thought and the answer level
# ================================================================================================
def group_normalise(values: torch.Tensor, *, scale: bool = True, ddof: int = 1, eps: float = 1e-4):
    """A = (x - mean(x)) / (std(x) + eps) over the last dim, in float64; scale=False: A = x - mean(x).
    A group whose values are all equal gets exactly 0 (not a float residue, not NaN).
    The scaled form is computed in units of the group's range, u = (x - min x) / (max x - min x), as the
    same number A = (u - mean u) / (std u + eps / range): values a few roundings apart would otherwise round
    their mean onto one of them, and their advantages away from a unit std (or to 0 / 0).
    values: (..., G) -> (..., G), in the dtype of `values`."""
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
                                                                  or over thought k's M answers ('thought')
    rewards: (..., K, M) -> thought_adv (..., K), answer_adv (..., K, M). With M = 1 both equal GRPO's."""
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
    """How many groups (last dim) have values all equal: no learning signal (TRL's frac_reward_zero_std)."""
    return int((values.amax(-1) == values.amin(-1)).sum().item())


# ================================================================================================
# 6. Loss: PPO-clip surrogate + beta(s) * k3 KL, thought tokens counted once, computed on the tree
# ================================================================================================
@dataclass
class TreeBatch:
    """A micro-batch of whole thoughts, each with its M answers, laid out as the tree it is: each of its
    prompts once, each thought once after its prompt, each answer after its thought. One advantage and one
    loss weight per counted token, in the order tree_logprobs returns the tokens: thoughts, then answers."""

    prompt_ids: torch.Tensor  # (P, Lp) the micro-batch's prompts, left-padded
    prompt_mask: torch.Tensor  # (P, Lp) attention mask
    thought_ids: torch.Tensor  # (B, Lt) thought + forced close, right-padded
    thought_mask: torch.Tensor  # (B, Lt) bool: a real token (the forced close is context, never scored)
    thought_scored: torch.Tensor  # (B, Lt) bool: a sampled thought token
    thought_prompt: torch.Tensor  # (B,) the prompt row each thought continues
    answer_ids: torch.Tensor  # (A, La) answers, right-padded, thought-major
    answer_mask: torch.Tensor  # (A, La) bool: a sampled answer token
    answer_thought: torch.Tensor  # (A,) the thought row each answer continues
    advantages: torch.Tensor  # (Nt + Na,) A_thought on thought tokens, A_answer on answer tokens
    weights: torch.Tensor  # (Nt + Na,) each token's share w_t of the step's loss
    vision: list = field(default_factory=list)  # [P] each prompt's image inputs, or empty


def loss_weights(
    tree: Tree, aggregation: str, counted=None, max_length: int = 1, total: Callable | None = None
) -> tuple[list, list]:
    """w_t of each token of each thought [P][K] and each answer [P][K][M] in loss = sum_t w_t * L_t, fixed
    over the WHOLE step before any micro-batch, so the update is the same whatever the micro-batch. Answers
    not `counted` ([P][K][M] bools, --mask-truncated) weigh 0. `total` sums the counts over every process's
    trees (None: these trees are the whole step). With N counted answers, by `aggregation`:
    token: 1 / (counted tokens: each thought's once, plus every answer's); GRPO's token mean when M = 1.
    sequence: 1 / (thoughts * the thought's length) and 1 / (N * the answer's length): the mean of the
    thoughts' token means plus the mean of the answers' token means (the paper's J_clip).
    grpo: each path thought + answer is a sequence weighing 1 / (N * its length), the thought's share split
    among its M paths (TRL's "grpo" when M = 1). dr_grpo: 1 / (N * max_length) (TRL's "dr_grpo" at M = 1)."""
    counted = counted or [[[True] * len(by_k) for by_k in by_p] for by_p in tree.answer_ids]
    thought_len = [[len(ids) for ids in by_p] for by_p in tree.thought_ids]  # [P][K]
    answer_len = [[[len(ids) for ids in by_k] for by_k in by_p] for by_p in tree.answer_ids]  # [P][K][M]
    slots = tree.answer_slots()
    counts = {"answers": sum(counted[p][k][m] for p, k, m in slots)}
    counts["tokens"] = sum(map(sum, thought_len)) + sum(
        answer_len[p][k][m] * counted[p][k][m] for p, k, m in slots
    )
    counts["thoughts"] = sum(n > 0 for by_p in thought_len for n in by_p)  # an empty thought has no mean
    counts = total(counts) if total else counts  # over every process's trees (Processes.total)
    counts = {key: max(value, 1) for key, value in counts.items()}
    thought_share = [[0.0] * len(by_p) for by_p in thought_len]
    answer_share = [[[0.0] * len(by_k) for by_k in by_p] for by_p in answer_len]
    for p, k in tree.thought_slots():
        n_thought = thought_len[p][k]
        lengths = answer_len[p][k]
        if aggregation == "token":
            shares = [1 / counts["tokens"] for _ in lengths]
            thought_share[p][k] = 1 / counts["tokens"]
        elif aggregation == "sequence":
            shares = [1 / (counts["answers"] * n) for n in lengths]
            thought_share[p][k] = 1 / (counts["thoughts"] * max(n_thought, 1))
        elif aggregation == "grpo":
            shares = [c / (counts["answers"] * (n_thought + n)) for n, c in zip(lengths, counted[p][k])]
            thought_share[p][k] = sum(shares) / len(shares)
        else:  # dr_grpo
            shares = [1 / (counts["answers"] * max_length) for _ in lengths]
            thought_share[p][k] = 1 / (counts["answers"] * max_length)
        answer_share[p][k] = [share * c for share, c in zip(shares, counted[p][k])]
    return thought_share, answer_share


def padded_tokens(tree: Tree, slots: list[tuple[int, int]]) -> int:
    """What a micro-batch of thoughts `slots` costs a forward: its prompts, thoughts and answers, each level
    padded to its longest row, as `build_tree_batch` lays them out."""
    prompts = {p for p, _ in slots}
    thoughts = [len(tree.thought_ids[p][k] + tree.forced_close[p][k]) for p, k in slots]
    answers = [len(ids) for p, k in slots for ids in tree.answer_ids[p][k]]
    width = max(len(tree.prompt_ids[p]) for p in prompts)
    return len(prompts) * width + len(thoughts) * max(thoughts) + len(answers) * max(answers, default=0)


def pack_thoughts(tree: Tree, budget: int) -> list[list[tuple[int, int]]]:
    """Whole thoughts (with their answers), in tree order, into micro-batches of at most `budget` padded
    tokens; a thought that alone exceeds the budget is a micro-batch of its own. The loss weights are fixed
    over the whole step, so the packing changes memory and speed, never the gradient."""
    packs = [[]]
    for slot in tree.thought_slots():
        if packs[-1] and padded_tokens(tree, packs[-1] + [slot]) > budget:
            packs.append([])
        packs[-1].append(slot)
    return packs


def build_tree_batch(tree: Tree, slots, thought_adv, answer_adv, weights, pad_id: int, device) -> TreeBatch:
    """The micro-batch of thoughts `slots` [(p, k)] with their answers, advantages (thought_adv (P, K),
    answer_adv (P, K, M)) and loss weights. Forced </think> tokens are context only, like the prompt."""
    prompts = list(dict.fromkeys(p for p, _ in slots))  # each prompt once, in order
    prompt_ids, prompt_mask = left_pad([tree.prompt_ids[p] for p in prompts], pad_id, device)
    thoughts = [tree.thought_ids[p][k] + tree.forced_close[p][k] for p, k in slots]
    scored = [[True] * len(tree.thought_ids[p][k]) + [False] * len(tree.forced_close[p][k]) for p, k in slots]
    answers = [(p, k, m) for p, k in slots for m in range(len(tree.answer_ids[p][k]))]
    rows = [tree.answer_ids[p][k][m] for p, k, m in answers]

    def tensor(values, dtype=None):
        return torch.tensor(values, dtype=dtype, device=device)

    thought_row = {slot: row for row, slot in enumerate(slots)}

    thought_weights, answer_weights = weights
    per_thought = [
        (thought_adv[p, k].item(), thought_weights[p][k], len(tree.thought_ids[p][k])) for p, k in slots
    ]
    per_answer = [
        (answer_adv[p, k, m].item(), answer_weights[p][k][m], len(ids))
        for (p, k, m), ids in zip(answers, rows)
    ]
    advantages = [adv for adv, _, n in per_thought + per_answer for _ in range(n)]
    token_weights = [weight for _, weight, n in per_thought + per_answer for _ in range(n)]
    return TreeBatch(
        prompt_ids,
        prompt_mask,
        thought_ids=tensor(right_pad(thoughts, pad_id)),
        thought_mask=tensor(right_pad([[True] * len(row) for row in thoughts], False)),
        thought_scored=tensor(right_pad(scored, False)),
        thought_prompt=tensor([prompts.index(p) for p, _ in slots]),
        answer_ids=tensor(right_pad(rows, pad_id)),
        answer_mask=tensor(right_pad([[True] * len(row) for row in rows], False)),
        answer_thought=tensor([thought_row[p, k] for p, k, _ in answers]),
        advantages=tensor(advantages, torch.float32),
        weights=tensor(token_weights, torch.float32),
        vision=[tree.vision[p] for p in prompts] if tree.vision else [],
    )


def selected_logprobs(hidden: torch.Tensor, head, targets: torch.Tensor, temperature: float, chunk: int = 0):
    """log softmax(head(hidden) / T)[target] row by row (as in TRL, logits are divided by the sampling
    temperature, so the ratio compares the distribution that sampled), in float32, one chunk of rows at a
    time. Under autograd each chunk's logits are recomputed in the backward pass, so the logits of all rows
    (N, V) never exist at once. hidden: (N, H), targets: (N,) -> (N,) float32."""
    chunk = chunk or max(1, 2**26 // head.out_features)  # about 256 MB of float32 logits per chunk

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
    """Forward right-padded rows ids (B, L) that continue the cached rows `parents` (B,): the cache is
    re-indexed to one copy of its parent per row, attention covers the parent's real tokens and the row's,
    and positions count on from the parent's last one, context_end ((P, 1), or (3, P, 1) for M-RoPE).
    Returns (hidden states (B, L, H), the attention mask so far (B, parent's width + L))."""
    cache.batch_select_indices(parents)
    attention = torch.cat([context_mask[parents], mask], 1).long()
    steps = torch.arange(1, ids.shape[1] + 1, device=ids.device)
    positions = context_end.index_select(-2, parents) + steps  # (B, L), or (3, B, L)
    hidden = body(
        input_ids=ids, attention_mask=attention, position_ids=positions, cache=cache, use_cache=True
    )
    return hidden.last_hidden_state, attention


def tree_logprobs(model, batch: TreeBatch, temperature: float) -> torch.Tensor:
    """log pi(token) of every counted token of the micro-batch, computed the way the tree was sampled.

    Each prompt is forwarded ONCE (with gradients, when enabled), with its images; its KV cache is repeated
    for its thoughts, which are forwarded against it; each thought's cache is repeated for its M answers in
    turn. So no thought re-encodes its prompt and no answer its prompt and thought, and a prefix's gradient
    collects the share of everything that follows it through the cache. A row's first token is scored from
    its parent's last position, later ones from the row's own. Only the hidden states the loss reads go
    through the LM head. Returns (Nt + Na,), float32, TreeBatch order."""
    from transformers import DynamicCache

    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model  # under LoRA's wrapper
    body, head = causal_lm.model, causal_lm.lm_head
    cache = DynamicCache(config=model.config)
    inputs = model_inputs(model, batch.prompt_ids, batch.prompt_mask, batch.vision)
    prompt_last = body(**inputs, cache=cache, use_cache=True).last_hidden_state[:, -1:]  # (P, 1, H)
    prompt_end = inputs["position_ids"][..., -1:]
    thought_hidden, attention = continue_rows(
        body,
        cache,
        batch.thought_prompt,
        batch.prompt_mask,
        prompt_end,
        batch.thought_ids,
        batch.thought_mask,
    )
    # scorer[b, j] scores thought token j: the prompt's last state, then the thought's own states
    scorer = torch.cat([prompt_last[batch.thought_prompt], thought_hidden], 1)  # (B, Lt + 1, H)
    thought_logps = selected_logprobs(
        scorer[:, :-1][batch.thought_scored], head, batch.thought_ids[batch.thought_scored], temperature
    )
    lengths = batch.thought_mask.sum(-1, keepdim=True)  # (B, 1) real tokens, forced close included
    thought_last = scorer.gather(1, lengths[..., None].expand(-1, 1, scorer.shape[-1]))  # (B, 1, H)
    thought_end = prompt_end.index_select(-2, batch.thought_prompt) + lengths  # each token one position on
    answer_scorer = thought_last[batch.answer_thought]  # (A, 1, H)
    if batch.answer_ids.shape[1] > 1:  # the last answer token scores nothing, so it is not fed
        answer_ids, answer_mask = batch.answer_ids[:, :-1], batch.answer_mask[:, :-1]
        answer_hidden, _ = continue_rows(
            body, cache, batch.answer_thought, attention, thought_end, answer_ids, answer_mask
        )
        answer_scorer = torch.cat([answer_scorer, answer_hidden], 1)  # (A, La, H)
    answer_logps = selected_logprobs(
        answer_scorer[batch.answer_mask], head, batch.answer_ids[batch.answer_mask], temperature
    )
    return torch.cat([thought_logps, answer_logps])


class TreeForward(torch.nn.Module):
    """`tree_logprobs` as one module call, so DistributedDataParallel sees one forward per backward."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, batch: TreeBatch, temperature: float) -> torch.Tensor:
        return tree_logprobs(self.policy, batch, temperature)


def clipped_surrogate(logps, old_logps, advantages, eps_low: float, eps_high: float) -> torch.Tensor:
    """L_t = -min(rho_t * A, clip(rho_t, 1 - eps_low, 1 + eps_high) * A), rho_t = exp(logp - logp_old).
    All (N,) -> (N,)."""
    ratio = torch.exp(logps - old_logps)
    return -torch.min(ratio * advantages, ratio.clamp(1 - eps_low, 1 + eps_high) * advantages)


def k3_kl(logps, ref_logps) -> torch.Tensor:
    """KL_t = exp(ref - logp) - (ref - logp) - 1 (Schulman's k3: unbiased, always >= 0). (N,) -> (N,)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def kl_beta(step: int, total_steps: int, cfg: Config) -> float:
    """beta(s). constant: cfg.beta. dynamic (GRPO-D, OThink-MR1): with w = explore_share * t and
    beta_mid = (beta_min + beta_max) / 2, fall linearly from beta_mid to beta_min over [0, w], then rise
    linearly to beta_max at t: exploration first, then hold the policy close to the reference."""
    if cfg.kl_schedule == "constant":
        return cfg.beta
    w = cfg.explore_share * total_steps
    beta_mid = (cfg.beta_min + cfg.beta_max) / 2
    if step <= w:
        return beta_mid - (beta_mid - cfg.beta_min) * step / w
    return cfg.beta_min + (cfg.beta_max - cfg.beta_min) * (step - w) / (total_steps - w)


def grpo_ma_loss(logps, old_logps, ref_logps, advantages, weights, beta: float, cfg: Config):
    """loss = sum_t w_t * (L_t + beta * KL_t) over counted tokens, all (N,); the weights w_t hold the
    aggregation (token or sequence mean over the whole step). Returns (loss, sums for the step's metrics):
    clip_frac counts every ratio outside the clip range, clip_ratio only those where the clip binds."""
    per_token = clipped_surrogate(logps, old_logps, advantages, cfg.epsilon, cfg.epsilon_high)
    ratio = torch.exp(logps - old_logps)
    sums = {"tokens": float(len(logps)), "kl": 0.0}
    if ref_logps is not None:
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * (ratio * kl if cfg.kl_bias_correction else kl)
        sums["kl"] = kl.sum().item()
    low = ratio.detach() < 1 - cfg.epsilon
    high = ratio.detach() > 1 + cfg.epsilon_high
    sums["clip_frac"] = (low | high).sum().item()
    sums["clip_ratio"] = ((low & (advantages < 0)) | (high & (advantages > 0))).sum().item()
    return (weights * per_token).sum(), sums


# ================================================================================================
# 7. Train loop: warm-up -> evaluate -> [sample tree -> rewards -> advantages -> loss -> step] -> evaluate
# ================================================================================================
METRIC_KEYS = (
    "step", "reward_mean", "reward_std", "train_accuracy", "loss", "kl", "beta", "clip_frac", "clip_ratio",
    "grad_norm", "gss", "gss_over_10", "zero_std_thought_frac", "zero_std_answer_frac", "thought_len",
    "answer_len", "truncated_frac", "tokens_generated", "micro_batches", "rollout_seconds", "train_seconds",
    "eval_greedy_accuracy", "eval_sampled_accuracy",
)  # fmt: skip
FINAL = "final"  # the trained policy, save_pretrained's folder
BASE = "base"  # a LoRA run's base model when it exists nowhere else (see `saves_base`)


def forward_precision(cfg: Config, device: torch.device):
    """The context of every forward pass. The weights stay float32, the master copy AdamW updates; bf16 runs
    the forward's matmuls in bfloat16 through autocast (--precision auto: on CUDA only; bf16 on a CPU runs
    CPU autocast, so the GPU path's numerics run in CI). The rule: autocast wraps forward passes, never an
    optimizer step, because autocast keeps its bf16 copy of each weight until its context exits, and every
    forward after a step inside the same context would run on the weights from before the step."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(cfg, device))


def uses_bf16(cfg: Config, device: torch.device) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def pick_device(cfg: Config) -> torch.device:
    """The CPU, or the current CUDA device (under torchrun, grpo_ma_run.py makes it this process's own)."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    if cfg.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def encode_prompts(tokenizer, examples: list[Example], processor=None) -> tuple[list, list, list]:
    """(prompt texts, prompt token ids, image inputs). Examples with images need the processor, which
    expands each image marker to the image's tokens and returns its pixels; the image inputs are empty for
    a text model, else [P] dicts of pixel_values and image_grid_thw (None for a prompt without images)."""
    if processor is None and any(e.images for e in examples):
        raise ValueError("the examples carry images, but the model has no processor: it is a text model")
    if processor is None or not any(e.images for e in examples):
        prompts = [format_prompt(tokenizer, e.question) for e in examples]
        return prompts, [tokenizer.encode(p, add_special_tokens=False) for p in prompts], []
    prompts = [format_prompt(processor, e.question, len(e.images)) for e in examples]
    prompt_ids = []
    vision = []
    for prompt, example in zip(prompts, examples):
        encoded = processor(text=[prompt], images=example.images or None, return_tensors="pt")
        prompt_ids.append(encoded["input_ids"][0].tolist())
        has_images = "image_grid_thw" in encoded
        keys = ("pixel_values", "image_grid_thw")
        vision.append({key: encoded[key] for key in keys} if has_images else None)
    return prompts, prompt_ids, vision


@dataclass
class Run:
    """What a run trains and on what: the policy and its tokenizer, where it runs, the task (a recipe's
    examples or the embedded generator, the held-out set, the reward functions, the answer check) and the
    data stream."""

    policy: torch.nn.Module
    tokenizer: object
    processor: object | None  # a vision-language model's: it turns images into pixels and image tokens
    device: torch.device
    data_rng: random.Random
    pool: list[Example] | None  # None: fresh examples from the embedded generator
    eval_examples: list[Example]
    reward_fns: list[tuple[RewardFn, float]]
    is_correct: Callable[[str, Example], bool]
    forward: torch.nn.Module | None = None  # the update's TreeForward(policy), in DDP under torchrun


def start_run(
    cfg: Config, train_pool=None, eval_examples=None, reward_fns=None, is_correct=answer_is_correct
) -> Run:
    """Seed every RNG, then load the policy: the order of draws each run starts from, so that a warm start
    made elsewhere (paper_figures/) is exactly the one train() makes. By default the embedded task."""
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
    return Run(policy, tokenizer, processor, device, random.Random(cfg.seed), *task, TreeForward(policy))


def supervised_warmup(run: Run, cfg: Config) -> list[float]:
    """A short cross-entropy warm-up on reference solutions (thought + answer tokens only, never the prompt),
    so the start policy knows the format and is partly right: RL then has both signal and room. Returns the
    loss of every step."""
    losses = []
    optimizer = torch.optim.AdamW(run.policy.parameters(), lr=cfg.warmup_lr)
    run.policy.train()
    tokenizer = run.tokenizer
    for _ in tqdm(range(cfg.warmup_steps), desc="warm-up", leave=False, disable=not PROGRESS_BARS):
        examples = draw_examples(run.data_rng, cfg.warmup_batch, cfg, run.pool)
        _, prompt_ids, vision = encode_prompts(tokenizer, examples, run.processor)
        solutions = [e.thought + ANSWER_OPEN + e.answer + ANSWER_CLOSE for e in examples]
        completions = [
            tokenizer.encode(s, add_special_tokens=False) + [tokenizer.eos_token_id] for s in solutions
        ]
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
    # frozen weights keep their .grad (with LoRA, the base model's): none may reach the RL step's clipping
    optimizer.zero_grad(set_to_none=True)
    return losses


@torch.no_grad()
def evaluate(run: Run, cfg: Config, examples: list[Example] | None = None) -> dict[str, float]:
    """Held-out accuracy with one thought and one answer per prompt, greedy and at the sampling temperature
    (the sampled one draws from torch's global RNG, like training)."""
    examples = run.eval_examples if examples is None else examples
    accuracy = {}
    for mode in ("greedy", "sampled"):
        correct = 0
        for start in range(0, len(examples), 100):
            part = examples[start : start + 100]
            _, prompt_ids, vision = encode_prompts(run.tokenizer, part, run.processor)
            with forward_precision(cfg, run.device):
                do_sample = mode == "sampled"
                tree = sample_tree(run.policy, run.tokenizer, prompt_ids, 1, 1, cfg, do_sample, vision)
            correct += sum(run.is_correct(tree.answers[p][0][0], example) for p, example in enumerate(part))
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
        """GSS = |g_t| / mean |g| of the previous `window` steps, undefined until a gradient has flowed;
        also counts the steps with GSS > 10 (GSS@10)."""
        previous = self.grad_norms[-window:]
        mean = sum(previous) / len(previous) if previous else 0.0
        gss = grad_norm / mean if mean > 0 else None
        self.grad_norms = [*previous, grad_norm]
        self.gss_over_10 += int(gss is not None and gss > 10)
        return gss


@dataclass(frozen=True)
class Processes:
    """The processes that share a step: this one's rank, how many there are, and how a dict of numbers is
    summed over all of them. One process by default; grpo_ma_run.py hands in torchrun's."""

    rank: int = 0
    count: int = 1
    sum: Callable[[dict], dict] | None = None  # None: one process, whose numbers are already the totals

    def total(self, numbers: dict) -> dict:
        return numbers if self.sum is None else self.sum(numbers)


def rollout_sums(tree: Tree, scores: dict, examples: list[Example], cfg: Config, is_correct) -> dict:
    """The step's rollouts as sums and counts (processes add theirs before `rollout_metrics` divides)."""
    rewards = scores["total"].double()  # (P, K, M)
    answer_groups = rewards.flatten(-2) if cfg.answer_pool == "all" else rewards
    thought_len = [len(tree.thought_ids[p][k]) for p, k in tree.thought_slots()]
    sums = {
        "answers": rewards.numel(),
        "reward": rewards.sum().item(),
        "reward_squared": rewards.square().sum().item(),
        "correct": sum(is_correct(tree.answers[p][k][m], examples[p]) for p, k, m in tree.answer_slots()),
        "thoughts": len(thought_len),
        "thought_tokens": sum(thought_len),
        "answer_tokens": sum(len(tree.answer_ids[p][k][m]) for p, k, m in tree.answer_slots()),
        "truncated": sum(bool(tree.forced_close[p][k]) for p, k in tree.thought_slots()),
        "thought_groups": rewards.shape[0],
        "zero_std_thought": zero_std_groups(rewards.mean(-1)),
        "answer_groups": answer_groups[..., 0].numel(),
        "zero_std_answer": zero_std_groups(answer_groups),
    }
    return sums | {name: values.double().sum().item() for name, values in scores.items() if name != "total"}


def rollout_metrics(sums: dict) -> dict:
    """What the step's rollouts were like: reward, accuracy, zero-std groups, lengths, truncation."""
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
    """log pi_ref of the counted tokens: the frozen start policy, or with LoRA the policy itself with its
    adapter switched off."""
    with reference.disable_adapter() if cfg.lora_rank else nullcontext():
        return tree_logprobs(reference, batch, cfg.temperature)


def train_step(
    step: int, run: Run, optimizer, progress: Progress, reference, cfg: Config, processes=Processes()
) -> dict:
    """One GRPO-MA step: sample the tree, score it, compute advantages, then num_iterations optimizer steps,
    each accumulated over micro-batches of whole thoughts. With several processes each grows whole trees for
    its share of the step's prompts, and DDP averages the gradients. Returns the step's metrics."""
    rollout_start = time.time()
    examples = draw_examples(run.data_rng, cfg.prompts_per_step, cfg, run.pool)  # the same on every process
    share = cfg.prompts_per_step // processes.count
    examples = examples[processes.rank * share : (processes.rank + 1) * share]
    prompts, prompt_ids, vision = encode_prompts(run.tokenizer, examples, run.processor)
    with forward_precision(cfg, run.device):
        tree = sample_tree(
            run.policy, run.tokenizer, prompt_ids, cfg.thoughts, cfg.answers, cfg, vision=vision
        )
    scores = score_answers(run.reward_fns, tree, examples, prompts)  # "total": (P, K, M)
    pool = dict(answer_pool=cfg.answer_pool, scale=cfg.scale_rewards, ddof=cfg.ddof)
    thought_adv, answer_adv = ma_advantages(scores["total"], **pool)  # (P, K), (P, K, M)
    counted = None
    if cfg.mask_truncated:  # leave out answers that reached their budget with neither </answer> nor eos
        counted = [[[ended != "budget" for ended in by_k] for by_k in by_p] for by_p in tree.answer_ended]
    max_length = cfg.max_thought_tokens + cfg.max_answer_tokens
    weights = loss_weights(tree, cfg.loss_agg, counted, max_length, processes.total)
    parts = pack_thoughts(tree, cfg.micro_batch_tokens)
    pad_id = run.tokenizer.pad_token_id
    batches = [
        build_tree_batch(tree, part, thought_adv, answer_adv, weights, pad_id, run.device) for part in parts
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
        for i, batch in enumerate(batches):  # gradients accumulate; the weights already normalise the step
            last = i == len(batches) - 1
            with nullcontext() if processes.count == 1 or last else run.forward.no_sync():  # DDP: sync once
                with forward_precision(cfg, run.device):  # the forward only: see `forward_precision`
                    logps = run.forward(batch, cfg.temperature)
                # mu = 1: the sampling policy IS the current policy, so rho = exp(0) = 1 exactly
                old = old_logps[i] if old_logps else logps.detach()
                ref = ref_logps[i]
                loss, batch_sums = grpo_ma_loss(logps, old, ref, batch.advantages, batch.weights, beta, cfg)
                (loss * processes.count).backward()  # DDP averages over processes; the weights count all
            batch_sums["loss"] = loss.item()
            sums = {key: sums.get(key, 0.0) + value for key, value in batch_sums.items()}
        grad_norms.append(torch.nn.utils.clip_grad_norm_(run.policy.parameters(), cfg.grad_clip).item())
        optimizer.step()

    sums |= rollout_sums(tree, scores, examples, cfg, run.is_correct) | {"micro_batches": len(batches)}
    sums = processes.total(sums)
    grad_norm = max(grad_norms)  # with mu > 1 the largest: spikes are what the norm is logged for
    record = {"step": step, "loss": sums["loss"], "beta": beta, "grad_norm": grad_norm}
    record["micro_batches"] = round(sums["micro_batches"])  # forward passes an iteration, all processes
    record["kl"] = None if reference is None else sums["kl"] / sums["tokens"]
    record["clip_frac"] = sums["clip_frac"] / sums["tokens"]
    record["clip_ratio"] = sums["clip_ratio"] / sums["tokens"]
    record["gss"] = progress.gradient_spike_score(grad_norm, cfg.gss_window)
    record["gss_over_10"] = progress.gss_over_10
    record |= rollout_metrics(sums)
    return record | {"rollout_seconds": rollout_seconds, "train_seconds": time.time() - train_start}


def saves_base(cfg: Config) -> bool:
    """A LoRA run whose base exists nowhere else (the embedded model, or weights the warm-up changed) saves
    it once in OUT/base, where its adapters (OUT/final) and a resume find it."""
    return cfg.lora_rank > 0 and (cfg.warmup_steps > 0 or cfg.model == EMBEDDED)


def base_source(cfg: Config, out: Path) -> str:
    """Where a LoRA run's base loads from: OUT/base, a hub id, or a folder (absolute, so OUT/final names it
    from wherever it is loaded)."""
    if saves_base(cfg):
        return str((out / BASE).resolve())
    return str(Path(cfg.model).resolve()) if Path(cfg.model).expanduser().is_dir() else cfg.model


def add_adapters(run: Run, cfg: Config, out: Path) -> None:
    """With --lora-rank, LoRA adapters on the (warmed-up) policy, named by the base they belong on. Where the
    forwards run in bf16, so is the frozen base stored: nothing updates it, so it needs no float32 master
    copy, and it takes half the memory; the adapters stay float32 with their AdamW state."""
    if not cfg.lora_rank:
        return
    if uses_bf16(cfg, run.device):
        run.policy.to(torch.bfloat16)
    run.policy = add_lora(run.policy, cfg)
    run.policy.peft_config["default"].base_model_name_or_path = base_source(cfg, out)  # for OUT/final
    if cfg.freeze_vision:
        freeze_vision_tower(run.policy)
    run.forward = TreeForward(run.policy)


def kl_reference(run: Run, cfg: Config):
    """pi_ref: None when beta(s) is 0 throughout; with LoRA the policy itself (its adapter switched off when
    scored); else a frozen copy of the policy as it is now, the start policy. (A copy, not a new model:
    building one would draw its initialisation from the RNG the run's sampling continues from.)"""
    if (cfg.beta if cfg.kl_schedule == "constant" else cfg.beta_max) == 0:
        return None
    if cfg.lora_rank:
        return run.policy
    return copy.deepcopy(run.policy).eval().requires_grad_(False)


def write_metrics(path: Path, record: dict) -> None:
    """One JSON line per step, with the same keys every time (null where nothing was measured)."""
    keys = list(METRIC_KEYS) + sorted(key for key in record if key.startswith("reward/"))
    with path.open("a") as f:
        f.write(json.dumps({key: record.get(key) for key in keys}) + "\n")


def save_final(run: Run, cfg: Config, out: Path) -> None:
    """The trained policy as transformers saves it, in OUT/final, which from_pretrained and --model load.
    With LoRA it holds the adapter; --save-merged adds the merged model in OUT/final-merged."""
    run.policy.save_pretrained(out / FINAL)
    (run.processor or run.tokenizer).save_pretrained(out / FINAL)
    if cfg.lora_rank and cfg.save_merged:
        merged = copy.deepcopy(run.policy).merge_and_unload()
        merged.save_pretrained(out / "final-merged")
        (run.processor or run.tokenizer).save_pretrained(out / "final-merged")


def save_base(run: Run, out: Path) -> None:
    """The (warmed-up) base a LoRA run's adapters belong on, when it exists nowhere else (`saves_base`)."""
    run.policy.save_pretrained(out / BASE)
    (run.processor or run.tokenizer).save_pretrained(out / BASE)


def summarise(cfg: Config, progress: Progress, device: torch.device, processes: int = 1) -> dict:
    """The run in numbers: held-out accuracy at the start and the end, spikes, time, where it ran."""
    start, last = progress.start_eval, progress.last_eval
    summary = {"config": f"T{cfg.thoughts}A{cfg.answers}", "seed": cfg.seed, "steps": cfg.steps}
    summary |= {f"start_{mode}_accuracy": start[f"eval_{mode}_accuracy"] for mode in ("greedy", "sampled")}
    summary |= {f"final_{mode}_accuracy": last[f"eval_{mode}_accuracy"] for mode in ("greedy", "sampled")}
    summary["gss_over_10"] = progress.gss_over_10
    summary["wall_seconds"] = progress.wall_seconds
    summary["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return summary | {"processes": processes}


def finish(run: Run, cfg: Config, progress: Progress, out: Path, processes: int = 1) -> dict:
    """The end of a run: the trained policy in OUT/final, the summary in OUT/summary.json, and one line."""
    summary = summarise(cfg, progress, run.device, processes)
    save_final(run, cfg, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    say_accuracy("after GRPO-MA", progress.start_eval, progress.last_eval)
    return summary


def say_accuracy(what: str, start: dict, end: dict | None = None) -> None:
    """One line: held-out accuracy, greedy and sampled (start -> end)."""
    parts = []
    for mode in ("greedy", "sampled"):
        key = f"eval_{mode}_accuracy"
        parts.append(f"{mode} {start[key]:.3f}" + (f" -> {end[key]:.3f}" if end else ""))
    print(f"{what}: held-out accuracy " + ", ".join(parts))


def train(
    cfg: Config,
    train_pool: Sequence[Example] | None = None,
    eval_examples: Sequence[Example] | None = None,
    reward_fns: list[tuple[RewardFn, float]] | None = None,
    is_correct: Callable[[str, Example], bool] = answer_is_correct,
) -> dict:
    """The whole run in one process: warm-up, evaluate, cfg.steps GRPO-MA steps, evaluate. Writes
    OUT/config.json, OUT/metrics.jsonl (one line per step), OUT/summary.json and OUT/final; returns the
    summary. A recipe (demos/) passes its own example pool, held-out set, rewards and answer check.
    grpo_ma_run.py runs the same steps with checkpoints, resume, live views and several processes."""
    started = time.time()
    validate_config(cfg)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun's processes would each write OUT alone
        raise ValueError("grpo_ma.py trains in one process: under torchrun, run grpo_ma_run.py")
    out = Path(cfg.out)
    if any((out / name).exists() for name in ("config.json", "metrics.jsonl", "summary.json", FINAL)):
        raise ValueError(
            f"--out {out} holds another run: choose another folder (grpo_ma_run.py can resume it)"
        )
    run = start_run(cfg, train_pool, eval_examples, reward_fns, is_correct)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
    supervised_warmup(run, cfg)
    if saves_base(cfg):
        save_base(run, out)
    add_adapters(run, cfg, out)  # after the warm-up, so that the adapter switched off is the start policy
    reference = kl_reference(run, cfg)
    trainable = [p for p in run.policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)

    progress = Progress(start_eval=evaluate(run, cfg))
    progress.last_eval = progress.start_eval
    (out / "metrics.jsonl").write_text("")
    write_metrics(out / "metrics.jsonl", {"step": 0, **progress.start_eval})
    say_accuracy("start policy", progress.start_eval)
    for step in tqdm(range(1, cfg.steps + 1), desc="GRPO-MA", unit="step", disable=not PROGRESS_BARS):
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
    """One flag per field of the defaults' dataclass (Config, or a subclass with more fields); a recipe
    passes its own defaults (and parser) to reuse every flag."""
    defaults = defaults or Config()
    parser = parser or argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    for f in dataclasses.fields(defaults):
        default = getattr(defaults, f.name)
        text = f.metadata["help"] + " (default: %(default)s)"
        if isinstance(default, bool):
            switch = argparse.BooleanOptionalAction
            parser.add_argument(flag(f.name), action=switch, default=default, help=text)
        else:
            parser.add_argument(flag(f.name), type=type(default), default=default, help=text)
    return parser


def run_cli(entry: Callable, *args, debug: bool = False, say_errors: bool = True):
    """entry(*args) as a command: an error is one line on stderr (unless say_errors is False: another
    process says it) and exit status 1, with the traceback only under --debug. (The Python API raises.)"""
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
