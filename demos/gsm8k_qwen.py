"""GRPO-MA on GSM8K-style math with a real Qwen2.5-Instruct model on one CUDA GPU.

A recipe on top of `grpo_ma.py`: it reads GSM8K records, turns them into `grpo_ma.Example`s, scores answers
with a numeric reward, and hands everything to `grpo_ma.train`. The algorithm is grpo_ma's, unchanged.

    python -m demos.gsm8k_qwen --data gsm8k_train.jsonl --eval-data gsm8k_test.jsonl       # local files
    python -m demos.gsm8k_qwen                        # GSM8K from the hub (needs `pip install datasets`)
    python -m demos.gsm8k_qwen --model Qwen/Qwen2.5-1.5B-Instruct --prompts-per-step 1 --data ...
    python -m demos.gsm8k_qwen --help                 # every flag: this demo's and every grpo_ma.Config field

Data. One JSON object a line with `question` and `answer`, the answer in GSM8K form: a rationale, then
`#### <number>`. The rationale's calculator notes `<<48/2=24>>` become StepRAR key steps and are removed from
the reference thought (which is used only by a supervised warm-up, off by default). Without --eval-data the
held-out set is the last --holdout-fraction of the training file.

Where this recipe chooses (grpo_ma's own departures from the paper are listed in docs/algorithm.md):
- Reward: `accuracy` is the last number inside <answer>...</answer>, normalized ("$1,234.50" -> "1234.5",
  "72.0" -> "72"), equal to the reference; `format` is grpo_ma's (exactly <answer>INTEGER</answer>).
  The logged train/held-out accuracies are grpo_ma's own check (the integer right after <answer>): the two
  agree on answers in the rewarded format <answer>INTEGER</answer>, and may differ on "$18" or "1,234".
- Weights: grpo_ma keeps float32 master weights and computes in bfloat16 through autocast on CUDA, because
  AdamW on bfloat16 weights rounds most updates away at lr ~1e-6 (an update of 1e-6 is far below the bfloat16
  spacing of a weight of 0.02, about 1e-4; a test in tests/test_demo_gsm8k.py shows it).
- `--reward steprvr` is refused: it checks the embedded task's "n:a op b=c;" steps, not free-text reasoning.

Memory. grpo_ma's update follows the tree: each prompt is forwarded once for its thoughts and each thought
once for its M answers, in micro-batches of whole thoughts packed up to --micro-batch-tokens padded tokens,
and log-probs are taken in float32 chunks, so activations are bounded by the budget, whatever
--prompts-per-step is. What stays is the model state: float32
weights, gradients and two AdamW moments plus the frozen float32 reference, 20 bytes a parameter (0.5B:
~10 GB; 1.5B: ~31 GB). `python -m paper_figures.bench` measures whole steps at this recipe's shape
(paper_figures/results/bench.md). The tree update cannot use transformers' per-layer gradient checkpointing,
which drops the KV cache the answers are forwarded against; micro-batches bound the activations instead.
Checkpoints hold weights and AdamW state: ~6 GB for 0.5B in float32 (--save-every).
"""

import argparse
import json
import re
import sys
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path

if __package__ in (None, ""):  # run as `python demos/gsm8k_qwen.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpo_ma
from demos import common
from grpo_ma import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, Example

# ================================================================================================
# 1. Data: GSM8K records -> grpo_ma.Example
# ================================================================================================
FINAL_ANSWER_MARK = "####"
CALCULATOR_NOTE = re.compile(r"<<([^<>=]*)=([^<>]*)>>")  # GSM8K's "<<48/2=24>>"
NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")  # "1,234", "$5", "-3", "2.50"
ANSWER_BLOCK = re.compile(re.escape(ANSWER_OPEN) + r"(.*?)(?:" + re.escape(ANSWER_CLOSE) + r"|$)", re.DOTALL)


def normalize_number(text: str) -> str | None:
    """One spelling per number: strip commas, `$`, spaces and a sentence's final period; drop trailing zeros
    ("$1,234.50" -> "1234.5", "72.0" -> "72", "-0" -> "0"). None when the text is not a number."""
    cleaned = text.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    normal = format(value.normalize(), "f")
    return "0" if normal == "-0" else normal


def split_gsm8k_answer(answer: str) -> tuple[str, str]:
    """'rationale ... #### 1,234' -> (rationale, '1234')."""
    rationale, mark, final = answer.rpartition(FINAL_ANSWER_MARK)
    number = normalize_number(final) if mark else None
    if number is None:
        raise ValueError(f"not a GSM8K answer (expected text ending in '#### <number>'): {answer[-80:]!r}")
    return rationale.strip(), number


def calculator_key_steps(rationale: str) -> list[list[str]]:
    """Each calculator note "<<48/2=24>>" is one key step (StepRAR), matched in the thought as written
    compactly or with spaces ("48/2=24", "48 / 2 = 24"), with `*` also as `x` or `×`."""
    key_steps = []
    for expression, result in CALCULATOR_NOTE.findall(rationale):
        compact = f"{expression}={result}".replace(" ", "")
        spaced = re.sub(r"([-+*/=])", r" \1 ", compact)
        spellings = {compact, spaced}
        spellings |= {s.replace("*", times) for s in (compact, spaced) for times in ("x", "×")}
        key_steps.append(sorted(spellings))
    return key_steps


def to_example(record: dict, use_key_steps: bool = True) -> Example:
    """The reference thought is the rationale without calculator notes, closed by </think>; the reference
    answer is the normalized final number."""
    rationale, number = split_gsm8k_answer(record["answer"])
    thought = CALCULATOR_NOTE.sub("", rationale).strip() + THINK_CLOSE
    key_steps = calculator_key_steps(rationale) if use_key_steps else []
    return Example(question=record["question"].strip(), thought=thought, key_steps=key_steps, answer=number)


def read_jsonl(path: str) -> list[dict]:
    """Every record of the file, each checked to have a question and an answer."""
    records = []
    for where, line in common.jsonl_lines(path):
        record = json.loads(line)
        if not {"question", "answer"} <= set(record):
            raise ValueError(f"{where}: a record needs 'question' and 'answer', got {sorted(record)}")
        records.append(record)
    return records


def hub_records(name: str, config: str, split: str) -> list[dict]:
    """GSM8K from the Hugging Face hub, through the optional `datasets` library (imported only here)."""
    try:
        import datasets
    except ImportError:
        raise SystemExit(
            "no --data given and the `datasets` library is not installed: pass --data train.jsonl "
            "(lines with 'question' and 'answer' ending in '#### <number>'), or pip install datasets"
        ) from None
    try:
        rows = datasets.load_dataset(name, config, split=split)
    except Exception as error:  # offline, unknown name, ...: say what to do instead
        raise SystemExit(
            f"could not load {name} ({config}, {split}) from the hub: {error}\n"
            "pass local files with --data (and --eval-data) instead"
        ) from error
    return [{"question": row["question"], "answer": row["answer"]} for row in rows]


def load_splits(args: argparse.Namespace, cfg: grpo_ma.Config) -> tuple[list[Example], list[Example]]:
    """Training pool and held-out set: --data (and --eval-data, else the file's last --holdout-fraction), or
    the hub's train and test splits."""
    if args.data:
        train_records = read_jsonl(args.data)[: args.limit]
        if args.eval_data:
            eval_records = read_jsonl(args.eval_data)
        else:
            train_records, eval_records = common.hold_out_tail(
                train_records, args.holdout_fraction, args.data
            )
    else:
        train_records = hub_records(args.hub_dataset, args.hub_config, "train")[: args.limit]
        eval_records = (
            read_jsonl(args.eval_data)
            if args.eval_data
            else hub_records(args.hub_dataset, args.hub_config, "test")
        )
    train_pool = [to_example(r, args.key_steps) for r in train_records]
    eval_examples = [to_example(r, args.key_steps) for r in eval_records[: cfg.eval_size]]
    common.require_enough_for_a_step(cfg, len(train_pool), len(eval_examples), "examples")
    return train_pool, eval_examples


# ================================================================================================
# 2. Rewards: batched callables (lists in, list out) with weights, as grpo_ma.train expects
# ================================================================================================
def extract_number(answer: str) -> str | None:
    """The last number inside <answer>...</answer> (an answer that never closed is read as it stands),
    normalized like the reference; None when there is none."""
    block = ANSWER_BLOCK.search(answer)
    numbers = NUMBER.findall(block.group(1)) if block else []
    return normalize_number(numbers[-1]) if numbers else None


def answer_matches(answer: str, example: Example) -> bool:
    return extract_number(answer) == example.answer


@grpo_ma.per_answer
def numeric_answer(prompt, thought, answer, example) -> float:
    """1 when the number in the answer block equals the reference number, else 0."""
    return float(answer_matches(answer, example))


def make_steprar(alpha: float):
    """StepRAR on GSM8K: correct + alpha * (share of the calculator-note key steps found in the thought)."""

    def steprar(prompt, thought, answer, example) -> float:
        return float(answer_matches(answer, example)) + alpha * grpo_ma.key_step_fraction(
            thought, example.key_steps
        )

    return grpo_ma.per_answer(steprar)


def gsm8k_reward_functions(cfg: grpo_ma.Config) -> list[tuple[grpo_ma.RewardFn, float]]:
    """--reward and --reward-weights as grpo_ma reads them, with the numeric reward in place of the embedded
    task's integer check; --reward steprvr is refused."""
    registry = {
        "accuracy": numeric_answer,
        "format": grpo_ma.format_reward,
        "steprar": make_steprar(cfg.step_alpha),
    }
    return common.weighted_rewards(cfg, registry, "GSM8K thoughts")


# ================================================================================================
# 3. CLI: this demo's flags, then one flag per grpo_ma.Config field with defaults for one GPU
# ================================================================================================
GPU_DEFAULTS = dict(
    model="Qwen/Qwen2.5-0.5B-Instruct",
    prompts_per_step=8,
    steps=200,
    warmup_steps=0,  # an instruct model already writes reasoning; RL only
    warmup_lr=1e-5,  # if a warm-up is asked for: 1e-3 (the embedded model's) would wreck a real model
    warmup_batch=8,
    lr=1e-6,  # TRL's GRPO default for models of this size
    beta=0.04,
    max_thought_tokens=384,  # several times a GSM8K reference solution; longer thoughts are closed by force
    max_answer_tokens=32,
    out="runs/gsm8k_qwen",
    save_every=50,  # a float32 checkpoint of 0.5B with AdamW state is ~6 GB
    eval_every=50,
    eval_size=200,
)


def add_data_flags(demo: argparse._ArgumentGroup) -> None:
    """This demo's own flags: where the GSM8K records come from and how they are split."""
    demo.add_argument(
        "--data",
        default=None,
        help="training JSONL, one {question, answer} a line, the answer ending in '#### <number>' "
        "(default: GSM8K's train split from the hub, needs the datasets library)",
    )
    common.add_split_flags(
        demo,
        eval_data_help="held-out JSONL in the same format (default: the hub's test split, or with --data the "
        "last --holdout-fraction of the training file)",
        holdout_help="with --data and no --eval-data: the share of the file, from its end, held out "
        "(default: %(default)s)",
    )
    demo.add_argument(
        "--key-steps",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="take the rationale's calculator notes <<a*b=c>> as StepRAR key steps; --no-key-steps "
        "leaves them empty (default: %(default)s)",
    )
    demo.add_argument(
        "--hub-dataset",
        default="openai/gsm8k",
        help="hub dataset read when no --data is given (default: %(default)s)",
    )
    demo.add_argument("--hub-config", default="main", help="its configuration (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    return common.build_parser(
        "python -m demos.gsm8k_qwen", __doc__, "data (this demo)", add_data_flags, GPU_DEFAULTS
    )


def parse_args(argv: Sequence[str] | None = None) -> tuple[grpo_ma.Config, argparse.Namespace]:
    """Split the parsed flags into a grpo_ma.Config and this demo's own options."""
    return common.split_flags(vars(build_parser().parse_args(argv)))


def main(argv: Sequence[str] | None = None) -> dict:
    cfg, args = parse_args(argv)
    common.require_real_model(cfg, "this demo trains a real model")
    reward_fns = gsm8k_reward_functions(cfg)
    train_pool, eval_examples = load_splits(args, cfg)
    return common.train(cfg, "GSM8K", train_pool, eval_examples, reward_fns, answer_matches)


if __name__ == "__main__":
    grpo_ma.run_cli(main, debug="--debug" in sys.argv)
