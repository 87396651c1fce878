"""GRPO-MA in one file: tree-style GRPO with K thoughts per prompt and M answers per thought.

GRPO-MA (arXiv 2509.24494, "Why Tree-Style Branching Matters for Thought Advantage Estimation in GRPO")
samples K thoughts per prompt, then M answers per thought. A thought's value is the mean reward of its M
answers, so its advantage is estimated from M signals instead of one; thought tokens and answer tokens get
separate advantages. `python grpo_ma.py` trains a small Qwen2 on a synthetic arithmetic task, on a CPU, offline.

The file reads in the order the algorithm runs:
    1. config   2. task, tokenizer, model   3. two-stage sampling   4. rewards   5. advantages
    6. loss     7. train loop (warm-up, eval, checkpoints)           8. CLI

Where this code departs from the paper, or chooses where the paper is silent:
- The thought ends at `</think>`; a thought that hits its token budget is closed by appending the marker
  (never trained on) and still gets its M answers. The share of such thoughts is logged.
- Thought tokens are counted once in the loss however large M is (the paper's J_clip sums the thought term
  once per thought); with the default token-mean aggregation, M = 1 is exactly GRPO's token-mean loss.
- Standard deviations are unbiased (ddof=1) as in TRL and verl; groups whose values are all equal get an
  advantage of exactly 0.
- The KL penalty is the k3 estimator against the frozen start policy (after the supervised warm-up).
- Reward functions are batched (lists in, list out), as in TRL, so a wrong count can be detected.
- One optimizer step per iteration over the whole rollout batch (no minibatches): simplest to read.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import re
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
FORMAT_MARKERS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
EMBEDDED = "embedded"


# ================================================================================================
# 1. Config: every default visible, every field a CLI flag
# ================================================================================================
def opt(default, help: str, **extra):
    return field(default=default, metadata={"help": help, **extra})


@dataclass
class Config:
    # the tree (SPEC §1): T{K}A{M}
    thoughts: int = opt(4, "K: thoughts sampled per prompt (stage 1)")
    answers: int = opt(4, "M: answers sampled per thought (stage 2); M=1 is plain GRPO")
    prompts_per_step: int = opt(8, "prompts per optimizer step")
    steps: int = opt(150, "GRPO-MA optimizer steps")
    # the embedded model's supervised warm-up (SPEC §4)
    warmup_steps: int = opt(450, "supervised warm-up steps on reference solutions before RL (0: none)")
    warmup_lr: float = opt(1e-3, "learning rate of the supervised warm-up")
    warmup_batch: int = opt(64, "examples per supervised warm-up step")
    # optimisation
    lr: float = opt(5e-5, "AdamW learning rate for GRPO-MA")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this value")
    num_iterations: int = opt(1, "mu: optimizer steps per rollout batch; 1 means ratio == 1 exactly")
    # loss (SPEC §1)
    beta: float = opt(0.04, "KL weight for --kl-schedule constant (TRL's default)")
    kl_schedule: str = opt("constant", "beta(s): constant, or dynamic (GRPO-D)", choices=("constant", "dynamic"))
    beta_min: float = opt(0.04, "GRPO-D: lowest beta, reached at the end of exploration")
    beta_max: float = opt(0.10, "GRPO-D: beta at the last step")
    explore_share: float = opt(0.3, "GRPO-D: w/t, the share of steps over which beta falls")
    epsilon: float = opt(0.2, "lower clip range: ratio >= 1 - epsilon")
    epsilon_high: float = opt(0.2, "upper clip range: ratio <= 1 + epsilon_high (raise for clip-higher)")
    loss_agg: str = opt("token", "token: mean over counted tokens; sequence: paper's J_clip form",
                        choices=("token", "sequence"))
    # advantages (SPEC §1)
    answer_pool: str = opt("all", "answer advantage group: all K*M answers of a prompt, or one thought's M",
                           choices=("all", "thought"))
    scale_rewards: bool = opt(True, "divide by the group std; --no-scale-rewards centres only (Dr. GRPO)")
    ddof: int = opt(1, "delta degrees of freedom of the std (1: unbiased, as TRL and verl)")
    # rewards
    reward: str = opt("accuracy,format", "comma-separated reward functions: accuracy, format, steprar, steprvr")
    reward_weights: str = opt("", "comma-separated weights, one per reward (empty: all 1)")
    step_alpha: float = opt(0.1, "StepRAR: weight of the key-step match fraction")
    # sampling
    temperature: float = opt(1.0, "sampling temperature; logits are divided by it in the loss too")
    max_thought_tokens: int = opt(40, "token budget of a thought; longer thoughts are closed by force")
    max_answer_tokens: int = opt(10, "token budget of an answer")
    # task and model
    task: str = opt("addsub", "embedded task family for training: addsub or muladd")
    eval_task: str = opt("", "task family for held-out evaluation (empty: same as --task)")
    model: str = opt(EMBEDDED, "'embedded' (small Qwen2 built here), or a hub id / local path of a Qwen model")
    device: str = opt("auto", "auto (cuda if available), cpu or cuda", choices=("auto", "cpu", "cuda"))
    gradient_checkpointing: bool = opt(False, "trade compute for memory on large models")
    seed: int = opt(0, "seed of data, model init and sampling")
    # logging and checkpoints
    out: str = opt("runs/default", "output folder: config.json, metrics.jsonl, checkpoint.pt, summary.json")
    resume: bool = opt(False, "continue from OUT/checkpoint.pt with nothing lost")
    save_every: int = opt(10, "write a checkpoint every N steps")
    eval_every: int = opt(50, "held-out evaluation every N steps (and at start and end)")
    eval_size: int = opt(200, "held-out prompts per evaluation")
    gss_window: int = opt(50, "steps in the gradient-spike-score running mean")


def validate_config(cfg: Config) -> None:
    """Reject settings that would otherwise give a silent wrong result."""
    checks = [
        (cfg.thoughts >= 2, f"--thoughts (K) must be >= 2: a group of one thought has no advantage, got {cfg.thoughts}"),
        (cfg.answers >= 1, f"--answers (M) must be >= 1, got {cfg.answers}"),
        (cfg.answer_pool != "thought" or cfg.answers >= 2,
         "--answer-pool thought needs --answers >= 2: one answer per group has no advantage"),
        (cfg.ddof in (0, 1) and cfg.ddof < cfg.thoughts, f"--ddof must be 0 or 1, got {cfg.ddof}"),
        (cfg.prompts_per_step >= 1 and cfg.steps >= 0 and cfg.warmup_steps >= 0, "step counts must be >= 0"),
        (cfg.temperature > 0, f"--temperature must be > 0, got {cfg.temperature}"),
        (cfg.num_iterations >= 1, f"--num-iterations must be >= 1, got {cfg.num_iterations}"),
        (0 <= cfg.epsilon < 1 and cfg.epsilon_high >= 0, "--epsilon must be in [0, 1), --epsilon-high >= 0"),
        (cfg.beta >= 0 and 0 <= cfg.beta_min <= cfg.beta_max, "need beta >= 0 and 0 <= beta_min <= beta_max"),
        (0 < cfg.explore_share < 1, f"--explore-share must be in (0, 1), got {cfg.explore_share}"),
        (cfg.kl_schedule != "dynamic" or cfg.steps >= 1, "--kl-schedule dynamic needs --steps >= 1"),
        (cfg.max_thought_tokens >= 1 and cfg.max_answer_tokens >= 1, "token budgets must be >= 1"),
        (cfg.save_every >= 1 and cfg.eval_every >= 1 and cfg.eval_size >= 1, "save/eval intervals must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    for family in (cfg.task, cfg.eval_task or cfg.task):
        if family not in TASK_FAMILIES:
            raise ValueError(f"unknown task family {family!r}; choose from {sorted(TASK_FAMILIES)}")
    reward_functions(cfg)  # raises on unknown names or a weight count that does not match


# ================================================================================================
# 2. Task, tokenizer and model (SPEC §4)
# ================================================================================================
@dataclass
class Example:
    question: str                 # "2+9-6": operations applied left to right
    thought: str                  # reference reasoning, the intermediate results: "1:2+9=11;</think>"
    key_steps: list[list[str]]    # each key step: a set of equivalent strings (StepRAR)
    answer: str                   # "5": the answer applies the last operation to the last intermediate result


TASK_FAMILIES = {"addsub": "+-", "muladd": "+-*"}
STEP_PATTERN = re.compile(r"(\d+):(\d+)([-+*])(\d+)=(-?\d+);")  # "2:11-6=5;"


def make_example(rng: random.Random, family: str) -> Example:
    """One problem of 2-3 operations. The thought writes every intermediate result; the answer must apply
    the last operation itself, so answers to one thought can differ: the M answers carry signal."""
    value = rng.randint(1, 9)
    question, steps, key_steps = str(value), [], []
    for _ in range(rng.randint(2, 3)):
        op, operand = rng.choice(TASK_FAMILIES[family]), rng.randint(1, 9)
        if op == "*":
            operand = rng.randint(2, 3)
        if op == "-" and operand > value:  # keep every intermediate result non-negative
            op = "+"
        result = {"+": value + operand, "-": value - operand, "*": value * operand}[op]
        step = f"{value}{op}{operand}={result}"
        question, value = question + f"{op}{operand}", result
        steps.append(step)
        key_steps.append([step] + ([f"{operand}{op}{step.split(op)[0]}={result}"] if op in "+*" else []))
    intermediate = steps[:-1]
    thought = "".join(f"{i}:{s};" for i, s in enumerate(intermediate, 1)) + THINK_CLOSE
    return Example(question, thought, key_steps[:-1], str(value))


def is_held_out(question: str) -> bool:
    """A stable hash puts one question in five in the held-out split, so train and eval never overlap."""
    return zlib.crc32(question.encode()) % 5 == 0


def sample_examples(rng: random.Random, family: str, n: int, held_out: bool) -> list[Example]:
    examples = []
    while len(examples) < n:
        example = make_example(rng, family)
        if is_held_out(example.question) == held_out:
            examples.append(example)
    return examples


def held_out_examples(cfg: Config, family: str | None = None) -> list[Example]:
    """A run's evaluation set: fixed by the seed, from --eval-task (or `family`), never seen in training."""
    return sample_examples(random.Random(10_000 + cfg.seed), family or cfg.eval_task or cfg.task, cfg.eval_size,
                           held_out=True)


SYSTEM_PROMPT = (f"Solve the problem step by step inside {THINK_OPEN} {THINK_CLOSE}, then give only the final "
                 f"number inside {ANSWER_OPEN} {ANSWER_CLOSE}.")


def format_prompt(tokenizer, question: str) -> str:
    """The prompt ends with <think>, so everything the policy writes up to </think> is the thought."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]
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
    core = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(specials + chars)}, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    core.add_special_tokens([AddedToken(s, special=True) for s in specials])
    core.add_tokens([AddedToken(m, special=False, normalized=False) for m in FORMAT_MARKERS])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def build_embedded_model(tokenizer):
    """A small Qwen2ForCausalLM from a Qwen2Config: same architecture as Qwen2.5, 0.6M parameters."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    return Qwen2ForCausalLM(config)


def check_format_markers(tokenizer) -> None:
    """The thought/answer split needs each marker to survive encode -> decode unchanged."""
    unknown = {tokenizer.unk_token_id} - {None}
    for marker in FORMAT_MARKERS:
        ids = tokenizer.encode(marker, add_special_tokens=False)
        if tokenizer.decode(ids) != marker or unknown & set(ids):
            raise ValueError(f"tokenizer cannot represent the format marker {marker!r} (encodes to {ids}); "
                             "add it to the vocabulary or use a tokenizer that can write it")
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token: answers could never end")


def load_policy(cfg: Config, device: torch.device):
    """The embedded model (built here, no download) or a real checkpoint through the same code path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.model == EMBEDDED:
        tokenizer = build_char_tokenizer()
        model = build_embedded_model(tokenizer)
    else:
        tokenizer = AutoTokenizer.from_pretrained(cfg.model)
        # float32 master weights: AdamW on bf16 weights rounds away updates of lr ~1e-6; CUDA computes in bf16
        # through autocast (see `compute_precision`)
        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # generation appends on the right
    check_format_markers(tokenizer)
    if cfg.gradient_checkpointing:
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
    return model.to(device), tokenizer


# ================================================================================================
# 3. Two-stage sampling: K thoughts per prompt, then M answers per thought
# ================================================================================================
@dataclass
class Tree:
    """One step's rollouts as token-id lists, prompt-major: thought p*K+k, answer (p*K+k)*M+m."""
    prompt_ids: list[list[int]]     # [P]
    thought_ids: list[list[int]]    # [P*K] tokens the policy sampled (ends with </think> unless forced)
    forced_close: list[list[int]]   # [P*K] marker tokens appended to a thought that never closed ([] if none)
    answer_ids: list[list[int]]     # [P*K*M] sampled answer tokens (ends with </answer> or eos, or truncated)
    thoughts: list[str]             # [P*K] decoded thought text, including </think>
    answers: list[str]              # [P*K*M] decoded answer text


def generation_kwargs(tokenizer, cfg: Config, do_sample: bool, max_new_tokens: int, stop: str) -> dict:
    """Pin every sampling knob so the sampler is exactly softmax(logits / T), the distribution the loss
    scores (a checkpoint's generation_config may carry top_k, top_p or a repetition penalty)."""
    sampling = dict(do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0) if do_sample else \
        dict(do_sample=False, temperature=None, top_k=None, top_p=None)
    return dict(sampling, max_new_tokens=max_new_tokens, repetition_penalty=1.0, stop_strings=[stop],
                tokenizer=tokenizer, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    return ids, mask


def cut_at_stop(ids: list[int], tokenizer, stop: str) -> tuple[list[int], str]:
    """Cut a generated row after the token that completes `stop`, or at eos (kept), or keep it all.
    Returns (kept ids, how it ended: 'stop', 'eos' or 'budget')."""
    eos = tokenizer.eos_token_id
    ended = "eos" if eos in ids else "budget"
    ids = ids[: ids.index(eos) + 1] if eos in ids else ids
    if stop not in tokenizer.decode(ids):
        return ids, ended
    low, high = 1, len(ids)  # smallest prefix whose text contains `stop` (containment grows with the prefix)
    while low < high:
        mid = (low + high) // 2
        low, high = (low, mid) if stop in tokenizer.decode(ids[:mid]) else (mid + 1, high)
    return ids[:low], "stop"


@torch.no_grad()
def sample_thoughts(model, tokenizer, prompt_ids, k: int, cfg: Config, do_sample: bool):
    """Stage 1: K thoughts per prompt, each stopped at </think>. A thought that ends by eos or budget is
    closed by appending the marker tokens, which the loss never counts (SPEC §1, truncation)."""
    ids, mask = left_pad([p for p in prompt_ids for _ in range(k)], tokenizer.pad_token_id, model.device)
    kwargs = generation_kwargs(tokenizer, cfg, do_sample, cfg.max_thought_tokens, THINK_CLOSE)
    new = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:].tolist()
    close_ids = tokenizer.encode(THINK_CLOSE, add_special_tokens=False)
    thought_ids, forced = [], []
    for row in new:
        kept, ended = cut_at_stop(row, tokenizer, THINK_CLOSE)
        if ended != "stop":  # a thought that never closed: drop a sampled eos, append the marker
            kept = [t for t in kept if t != tokenizer.eos_token_id]
        thought_ids.append(kept)
        forced.append([] if ended == "stop" else close_ids)
    return thought_ids, forced


@torch.no_grad()
def sample_answers(model, tokenizer, prefixes: list[list[int]], m: int, cfg: Config, do_sample: bool,
                   reuse_prefix_cache: bool = True) -> list[list[int]]:
    """Stage 2: M answers per prefix (prompt + thought). The shared prefix is prefilled ONCE and its KV cache
    is repeated M times, instead of recomputing it for every answer (nanochat's trick)."""
    from transformers import DynamicCache

    ids, mask = left_pad(prefixes, tokenizer.pad_token_id, model.device)
    kwargs = generation_kwargs(tokenizer, cfg, do_sample, cfg.max_answer_tokens, ANSWER_CLOSE)
    if reuse_prefix_cache:
        # positions as generate() derives them from a left-padded mask, so the cache continues seamlessly
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], position_ids=positions[:, :-1],
              past_key_values=cache, use_cache=True, logits_to_keep=1)  # all but the last token: generate() feeds it
        cache.batch_repeat_interleave(m)
        kwargs["past_key_values"] = cache
    ids, mask = ids.repeat_interleave(m, dim=0), mask.repeat_interleave(m, dim=0)
    new = model.generate(input_ids=ids, attention_mask=mask, **kwargs)[:, ids.shape[1]:].tolist()
    return [cut_at_stop(row, tokenizer, ANSWER_CLOSE)[0] for row in new]


def sample_tree(model, tokenizer, prompt_ids, k: int, m: int, cfg: Config, do_sample: bool = True) -> Tree:
    """The two stages of GRPO-MA rollout (SPEC §1): K thoughts per prompt, M answers per thought."""
    was_training = model.training
    model.eval()
    thought_ids, forced = sample_thoughts(model, tokenizer, prompt_ids, k, cfg, do_sample)
    prefixes = [prompt_ids[i // k] + t + f for i, (t, f) in enumerate(zip(thought_ids, forced))]
    answer_ids = sample_answers(model, tokenizer, prefixes, m, cfg, do_sample)
    model.train(was_training)
    decode = lambda rows: tokenizer.batch_decode(rows, skip_special_tokens=True)  # noqa: E731
    return Tree(prompt_ids, thought_ids, forced, answer_ids,
                decode([t + f for t, f in zip(thought_ids, forced)]), decode(answer_ids))


# ================================================================================================
# 4. Rewards: R[k, m] = sum_f w_f * f(prompt, thought_k, answer_km, example)
# ================================================================================================
RewardFn = Callable[[list[str], list[str], list[str], list[Example]], Sequence[float]]
# the number must fill the answer block: "<answer>18.5</answer>" is not 18 (an unclosed answer may just stop)
ANSWER_PATTERN = re.compile(re.escape(ANSWER_OPEN) + r"\s*(-?\d+)\s*(?:" + re.escape(ANSWER_CLOSE) + r"|$)")


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
    return float(re.fullmatch(re.escape(ANSWER_OPEN) + r"-?\d+" + re.escape(ANSWER_CLOSE), answer.strip()) is not None)


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
    if [int(n) for n, *_ in steps] != list(range(1, len(steps) + 1)):
        return False
    if any(nxt[1] != prev[4] for prev, nxt in zip(steps, steps[1:])):
        return False
    return extract_answer(answer) is not None and ANSWER_CLOSE in answer


def make_steprar(alpha: float) -> RewardFn:
    """StepRAR (R1-VL): correct + alpha * (fraction of key steps matched in the thought)."""
    def steprar(prompt, thought, answer, example) -> float:
        return float(answer_is_correct(answer, example)) + alpha * key_step_fraction(thought, example.key_steps)
    return per_answer(steprar)


@per_answer
def steprvr(prompt, thought, answer, example) -> float:
    return float(reasoning_is_valid(thought, answer))


def reward_functions(cfg: Config) -> list[tuple[RewardFn, float]]:
    registry = {"accuracy": accuracy, "format": format_reward, "steprar": make_steprar(cfg.step_alpha),
                "steprvr": steprvr}
    names = [n.strip() for n in cfg.reward.split(",") if n.strip()]
    unknown = [n for n in names if n not in registry]
    if not names or unknown:
        raise ValueError(f"unknown reward function(s) {unknown or cfg.reward!r}; choose from {sorted(registry)}")
    weights = [float(w) for w in cfg.reward_weights.split(",")] if cfg.reward_weights else [1.0] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"--reward-weights has {len(weights)} values for {len(names)} reward functions")
    return [(registry[n], w) for n, w in zip(names, weights)]


def score_answers(reward_fns: list[tuple[RewardFn, float]], tree: Tree, examples: list[Example],
                  prompts: list[str], k: int, m: int) -> torch.Tensor:
    """R[p, k, m] = sum_f w_f * f(...). Every answer is scored on its own; a function may read the thought.
    Returns float32 (P, K, M). A non-finite value or a wrong count is an error naming the function."""
    n = len(tree.answers)
    thoughts = [tree.thoughts[i // m] for i in range(n)]
    per_answer_examples = [examples[i // (k * m)] for i in range(n)]
    per_answer_prompts = [prompts[i // (k * m)] for i in range(n)]
    total = torch.zeros(n, dtype=torch.float64)
    for fn, weight in reward_fns:
        name = getattr(fn, "__name__", repr(fn))
        values = list(fn(per_answer_prompts, thoughts, tree.answers, per_answer_examples))
        if len(values) != n:
            raise ValueError(f"reward function {name!r} returned {len(values)} values for {n} answers")
        values = torch.tensor([float(v) for v in values], dtype=torch.float64)
        if not torch.isfinite(values).all():
            bad = int((~torch.isfinite(values)).nonzero()[0])
            raise ValueError(f"reward function {name!r} returned {values[bad].item()} for answer {bad} "
                             f"({tree.answers[bad]!r}); rewards must be finite")
        total += weight * values
    return total.view(-1, k, m).float()


# ================================================================================================
# 5. Advantages (SPEC §1): one group-normalise helper, used at the thought and the answer level
# ================================================================================================
def group_normalise(values: torch.Tensor, *, scale: bool = True, ddof: int = 1, eps: float = 1e-4) -> torch.Tensor:
    """A = (x - mean(x)) / (std(x) + eps) over the last dim; a group whose values are all equal gets exactly 0.

    values: (..., G) -> (..., G). Any finite input gives a finite output (property-tested)."""
    x = values.double()
    high, low = x.amax(-1, keepdim=True), x.amin(-1, keepdim=True)
    constant = high == low
    if x.shape[-1] <= ddof:  # too few values for a std: only a constant group can occur
        return torch.zeros_like(values)
    # in units of the group's range every value lies in [-1, 1], so no sum or square overflows or underflows;
    # (x - mean)/(std + eps) = (u - mean u)/(std u + eps/span) exactly
    span = torch.where(torch.isfinite(high - low), high - low, high / 2 - low / 2)
    span = torch.where(constant, torch.ones_like(span), span)
    u = (x - (high / 2 + low / 2)) / span
    centred = u - u.mean(-1, keepdim=True)
    if scale:  # tensor / tensor: a Python scalar / tensor would multiply by 1/span, inf for a subnormal span
        advantage = centred / (u.std(-1, correction=ddof, keepdim=True) + torch.full_like(span, eps) / span)
    else:
        advantage = centred * span
    return torch.where(constant, torch.zeros_like(advantage), advantage).to(values.dtype)


def ma_advantages(rewards: torch.Tensor, *, answer_pool: str = "all", scale: bool = True, ddof: int = 1,
                  eps: float = 1e-4) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO-MA advantages (SPEC §1, paper Eq. 3-5).

        V_k           = mean_m R[k, m]                           thought value
        A_thought[k]  = (V_k - mean_j V_j) / (std_j V_j + eps)    over the K thoughts
        A_answer[k,m] = (R[k,m] - mean R) / (std R + eps)         over all K*M answers ('all')
                                                                  or over thought k's M answers ('thought')
    rewards: (..., K, M) -> thought_adv (..., K), answer_adv (..., K, M). With M = 1 both equal GRPO's."""
    if rewards.dim() < 2:
        raise ValueError(f"rewards must have shape (..., K, M), got {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")
    if answer_pool not in ("all", "thought"):
        raise ValueError(f"answer_pool must be 'all' or 'thought', got {answer_pool!r}")
    norm = dict(scale=scale, ddof=ddof, eps=eps)
    values = rewards.double()  # float64: a float32 mean of rewards near 3e38 would overflow
    thought_values = values.mean(-1)
    thought_values = torch.where(torch.isfinite(thought_values), thought_values, (values / values.shape[-1]).sum(-1))
    thought_adv = group_normalise(thought_values, **norm).to(rewards.dtype)
    if answer_pool == "all":
        answer_adv = group_normalise(rewards.flatten(-2), **norm).view_as(rewards)
    else:
        answer_adv = group_normalise(rewards, **norm)
    return thought_adv, answer_adv


def zero_std_share(values: torch.Tensor) -> float:
    """Share of groups (last dim) whose values are all equal: no learning signal (frac_reward_zero_std)."""
    return (values.amax(-1) == values.amin(-1)).float().mean().item()


# ================================================================================================
# 6. Loss: PPO-clip surrogate + beta(s) * k3 KL, thought tokens counted once
# ================================================================================================
@dataclass
class TrainBatch:
    """P*K*M sequences prompt + thought + answer, right-padded. Masks mark the tokens the loss counts:
    a thought's sampled tokens only in its first answer's row (counted once), every answer's sampled tokens."""
    input_ids: torch.Tensor        # (B, T)
    attention_mask: torch.Tensor   # (B, T)
    thought_mask: torch.Tensor     # (B, T-1) float, aligned with the predicted token input_ids[:, 1:]
    answer_mask: torch.Tensor      # (B, T-1) float
    advantages: torch.Tensor       # (B, T-1) thought_adv on thought tokens, answer_adv on answer tokens


def build_train_batch(tree: Tree, thought_adv: torch.Tensor, answer_adv: torch.Tensor, m: int,
                      pad_id: int, device) -> TrainBatch:
    """thought_adv: (P, K), answer_adv: (P, K, M) -> one row per answer. Forced </think> tokens are context
    only (mask 0), like the prompt and the padding."""
    thought_flat, answer_flat = thought_adv.flatten().tolist(), answer_adv.flatten().tolist()
    k = len(tree.thought_ids) // len(tree.prompt_ids)
    rows, thought_masks, answer_masks, advantages = [], [], [], []
    for i, answer in enumerate(tree.answer_ids):
        t = i // m
        prompt, thought, forced = tree.prompt_ids[t // k], tree.thought_ids[t], tree.forced_close[t]
        count_thought = float(i % m == 0)
        rows.append(prompt + thought + forced + answer)
        thought_masks.append([0.0] * len(prompt) + [count_thought] * len(thought) + [0.0] * (len(forced) + len(answer)))
        answer_masks.append([0.0] * (len(prompt) + len(thought) + len(forced)) + [1.0] * len(answer))
        advantages.append([0.0] * len(prompt) + [thought_flat[t]] * (len(thought) + len(forced))
                          + [answer_flat[i]] * len(answer))
    width = max(len(r) for r in rows)
    pad = lambda rs, v, dtype: torch.tensor([r + [v] * (width - len(r)) for r in rs], dtype=dtype, device=device)  # noqa: E731
    # mask[t] says whether token t is counted; the loss predicts token t+1 from position t, so shift by one
    return TrainBatch(pad(rows, pad_id, torch.long), pad([[1] * len(r) for r in rows], 0, torch.long),
                      pad(thought_masks, 0.0, torch.float)[:, 1:], pad(answer_masks, 0.0, torch.float)[:, 1:],
                      pad(advantages, 0.0, torch.float)[:, 1:])


def token_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """log pi(y_t | y_<t) with logits divided by the sampling temperature (as TRL does), so the ratio compares
    the distribution that actually sampled. (B, T) -> (B, T-1), float32."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float() / temperature
    targets = input_ids[:, 1:]
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def clipped_surrogate(logps, old_logps, advantages, eps_low: float, eps_high: float) -> torch.Tensor:
    """L_t = -min(rho_t * A, clip(rho_t, 1 - eps_low, 1 + eps_high) * A), rho_t = exp(logp - logp_old).
    All (B, T-1) -> (B, T-1)."""
    ratio = torch.exp(logps - old_logps)
    return -torch.min(ratio * advantages, ratio.clamp(1 - eps_low, 1 + eps_high) * advantages)


def k3_kl(logps, ref_logps) -> torch.Tensor:
    """KL_t = exp(ref - logp) - (ref - logp) - 1 (Schulman's k3: unbiased, always >= 0). (B, T-1)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def kl_beta(step: int, total_steps: int, cfg: Config) -> float:
    """beta(s). constant: cfg.beta. dynamic (GRPO-D, OThink-MR1): with w = explore_share * t and
    beta_mid = (beta_min + beta_max) / 2, fall linearly from beta_mid to beta_min over [0, w], then rise
    linearly to beta_max at t: exploration first, then hold the policy close to the reference."""
    if cfg.kl_schedule == "constant":
        return cfg.beta
    w, beta_mid = cfg.explore_share * total_steps, (cfg.beta_min + cfg.beta_max) / 2
    if step <= w:
        return beta_mid - (beta_mid - cfg.beta_min) * step / w
    return cfg.beta_min + (cfg.beta_max - cfg.beta_min) * (step - w) / (total_steps - w)


def aggregate(per_token: torch.Tensor, batch: TrainBatch, how: str) -> torch.Tensor:
    """token: sum over counted tokens / their number (thoughts once + all answers); with M = 1 this is
    GRPO's token-mean loss. sequence: mean over thoughts of each thought's token mean, plus the mean over
    answers of each answer's token mean (the paper's J_clip). (B, T-1) -> scalar."""
    if how == "token":
        counted = batch.thought_mask + batch.answer_mask
        return (per_token * counted).sum() / counted.sum().clamp(min=1)
    thought_rows = batch.thought_mask.sum(-1) > 0
    thought_means = (per_token * batch.thought_mask).sum(-1) / batch.thought_mask.sum(-1).clamp(min=1)
    answer_means = (per_token * batch.answer_mask).sum(-1) / batch.answer_mask.sum(-1).clamp(min=1)
    return thought_means[thought_rows].mean() + answer_means.mean()


def grpo_ma_loss(logps, old_logps, ref_logps, batch: TrainBatch, beta: float, cfg: Config):
    """Per-token PPO-clip surrogate plus beta * KL, aggregated. Returns (loss, metrics)."""
    per_token = clipped_surrogate(logps, old_logps, batch.advantages, cfg.epsilon, cfg.epsilon_high)
    counted = batch.thought_mask + batch.answer_mask
    metrics = {}
    if ref_logps is not None:
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
        metrics["kl"] = ((kl * counted).sum() / counted.sum()).item()
    ratio = torch.exp(logps - old_logps).detach()
    clipped = ((ratio < 1 - cfg.epsilon) | (ratio > 1 + cfg.epsilon_high)).float()
    metrics["clip_frac"] = ((clipped * counted).sum() / counted.sum()).item()
    return aggregate(per_token, batch, cfg.loss_agg), metrics


# ================================================================================================
# 7. Train loop: warm-up -> evaluate -> [sample tree -> rewards -> advantages -> loss -> step] -> evaluate
# ================================================================================================
METRIC_KEYS = ("step", "reward_mean", "reward_std", "train_accuracy", "loss", "kl", "beta", "clip_frac",
               "grad_norm", "gss", "gss_over_10", "zero_std_thought_frac", "zero_std_answer_frac", "thought_len",
               "answer_len", "truncated_frac", "tokens_generated", "rollout_seconds", "train_seconds",
               "eval_greedy_accuracy", "eval_sampled_accuracy")


def compute_precision(device: torch.device):
    """bf16 autocast on CUDA (weights stay float32), plain float32 on the CPU."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def seed_everything(seed: int) -> None:
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)


def pick_device(cfg: Config) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device("cuda" if cfg.device in ("auto", "cuda") and torch.cuda.is_available() else "cpu")


def encode_prompts(tokenizer, examples: list[Example]) -> tuple[list[str], list[list[int]]]:
    prompts = [format_prompt(tokenizer, e.question) for e in examples]
    return prompts, [tokenizer.encode(p, add_special_tokens=False) for p in prompts]


def supervised_warmup(model, tokenizer, cfg: Config, data_rng: random.Random, draw) -> None:
    """A short cross-entropy warm-up on reference solutions (thought + answer tokens only), so the start
    policy knows the format and is partly right: RL then has both signal and room (SPEC §4)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.warmup_lr)
    model.train()
    for _ in tqdm(range(cfg.warmup_steps), desc="warm-up", leave=False):
        examples = draw(data_rng, cfg.warmup_batch)
        _, prompt_ids = encode_prompts(tokenizer, examples)
        completions = [tokenizer.encode(e.thought + ANSWER_OPEN + e.answer + ANSWER_CLOSE, add_special_tokens=False)
                       + [tokenizer.eos_token_id] for e in examples]
        rows = [p + c for p, c in zip(prompt_ids, completions)]
        width = max(map(len, rows))
        ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows], device=model.device)
        targets = torch.tensor([[-100] * len(p) + c + [-100] * (width - len(p) - len(c))
                                for p, c in zip(prompt_ids, completions)], device=model.device)
        logits = model(input_ids=ids, attention_mask=(targets != -100) | (ids != tokenizer.pad_token_id)).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets[:, 1:].flatten(), ignore_index=-100)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


@torch.no_grad()
def evaluate(model, tokenizer, examples: list[Example], cfg: Config, do_sample: bool, chunk: int = 100,
             is_correct=answer_is_correct) -> float:
    """Held-out accuracy with one thought and one answer per prompt, greedy or at the sampling temperature."""
    correct = 0
    for start in range(0, len(examples), chunk):
        part = examples[start:start + chunk]
        tree = sample_tree(model, tokenizer, encode_prompts(tokenizer, part)[1], 1, 1, cfg, do_sample)
        correct += sum(is_correct(a, e) for a, e in zip(tree.answers, part))
    return correct / len(examples)


def train_step(step: int, policy, reference, optimizer, tokenizer, cfg: Config, data_rng: random.Random, draw,
               reward_fns, gss_history: deque, is_correct=answer_is_correct) -> dict:
    """One GRPO-MA step: sample the tree, score, compute advantages, take num_iterations optimizer steps."""
    k, m = cfg.thoughts, cfg.answers
    rollout_start = time.time()
    examples = draw(data_rng, cfg.prompts_per_step)
    prompts, prompt_ids = encode_prompts(tokenizer, examples)
    tree = sample_tree(policy, tokenizer, prompt_ids, k, m, cfg)
    rewards = score_answers(reward_fns, tree, examples, prompts, k, m)                          # (P, K, M)
    thought_adv, answer_adv = ma_advantages(rewards, answer_pool=cfg.answer_pool, scale=cfg.scale_rewards,
                                            ddof=cfg.ddof)                                      # (P, K), (P, K, M)
    batch = build_train_batch(tree, thought_adv, answer_adv, m, tokenizer.pad_token_id, policy.device)
    rollout_seconds, train_start = time.time() - rollout_start, time.time()

    beta = kl_beta(step, cfg.steps, cfg)
    policy.train()
    with torch.no_grad():
        ref_logps = None if reference is None else token_logprobs(reference, batch.input_ids, batch.attention_mask,
                                                                   cfg.temperature)
        old_logps = None if cfg.num_iterations == 1 else token_logprobs(policy, batch.input_ids,
                                                                        batch.attention_mask, cfg.temperature)
    grad_norms = []
    for _ in range(cfg.num_iterations):
        logps = token_logprobs(policy, batch.input_ids, batch.attention_mask, cfg.temperature)
        # mu = 1: the sampling policy IS the current policy, so rho = exp(0) = 1 exactly (SPEC §1)
        loss, loss_metrics = grpo_ma_loss(logps, logps.detach() if old_logps is None else old_logps, ref_logps,
                                          batch, beta, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norms.append(torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip).item())
        optimizer.step()

    grad_norm = max(grad_norms)  # with mu > 1, the largest: spikes are what the norm is logged for
    previous_mean = sum(gss_history) / len(gss_history) if gss_history else 0.0
    gss = grad_norm / previous_mean if previous_mean > 0 else None  # undefined until a gradient has flowed
    gss_history.append(grad_norm)
    truncated = [bool(f) for f in tree.forced_close]
    correct = [is_correct(a, examples[i // (k * m)]) for i, a in enumerate(tree.answers)]
    return {
        "step": step, "reward_mean": rewards.mean().item(), "reward_std": rewards.std().item(),
        "train_accuracy": sum(correct) / len(correct), "loss": loss.item(), "kl": loss_metrics.get("kl"),
        "beta": beta, "clip_frac": loss_metrics["clip_frac"], "grad_norm": grad_norm, "gss": gss,
        "zero_std_thought_frac": zero_std_share(rewards.mean(-1)),
        "zero_std_answer_frac": zero_std_share(rewards.flatten(-2) if cfg.answer_pool == "all" else rewards),
        "thought_len": float(np.mean([len(t) for t in tree.thought_ids])),
        "answer_len": float(np.mean([len(a) for a in tree.answer_ids])),
        "truncated_frac": sum(truncated) / len(truncated),
        "tokens_generated": sum(map(len, tree.thought_ids)) + sum(map(len, tree.answer_ids)),
        "rollout_seconds": rollout_seconds, "train_seconds": time.time() - train_start,
    }


def rng_states(restore: dict | None = None) -> dict:
    """Every global RNG the run draws from (sampling uses torch's); with `restore`, set them back first."""
    if restore:
        random.setstate(restore["python"]), np.random.set_state(restore["numpy"]), torch.set_rng_state(restore["torch"])
        if restore["cuda"] is not None:
            torch.cuda.set_rng_state_all(restore["cuda"])
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def atomic_save(obj, path: Path) -> None:
    """Write then rename, so a kill mid-write never leaves a half checkpoint behind."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_metrics(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps({key: record.get(key) for key in METRIC_KEYS}) + "\n")


def check_resumable(cfg: Config, out: Path) -> None:
    """Resuming under different settings would silently mix two runs: refuse."""
    saved = json.loads((out / "config.json").read_text())
    ignore = {"resume", "device", "out"}
    changed = {k: (saved.get(k), v) for k, v in dataclasses.asdict(cfg).items() if k not in ignore and saved.get(k) != v}
    if changed:
        raise ValueError(f"--resume with settings that differ from {out / 'config.json'}: {changed}")


def train(cfg: Config, train_pool: Sequence[Example] | None = None, eval_examples: Sequence[Example] | None = None,
          reward_fns: list[tuple[RewardFn, float]] | None = None, is_correct=answer_is_correct) -> dict:
    """The whole run. Returns the summary that is also written to OUT/summary.json. By default the data is
    the embedded generator's; a recipe (demos/) passes its own example pool, held-out set, rewards and
    answer check."""
    validate_config(cfg)
    out, device, run_start = Path(cfg.out), pick_device(cfg), time.time()
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    seed_everything(cfg.seed)
    data_rng = random.Random(cfg.seed)
    policy, tokenizer = load_policy(cfg, device)
    pool = None if train_pool is None else list(train_pool)
    draw = (lambda rng, n: sample_examples(rng, cfg.task, n, held_out=False)) if pool is None else \
        (lambda rng, n: rng.sample(pool, n))
    eval_examples = held_out_examples(cfg) if eval_examples is None else eval_examples
    reward_fns = reward_fns or reward_functions(cfg)
    uses_kl = (cfg.beta if cfg.kl_schedule == "constant" else cfg.beta_max) > 0  # the largest beta(s) reaches

    def run_eval() -> dict:
        with compute_precision(device):
            return {f"eval_{mode}_accuracy": evaluate(policy, tokenizer, eval_examples, cfg, mode == "sampled",
                                                      is_correct=is_correct) for mode in ("greedy", "sampled")}

    resuming = cfg.resume and checkpoint_path.exists()
    if resuming:
        check_resumable(cfg, out)
        state = torch.load(checkpoint_path, map_location=device, weights_only=False)
        policy.load_state_dict(state["model"])
        start_step, start_eval, last_eval = state["step"], state["start_eval"], state["last_eval"]
        lines = metrics_path.read_text().splitlines() if metrics_path.exists() else []
        # steps after the checkpoint will be recomputed identically: drop their lines so none is doubled
        metrics_path.write_text("".join(l + "\n" for l in lines if json.loads(l)["step"] <= start_step))
        print(f"resuming {out} from step {start_step}")
    else:
        (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
        metrics_path.write_text("")
        with compute_precision(device):
            supervised_warmup(policy, tokenizer, cfg, data_rng, draw)
        atomic_save(policy.state_dict(), out / "reference.pt")  # the frozen start policy of the KL term
        start_step, start_eval = 0, run_eval()
        last_eval = start_eval
        write_metrics(metrics_path, {"step": 0, **start_eval})
        print(f"start policy: held-out accuracy greedy {start_eval['eval_greedy_accuracy']:.3f}, "
              f"sampled {start_eval['eval_sampled_accuracy']:.3f}")

    reference = None
    if uses_kl:
        from transformers import AutoModelForCausalLM
        reference = AutoModelForCausalLM.from_config(policy.config).to(device=device, dtype=policy.dtype)
        reference.load_state_dict(torch.load(out / "reference.pt", map_location=device))
        reference.eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.0)
    gss_history, gss_over_10 = deque(maxlen=cfg.gss_window), 0

    def save_checkpoint(step: int) -> None:  # everything the next step depends on, RNG states included
        atomic_save(dict(step=step, model=policy.state_dict(), optimizer=optimizer.state_dict(),
                         gss_history=list(gss_history), gss_over_10=gss_over_10, data_rng=data_rng.getstate(),
                         rng=rng_states(), start_eval=start_eval, last_eval=last_eval), checkpoint_path)

    if resuming:
        optimizer.load_state_dict(state["optimizer"])
        gss_history.extend(state["gss_history"])
        gss_over_10 = state["gss_over_10"]
        data_rng.setstate(state["data_rng"])
        rng_states(restore=state["rng"])
    else:
        save_checkpoint(0)

    progress = tqdm(range(start_step + 1, cfg.steps + 1), initial=start_step, total=cfg.steps, desc="GRPO-MA")
    for step in progress:
        with compute_precision(device):
            record = train_step(step, policy, reference, optimizer, tokenizer, cfg, data_rng, draw, reward_fns,
                                gss_history, is_correct)
        gss_over_10 += int(record["gss"] is not None and record["gss"] > 10)
        record["gss_over_10"] = gss_over_10
        if step % cfg.eval_every == 0 or step == cfg.steps:
            last_eval = run_eval()
            record.update(last_eval)
        write_metrics(metrics_path, record)
        progress.set_postfix(reward=f"{record['reward_mean']:.2f}", acc=f"{record['train_accuracy']:.2f}",
                             held_out=f"{last_eval['eval_greedy_accuracy']:.2f}")
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint(step)

    summary = {"config": f"T{cfg.thoughts}A{cfg.answers}", "seed": cfg.seed, "steps": cfg.steps,
               "start_greedy_accuracy": start_eval["eval_greedy_accuracy"],
               "start_sampled_accuracy": start_eval["eval_sampled_accuracy"],
               "final_greedy_accuracy": last_eval["eval_greedy_accuracy"],
               "final_sampled_accuracy": last_eval["eval_sampled_accuracy"],
               "gss_over_10": gss_over_10, "wall_seconds_this_run": time.time() - run_start,
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"held-out accuracy: greedy {summary['start_greedy_accuracy']:.3f} -> {summary['final_greedy_accuracy']:.3f}, "
          f"sampled {summary['start_sampled_accuracy']:.3f} -> {summary['final_sampled_accuracy']:.3f}")
    return summary


# ================================================================================================
# 8. CLI: one flag per Config field
# ================================================================================================
def build_parser(defaults: Config | None = None, parser: argparse.ArgumentParser | None = None):
    """One flag per Config field; a recipe passes its own defaults (and parser) to reuse every flag."""
    defaults, parser = defaults or Config(), parser or argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for f in dataclasses.fields(Config):
        default = getattr(defaults, f.name)
        flag, text = "--" + f.name.replace("_", "-"), f.metadata["help"] + " (default: %(default)s)"
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            parser.add_argument(flag, type=type(default), default=default, choices=f.metadata.get("choices"),
                                help=text)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> Config:
    return Config(**vars(build_parser().parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> dict:
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
