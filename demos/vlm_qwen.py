"""GRPO-MA on visual counting or geometry with Qwen2.5-VL-3B-Instruct and LoRA on one CUDA GPU.

A recipe on top of `grpo_ma.py`: it reads a JSONL file of images and questions, turns each line into a
`grpo_ma.Example` with its image, scores answers with a numeric reward, and hands everything to
`grpo_ma.train`. The algorithm is grpo_ma's, unchanged; grpo_ma loads a model whose config has a vision tower
with its processor, which places each image before the question in the chat prompt.

    pip install -e . torchvision      # a GPU install of torch usually has torchvision already
    python -m demos.vlm_qwen --data counting_train.jsonl --eval-data counting_test.jsonl
    python -m demos.vlm_qwen --data counting_train.jsonl --kl-schedule dynamic        # GRPO-D, counting pair
    python -m demos.vlm_qwen --data geometry.jsonl --kl-schedule dynamic --kl-pair geometry
    python -m demos.vlm_qwen --data counting_train.jsonl --thoughts 16 --answers 1    # plain GRPO, 16 answers
    python -m demos.vlm_qwen --help       # every flag: this recipe's and every grpo_ma.Config field

Data. One JSON object a line:
    {"image": "images/0001.png", "question": "How many red cubes are there?", "answer": 3,
     "key_steps": [["3 red cubes", "three red cubes"]]}
`image` is a path, relative to the JSONL file's folder or absolute; `question` a string; `answer` a number
(CLEVR-style counting, or a geometry result such as 2.5), as a JSON number or a string, normalized like
gsm8k_qwen's ("2.50" -> "2.5"). Optional: `key_steps` for StepRAR, a list of strings (each one key step) or a
list of lists of equivalent strings; `thought`, a reference reasoning read only by the supervised warm-up
(off by default; without it the warm-up teaches an empty thought). Every line is checked, and every image
path is checked to exist, when the file is read; the images of the records used are then opened with pillow
and converted to RGB, so a missing or unreadable image is a one-line error naming the JSONL line and the path.
Without --eval-data the held-out set is the last --holdout-fraction of the training file.

Where this recipe chooses (grpo_ma's own departures from the paper are listed in docs/algorithm.md):
- Reward: `accuracy` is gsm8k_qwen's numeric check (the last number inside <answer>...</answer>, normalized,
  equal to the reference) and is also the logged accuracy; `format` is 1 for exactly <answer>NUMBER</answer>,
  a decimal allowed (grpo_ma's own format reward wants an integer, which would punish a right geometry
  answer "2.5"); `steprar` matches the records' key steps and is refused when no training record has any
  (it would silently equal `accuracy`). `--reward steprvr` is refused: it checks the embedded task's
  "n:a op b=c;" steps, not free-text reasoning about an image.
- KL: a constant beta 0.04 by default. `--kl-schedule dynamic` is GRPO-D with OThink-MR1's published pairs
  (beta_min, beta_max), chosen by --kl-pair: (0.04, 0.10) for visual counting, (0.0, 0.02) for geometry; a
  --beta-min or --beta-max given on the command line wins over the pair. (--kl-pair, not --task: grpo_ma's
  --task names its embedded arithmetic task and is unused here.)
- LoRA: rank 64, alpha 128 (an update scaled by alpha / rank = 2) and lr 1e-5, the LoRA GRPO settings VLM-R1
  trains Qwen2.5-VL-3B with: an adapter starts at zero and moves only in a low-rank subspace, so it takes a
  larger step than full fine-tuning's ~1e-6. No LoRA dropout: rollouts are sampled with dropout off, and the
  update would otherwise score a different policy than the one that sampled. Targets are grpo_ma's default,
  every linear projection of the language model (q, k, v, o, gate, up, down). peft matches them by name, and
  Qwen2.5-VL's vision blocks name their MLP gate/up/down_proj too, so those get adapters as well (29M of the
  150M adapter parameters), while the vision attention, patch embedding and merger stay frozen;
  `--lora-targets q_proj,k_proj,v_proj,o_proj` leaves the vision tower untouched. (Qwen2-VL's vision MLP is
  fc1/fc2: there the default adapts the language model only.)
- Sampling: T4A4 on 4 prompts a step (64 answers). Thoughts up to 256 tokens (a counting or
  short geometry argument; longer ones are closed by force), answers up to 16 (one number in its block).
- Images: downscaled on reading (aspect kept) to at most --max-image-pixels, 512 * 28 * 28: Qwen2.5-VL merges
  28x28 pixels into one vision token, so an image costs at most ~512 tokens of every prompt it is in.
- No supervised warm-up: an instruct model already writes reasoning; RL only. With a warm-up and LoRA, the
  warm-up fine-tunes every weight and the adapter is added after it, so the run saves the warmed-up weights
  once in OUT/base, and OUT/final (the adapter) names them as its base.

Memory. Qwen2.5-VL-3B has 3.75B parameters. grpo_ma computes in bfloat16 through autocast on CUDA; with LoRA
the frozen base is stored in bfloat16 (7.5 GB: nothing updates it, so it needs no float32 master copy), and
only the adapter (rank 64: ~150M parameters) has float32 weights, gradients and two AdamW moments, 16 bytes a
parameter, ~2.4 GB; the KL reference is the same model with the adapter switched off, so it costs no memory
(full fine-tuning would need ~75 GB: float32 weights, gradients, two moments and a frozen reference).
Rollouts run on a copy of the base with the adapters folded in: 7.5 GB more, no adapter matmuls per decoded
token. The tree update forwards each prompt (its image tokens included) once for its thoughts and each thought
once for its M answers, packed up to --micro-batch-tokens padded tokens a forward, so activations are
bounded by that budget; it cannot use per-layer gradient checkpointing (that drops the KV cache the answers
are forwarded against). The peak has not been measured on a GPU
here: treat the first GPU run as the test. Every checkpoint holds the adapter and its AdamW state (~1.8
GB), not the base, and two are kept (--save-every 100). OUT/final holds the adapter and the processor.

Loading. In transformers 5.24, AutoProcessor.from_pretrained on a stock Qwen2-VL or Qwen2.5-VL checkpoint
builds its video processor, which needs torchvision (a GPU install of torch has it; a CPU-only one may not).
"""

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as `python demos/vlm_qwen.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from PIL import Image

import grpo_ma
from demos import common
from demos.gsm8k_qwen import answer_matches, make_steprar, normalize_number, numeric_answer
from grpo_ma import ANSWER_CLOSE, ANSWER_OPEN, THINK_CLOSE, Example

# ================================================================================================
# 1. Data: JSONL lines with an image -> grpo_ma.Example
# ================================================================================================
REQUIRED_FIELDS = {"image", "question", "answer"}
VISION_TOKEN_PIXELS = 28 * 28  # Qwen2-VL / Qwen2.5-VL: 14x14 patches, merged 2x2 into one token


def resolve_image_path(image: str, jsonl_folder: Path) -> Path:
    """An absolute path as it is; a relative one from the JSONL file's folder (not the working directory), so
    a data folder can be moved or read from anywhere. Returned absolute, as error messages name it."""
    path = Path(image).expanduser()
    return path if path.is_absolute() else jsonl_folder.absolute() / path


def normalize_key_steps(key_steps, where: str) -> list[list[str]]:
    """StepRAR key steps as grpo_ma reads them: each key step a list of equivalent strings. A plain string is
    a key step with one spelling: ["3 red cubes", ...] -> [["3 red cubes"], ...]."""
    if not isinstance(key_steps, list):
        raise ValueError(f"{where}: 'key_steps' must be a list, got {type(key_steps).__name__}")
    normalized = []
    for step in key_steps:
        spellings = [step] if isinstance(step, str) else step
        if not isinstance(spellings, list) or not spellings or not all(isinstance(s, str) for s in spellings):
            raise ValueError(
                f"{where}: each key step must be a string or a non-empty list of strings, got {step!r}"
            )
        normalized.append(spellings)
    return normalized


def parse_record(record, where: str, jsonl_folder: Path) -> dict:
    """One checked line (`where` is its "FILE:LINE"): question, normalized answer, key steps, reference
    thought, and the image's resolved path, which must exist. The image itself is opened later, only for the
    records a run uses."""
    if not isinstance(record, dict) or not REQUIRED_FIELDS <= set(record):
        found = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"{where}: a record needs 'image', 'question' and 'answer', got {found}")
    texts = (record["image"], record["question"], record.get("thought", ""))
    if not all(isinstance(text, str) for text in texts):
        raise ValueError(f"{where}: 'image', 'question' and 'thought' must be strings")
    answer = record["answer"]
    number = None if isinstance(answer, bool) else normalize_number(str(answer))
    if number is None:
        raise ValueError(f"{where}: 'answer' must be a number, got {answer!r}")
    image = resolve_image_path(record["image"], jsonl_folder)
    if not image.is_file():
        raise ValueError(f"{where}: image not found: {image}")
    return {
        "question": record["question"].strip(),
        "answer": number,
        "key_steps": normalize_key_steps(record.get("key_steps", []), where),
        "thought": record.get("thought", "").strip() + THINK_CLOSE,
        "image": image,
        "where": where,
    }


def read_jsonl(path: str, limit: int | None = None) -> list[dict]:
    """The file's records (the first `limit`, when given), each checked by `parse_record`."""
    jsonl_path = Path(path)
    return [
        parse_record(common.parse_json_line(line, where), where, jsonl_path.parent)
        for where, line in common.jsonl_lines(jsonl_path, limit)
    ]


def open_image(path: Path, max_pixels: int) -> Image.Image:
    """The image in RGB (the processor's input; PNGs may be grey, paletted or have alpha), downscaled with its
    aspect kept when it has more than `max_pixels` pixels (0: never)."""
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    area = rgb.width * rgb.height
    if max_pixels and area > max_pixels:
        scale = (max_pixels / area) ** 0.5
        size = (max(1, int(rgb.width * scale)), max(1, int(rgb.height * scale)))
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    return rgb


def to_example(record: dict, max_pixels: int) -> Example:
    """A checked record with its image opened: a grpo_ma.Example showing one image."""
    try:
        image = open_image(record["image"], max_pixels)
    except OSError as error:  # pillow's UnidentifiedImageError is one
        raise ValueError(f"{record['where']}: cannot read image {record['image']} ({error})") from None
    fields = dict(question=record["question"], thought=record["thought"], key_steps=record["key_steps"])
    return Example(**fields, answer=record["answer"], images=[image])


def load_splits(args: argparse.Namespace, cfg: grpo_ma.Config) -> tuple[list[Example], list[Example]]:
    """Training pool and held-out set: --data, and --eval-data or else the training file's last
    --holdout-fraction. Images are opened only for the records used."""
    if not 0 < args.holdout_fraction < 1 or args.max_image_pixels < 0:
        raise ValueError("--holdout-fraction must lie in (0, 1) and --max-image-pixels be >= 0")
    train_records = read_jsonl(args.data, args.limit)
    if args.eval_data:
        eval_records = read_jsonl(args.eval_data, cfg.eval_size)
    else:
        train_records, eval_records = common.hold_out_tail(train_records, args.holdout_fraction, args.data)
    common.require_enough_for_a_step(cfg, len(train_records), len(eval_records), "records")
    train_pool = [to_example(r, args.max_image_pixels) for r in train_records]
    eval_examples = [to_example(r, args.max_image_pixels) for r in eval_records[: cfg.eval_size]]
    return train_pool, eval_examples


# ================================================================================================
# 2. Rewards: batched callables (lists in, list out) with weights, as grpo_ma.train expects
# ================================================================================================
NUMBER_ANSWER = re.compile(re.escape(ANSWER_OPEN) + r"-?\d+(?:\.\d+)?" + re.escape(ANSWER_CLOSE))


@grpo_ma.per_answer
def numeric_format(prompt, thought, answer, example) -> float:
    """1 for an answer that is exactly <answer>NUMBER</answer>, NUMBER an integer or a decimal, else 0."""
    return float(NUMBER_ANSWER.fullmatch(answer.strip()) is not None)


def vlm_reward_functions(cfg: grpo_ma.Config) -> list[tuple[grpo_ma.RewardFn, float]]:
    """--reward and --reward-weights as grpo_ma reads them, with the numeric reward and a format reward that
    allows decimals in place of the embedded task's integer ones; --reward steprvr is refused."""
    registry = {
        "accuracy": numeric_answer,
        "format": numeric_format,
        "steprar": make_steprar(cfg.step_alpha),
    }
    return common.weighted_rewards(cfg, registry, "thoughts about an image")


def require_key_steps_for_steprar(cfg: grpo_ma.Config, train_pool: list[Example], data: str) -> None:
    """Without key steps StepRAR is `accuracy` under another name: refuse it rather than log a misleading
    reward."""
    if "steprar" in common.reward_names(cfg) and not any(example.key_steps for example in train_pool):
        raise ValueError(f"--reward steprar: no training record in {data} has 'key_steps'")


# ================================================================================================
# 3. CLI: this recipe's flags, then one flag per grpo_ma.Config field with defaults for one GPU
# ================================================================================================
KL_PAIRS = {"counting": (0.04, 0.10), "geometry": (0.0, 0.02)}  # OThink-MR1's GRPO-D (beta_min, beta_max)
GPU_DEFAULTS = dict(
    model="Qwen/Qwen2.5-VL-3B-Instruct",
    device="cuda",
    prompts_per_step=4,
    steps=200,
    warmup_steps=0,  # an instruct model already writes reasoning; RL only
    warmup_lr=1e-5,  # if a warm-up is asked for: 1e-3 (the embedded model's) would wreck a real model
    warmup_batch=4,
    lr=1e-5,  # VLM-R1's LoRA GRPO rate for Qwen2.5-VL-3B
    beta=0.04,
    lora_rank=64,
    lora_alpha=128,
    lora_dropout=0.0,  # rollouts sample with dropout off: the update must score that same policy
    max_thought_tokens=256,
    max_answer_tokens=16,  # one number in its answer block
    out="runs/vlm_qwen",
    save_every=100,  # a checkpoint holds the adapter and its AdamW state (~1.8 GB), not the base
    eval_every=50,
    eval_size=100,
)


def defer_beta_bounds_to_kl_pair(parser: argparse.ArgumentParser) -> None:
    """--beta-min and --beta-max default to None and are filled from --kl-pair after parsing, so that a value
    given on the command line wins over the pair."""
    for action in parser._actions:  # argparse has no public way to change an added flag's default and help
        if action.dest in ("beta_min", "beta_max"):
            action.default = None
            action.help = action.help.replace("%(default)s", "per --kl-pair")


def add_data_flags(demo: argparse._ArgumentGroup) -> None:
    """This recipe's own flags: the JSONL files, their split, image size and the GRPO-D pair."""
    demo.add_argument(
        "--data",
        required=True,
        help="training JSONL, one {image, question, answer[, key_steps, thought]} a line; image paths are "
        "relative to the file's folder or absolute",
    )
    common.add_split_flags(
        demo,
        eval_data_help="held-out JSONL in the same format (default: the last --holdout-fraction of --data)",
        holdout_help="without --eval-data: the share of --data, from its end, held out "
        "(default: %(default)s)",
    )
    demo.add_argument(
        "--max-image-pixels",
        type=int,
        default=512 * VISION_TOKEN_PIXELS,
        help="downscale larger images (aspect kept) to at most this many pixels, ~512 vision tokens; 0: "
        "never (default: %(default)s)",
    )
    demo.add_argument(
        "--kl-pair",
        choices=sorted(KL_PAIRS),
        default="counting",
        help="with --kl-schedule dynamic (GRPO-D): OThink-MR1's (beta_min, beta_max), counting (0.04, 0.10) "
        "or geometry (0.0, 0.02); an explicit --beta-min or --beta-max wins (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = common.build_parser(
        "python -m demos.vlm_qwen", __doc__, "data (this recipe)", add_data_flags, GPU_DEFAULTS
    )
    defer_beta_bounds_to_kl_pair(parser)
    return parser


def parse_args(argv: Sequence[str] | None = None) -> tuple[grpo_ma.Config, argparse.Namespace]:
    """Split the parsed flags into a grpo_ma.Config and this recipe's own options, with the GRPO-D bounds
    not given on the command line taken from --kl-pair."""
    values = vars(build_parser().parse_args(argv))
    for name, pair_value in zip(("beta_min", "beta_max"), KL_PAIRS[values["kl_pair"]]):
        if values[name] is None:
            values[name] = pair_value
    return common.split_flags(values)


def require_vision_model(model: str) -> None:
    """grpo_ma encodes prompts as text when the model has no processor, so a text-only model would be trained
    on the questions without their images: refuse it (reading only the model's config)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0]
        raise ValueError(f"--model {model}: cannot read its config ({reason})") from error
    if not hasattr(config, "vision_config"):
        raise ValueError(
            f"--model {model} has no vision tower (no vision_config in its config): this recipe needs a "
            "vision-language model such as Qwen/Qwen2.5-VL-3B-Instruct"
        )


def main(argv: Sequence[str] | None = None) -> dict:
    cfg, args = parse_args(argv)
    common.require_real_model(cfg, "this recipe trains a real vision-language model")
    grpo_ma.validate_config(cfg)  # a bad flag fails before any image is opened
    grpo_ma.pick_device(cfg)  # and so does --device cuda on a machine without one
    require_vision_model(cfg.model)
    reward_fns = vlm_reward_functions(cfg)
    train_pool, eval_examples = load_splits(args, cfg)
    require_key_steps_for_steprar(cfg, train_pool, args.data)
    return common.train(cfg, "images", train_pool, eval_examples, reward_fns, answer_matches)


if __name__ == "__main__":
    grpo_ma.run_cli(main, debug="--debug" in sys.argv)
