"""What the GPU recipes (gsm8k_qwen.py, vlm_qwen.py) share: reading a JSONL file line by line, cutting a
held-out slice, the command line (the recipe's own flags, then every RunConfig field), choosing the rewards,
and handing the examples to grpo_ma_run.train. Each recipe keeps its own data format, rewards, defaults and
checks."""

import argparse
import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

import grpo_ma
import grpo_ma_run

# ================================================================================================
# 1. Data: JSONL lines, the held-out slice, enough examples for a step
# ================================================================================================


def jsonl_lines(path: str | Path, limit: int | None = None) -> Iterator[tuple[str, str]]:
    """The non-blank lines of a JSONL file, each with its place "FILE:LINE" (FILE spelled as `path` is), so
    that every error about a record can be one line naming where to fix it. With `limit`, only the first
    `limit` non-blank lines: the rest of the file is not read."""
    used = 0
    with open(path) as lines:
        for line_number, line in enumerate(lines, 1):
            if limit is not None and used >= limit:
                return
            if line.strip():
                used += 1
                yield f"{path}:{line_number}", line


def parse_json_line(line: str, where: str):
    """The line's JSON value; a line that is not JSON is a one-line error naming its place `where`, rather
    than the decoder's message, which names no file."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{where}: not JSON ({error})") from None


def hold_out_tail(records: list, fraction: float, data: str) -> tuple[list, list]:
    """(training, held-out) from one file: its last `fraction` of records (at least one) is held out, so the
    held-out set is the same on every run over the same file. A file too short to leave a record to train on
    is an error naming it (`data`) and saying what to do."""
    held_out = max(1, round(len(records) * fraction))
    if held_out >= len(records):
        raise ValueError(
            f"{data}: {len(records)} records leave none to train on after holding out {held_out}; "
            "add records or pass --eval-data"
        )
    return records[:-held_out], records[-held_out:]


def require_enough_for_a_step(cfg: grpo_ma.Config, train_size: int, eval_size: int, noun: str) -> None:
    """grpo_ma draws each step's prompts (and each warm-up batch) without replacement from the training pool,
    so the pool must hold at least that many, and the held-out set at least one; say so before any model is
    loaded. `noun` names what was counted ("examples", "records")."""
    needed = max(cfg.prompts_per_step, cfg.warmup_batch if cfg.warmup_steps else 0)
    if train_size < needed or not eval_size:
        raise ValueError(
            f"{train_size} training and {eval_size} held-out {noun}: need at least "
            f"{needed} (--prompts-per-step, --warmup-batch) and 1"
        )


# ================================================================================================
# 2. Rewards: --reward and --reward-weights mapped onto a recipe's own reward functions
# ================================================================================================


def reward_names(cfg: grpo_ma.Config) -> list[str]:
    """The names in --reward, in order, as grpo_ma reads them (comma-separated, blanks dropped)."""
    return [name.strip() for name in cfg.reward.split(",") if name.strip()]


def weighted_rewards(
    cfg: grpo_ma.Config, registry: dict[str, grpo_ma.RewardFn], thoughts: str
) -> list[tuple[grpo_ma.RewardFn, float]]:
    """--reward and --reward-weights as grpo_ma reads them (it validates the names and the weight count),
    each name mapped to the recipe's own function in `registry` (accuracy, format, steprar). steprvr is
    refused: it checks the embedded task's step format, and the recipe's `thoughts` are free text."""
    if "steprvr" in reward_names(cfg):
        raise ValueError(
            f"steprvr checks the embedded task's 'n:a op b=c;' steps; {thoughts} are free text. "
            "Use accuracy, format or steprar"
        )
    weighted = grpo_ma.reward_functions(cfg)
    return [(registry[name], weight) for name, (_, weight) in zip(reward_names(cfg), weighted)]


# ================================================================================================
# 3. Command line: the recipe's own flags, then one flag per RunConfig field
# ================================================================================================
CONFIG_GROUP = "GRPO-MA (every grpo_ma.Config field; defaults set for one GPU)"


def add_split_flags(group: argparse._ArgumentGroup, eval_data_help: str, holdout_help: str) -> None:
    """--eval-data, --limit and --holdout-fraction, the flags that choose the training and held-out records
    (read by `hold_out_tail`'s callers), with the same names, types and defaults in every recipe; the help of
    the first and last says where the recipe's records come from otherwise."""
    group.add_argument("--eval-data", default=None, help=eval_data_help)
    group.add_argument(
        "--limit",
        type=int,
        default=None,
        help="use only the first N training records, before the held-out slice is cut (default: all)",
    )
    group.add_argument("--holdout-fraction", type=float, default=0.1, help=holdout_help)


def build_parser(
    prog: str,
    doc: str,
    own_title: str,
    add_own_flags: Callable[[argparse._ArgumentGroup], None],
    defaults: dict,
) -> argparse.ArgumentParser:
    """A recipe's parser: described by the first line of its docstring `doc`, its own flags (added by
    `add_own_flags`) in a group titled `own_title`, then every RunConfig field (grpo_ma.Config's and the
    long-run ones) with the recipe's `defaults`, so --help lists both and the long-run flags need no code in
    the recipe. grpo_ma's --task/--eval-task name its embedded task and are unused: the data is --data."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.splitlines()[0])
    add_own_flags(parser.add_argument_group(own_title))
    grpo_ma.build_parser(grpo_ma_run.RunConfig(**defaults), parser.add_argument_group(CONFIG_GROUP))
    return parser


def split_flags(values: dict) -> tuple[grpo_ma_run.RunConfig, argparse.Namespace]:
    """Parsed flags -> (a RunConfig of every field's value, a Namespace of the rest: the recipe's own options
    and --debug), so grpo_ma_run sees exactly its config and the recipe its options."""
    config_fields = {f.name for f in dataclasses.fields(grpo_ma_run.RunConfig)}
    cfg = grpo_ma_run.RunConfig(**{k: v for k, v in values.items() if k in config_fields})
    return cfg, argparse.Namespace(**{k: v for k, v in values.items() if k not in config_fields})


# ================================================================================================
# 4. The run
# ================================================================================================


def require_real_model(cfg: grpo_ma.Config, what: str) -> None:
    """Refuse grpo_ma's embedded default model: a recipe's data and rewards are meant for a real one, and the
    embedded model with its own task is `python grpo_ma.py`. `what` opens the message ("this demo trains a
    real model")."""
    if cfg.model == grpo_ma.EMBEDDED:
        raise ValueError(
            f"{what}: pass --model <hub id or local path>; "
            "the embedded model and task are `python grpo_ma.py`"
        )


def train(
    cfg: grpo_ma_run.RunConfig,
    data_name: str,
    train_pool: list[grpo_ma.Example],
    eval_examples: list[grpo_ma.Example],
    reward_fns: list[tuple[grpo_ma.RewardFn, float]],
    is_correct: Callable[[str, grpo_ma.Example], bool],
) -> dict:
    """Say how many examples the run has (`data_name` first: "GSM8K: 90 training and 10 held-out
    examples"), let CUDA run what autocast leaves in float32 on TF32 tensor cores, and hand everything to
    grpo_ma_run.train (checkpoints, resume); its summary is returned."""
    print(f"{data_name}: {len(train_pool)} training and {len(eval_examples)} held-out examples")
    if grpo_ma.pick_device(cfg).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    return grpo_ma_run.train(
        cfg,
        train_pool=train_pool,
        eval_examples=eval_examples,
        reward_fns=reward_fns,
        is_correct=is_correct,
    )
