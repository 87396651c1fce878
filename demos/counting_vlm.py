"""Visual counting for a tiny vision-language model, learned on a CPU.

A task in the spirit of OThink-MR1's CLEVR-style counting: the policy sees a synthetic image and a question
such as "how many red circles?" and writes its count step by step, then the number.

Image. 84x84 pixels: a 3x3 grid of 28-pixel cells on a light grey background. Each cell is empty or holds one
shape (circle or square) in one colour (red, green, blue). A cell is exactly the 28x28 pixels that Qwen2-VL
merges into one vision token (patch size 14, spatial merge size 2), so each image is 9 image tokens and a
2-layer vision tower never has to combine a shape that straddles two tokens.

Question. One (colour, shape) pair, "how many red circles?", or one colour, "how many red objects?". The count
is drawn uniformly from 0..5 and the other cells are filled with a random number of non-matching distractors
(same colour other shape, same shape other colour, or neither), so guessing the most common count is right
one time in six and the shape word matters.

Reference reasoning, in the step format grpo_ma's step rewards parse ("n:a op b=c;"): one step per counted
object, a running count, then </think>. Three objects: "1:0+1=1;2:1+1=2;3:2+1=3;</think>", answer "3". No
object: the single step "1:0+0=0;</think>", answer "0", so that every reference thought has at least one step
(grpo_ma's StepRVR check rejects a thought without steps) and StepRAR has a key step to match.

Model. A Qwen2VLForConditionalGeneration built from a config (no download): a 2-layer vision tower and a
3-layer Qwen2 text model with multimodal rotary positions, a character-level tokenizer with the Qwen2-VL image
markers as single tokens, and an image-only Qwen2VLProcessor whose chat template renders
"<|vision_start|><|image_pad|><|vision_end|>how many red circles?=?" (the trainer appends <think>).

Training note: keep the vision tower frozen in a supervised warm-up from scratch. Trained with the rest at
lr 1e-3, its outputs grow a large component common to every image within a few dozen steps (norm 0.6 -> 9),
the text model's RMSNorm then scales the image-specific part down to a few percent, and the model learns to
answer without looking (the most common count). Its random initial features already tell the colours and
shapes of aligned cells apart.
"""

import argparse
import dataclasses
import json
import platform
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from PIL import Image, ImageDraw
from tokenizers import AddedToken
from transformers import (
    AutoProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)
from transformers.processing_utils import ProcessorMixin

import grpo_ma
import grpo_ma_run

FORMAT_MARKERS = grpo_ma.FORMAT_MARKERS
THINK_CLOSE = grpo_ma.THINK_CLOSE

# ================================================================================================
# 1. Scenes: a grid of cells, each empty or holding one coloured shape
# ================================================================================================
PATCH_SIZE = 14
SPATIAL_MERGE_SIZE = 2
CELL_PIXELS = PATCH_SIZE * SPATIAL_MERGE_SIZE  # one merged vision token sees exactly one cell
GRID_CELLS = 3  # cells per side: 9 image tokens
IMAGE_PIXELS = GRID_CELLS * CELL_PIXELS  # 84
SHAPE_MARGIN = 5  # pixels between a shape and its cell's border: shapes never touch
BACKGROUND = (235, 235, 235)
COLOURS = {"red": (220, 40, 40), "green": (30, 160, 60), "blue": (40, 80, 220)}
SHAPES = ("circle", "square")
MAX_COUNT = 5
CELLS = tuple((row, column) for row in range(GRID_CELLS) for column in range(GRID_CELLS))  # reading order
KINDS = tuple((colour, shape) for colour in COLOURS for shape in SHAPES)


@dataclass(frozen=True)
class SceneObject:
    row: int
    column: int
    colour: str  # a key of COLOURS
    shape: str  # one of SHAPES


def matches(obj: SceneObject, colour: str, shape: str | None) -> bool:
    """Whether the question "how many <colour> <shape>s?" counts this object (shape None: any shape)."""
    return obj.colour == colour and (shape is None or obj.shape == shape)


def place_objects(rng: random.Random, colour: str, shape: str | None, count: int) -> list[SceneObject]:
    """`count` objects matching (colour, shape) and a random number of non-matching distractors, each in its
    own random cell; returned in reading order (row, then column)."""
    cells = list(CELLS)
    rng.shuffle(cells)
    distractor_kinds = [kind for kind in KINDS if not matches(SceneObject(0, 0, *kind), colour, shape)]
    distractors = rng.randint(0, len(cells) - count)
    objects = [SceneObject(row, column, colour, shape or rng.choice(SHAPES)) for row, column in cells[:count]]
    for row, column in cells[count : count + distractors]:
        objects.append(SceneObject(row, column, *rng.choice(distractor_kinds)))
    return sorted(objects, key=lambda obj: (obj.row, obj.column))


def render_scene(objects: list[SceneObject]) -> Image.Image:
    """The scene as an RGB image of IMAGE_PIXELS x IMAGE_PIXELS, each shape centred in its cell."""
    image = Image.new("RGB", (IMAGE_PIXELS, IMAGE_PIXELS), BACKGROUND)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        left = obj.column * CELL_PIXELS + SHAPE_MARGIN
        top = obj.row * CELL_PIXELS + SHAPE_MARGIN
        box = (left, top, left + CELL_PIXELS - 1 - 2 * SHAPE_MARGIN, top + CELL_PIXELS - 1 - 2 * SHAPE_MARGIN)
        if obj.shape == "circle":
            draw.ellipse(box, fill=COLOURS[obj.colour])
        else:
            draw.rectangle(box, fill=COLOURS[obj.colour])
    return image


def draw_scene(
    rng: random.Random, colour: str, shape: str | None, count: int
) -> tuple[Image.Image, list[SceneObject]]:
    """A random scene with exactly `count` objects matching (colour, shape): (image, objects)."""
    objects = place_objects(rng, colour, shape, count)
    return render_scene(objects), objects


# ================================================================================================
# 2. Examples: question, step-by-step count, answer, image
# ================================================================================================
def counting_question(colour: str, shape: str | None) -> str:
    """Lowercase letters, spaces and '?' only: every character is in the character-level vocabulary."""
    noun = f"{shape}s" if shape else "objects"
    return f"how many {colour} {noun}?"


def counting_steps(count: int) -> list[str]:
    """The running count, one step per counted object ("0+1=1", "1+1=2", ...); no object: ["0+0=0"]."""
    if count == 0:
        return ["0+0=0"]
    return [f"{seen}+1={seen + 1}" for seen in range(count)]


def counting_thought(count: int) -> str:
    """The reference thought: numbered steps "n:a+1=b;" then </think>, e.g. "1:0+1=1;2:1+1=2;</think>"."""
    return "".join(f"{n}:{step};" for n, step in enumerate(counting_steps(count), 1)) + THINK_CLOSE


def scene_description(objects: list[SceneObject], question: str) -> str:
    """A canonical text of one example: the grid read row by row ('.' empty, else colour and shape
    initials, e.g. "rc") and the question. Equal examples have equal descriptions."""
    cells = {(obj.row, obj.column): obj.colour[0] + obj.shape[0] for obj in objects}
    grid = ",".join(cells.get(cell, ".") for cell in CELLS)
    return f"{grid}|{question}"


def is_held_out(description: str) -> bool:
    """A stable hash puts one example in five in the held-out split (the same split on every run)."""
    return zlib.crc32(description.encode()) % 5 == 0


def make_counting_example(rng: random.Random) -> dict:
    """One example as the fields of grpo_ma.Example: question, thought, key_steps, answer, images (one PIL
    image), plus `description`, the canonical scene text (not an Example field: drop it before
    grpo_ma.Example(**d))."""
    colour = rng.choice(sorted(COLOURS))
    shape = rng.choice([*SHAPES, None])  # a third of the questions ask for a colour only
    count = rng.randint(0, MAX_COUNT)
    image, objects = draw_scene(rng, colour, shape, count)
    question = counting_question(colour, shape)
    return {
        "question": question,
        "thought": counting_thought(count),
        "key_steps": [[step] for step in counting_steps(count)],
        "answer": str(count),
        "images": [image],
        "description": scene_description(objects, question),
    }


def sample_counting_examples(rng: random.Random, n: int, held_out: bool) -> list[dict]:
    """n examples (dicts as from make_counting_example) from the training or the held-out split, so training
    never sees an evaluation scene."""
    examples = []
    while len(examples) < n:
        example = make_counting_example(rng)
        if is_held_out(example["description"]) == held_out:
            examples.append(example)
    return examples


# ================================================================================================
# 3. Tokenizer, processor and model, built here (no download)
# ================================================================================================
VISION_START = "<|vision_start|>"
IMAGE_PAD = "<|image_pad|>"
VISION_END = "<|vision_end|>"
# never written by this task, but Qwen2VLProcessor looks its id up: without it the id would be <unk>'s, and
# an unknown character would be typed as a video token
VIDEO_PAD = "<|video_pad|>"
VISION_MARKERS = (VISION_START, IMAGE_PAD, VISION_END, VIDEO_PAD)

# ignores the system message (the tiny model is never told the format: it learns it); each image becomes
# its three markers, and the generation prompt is the "=?" the embedded arithmetic task also ends with
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}" + VISION_START + IMAGE_PAD + VISION_END + "{%- endif -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}=?{%- endif -%}"
)


def build_vlm_tokenizer():
    """grpo_ma's character-level tokenizer with the Qwen2-VL vision markers added as single special tokens
    (skipped when decoding; the format markers stay ordinary tokens, which must survive decoding: the
    trainer splits thought from answer on them)."""
    tokenizer = grpo_ma.build_char_tokenizer()
    tokenizer.add_tokens([AddedToken(m, special=True, normalized=False) for m in VISION_MARKERS], True)
    return tokenizer


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without its video processor. In transformers 5.24 the stock class cannot be built or
    loaded without torchvision (its video processor needs it), and no torchvision build runs beside the CPU
    torch this project uses. Images and text are processed by the stock code, unchanged; videos are refused.
    Registered with AutoProcessor below, so AutoProcessor.from_pretrained finds it by the name saved in
    processor_config.json once this module is imported."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = IMAGE_PAD
        self.video_token = VIDEO_PAD
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
        self.video_token_id = tokenizer.convert_tokens_to_ids(VIDEO_PAD)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        """The stock processor's output: input_ids, attention_mask, mm_token_type_ids (1 on image tokens),
        pixel_values (patches, 1176) and image_grid_thw (images, 3)."""
        if videos is not None:  # the stock code would drop them silently, having no video processor
            raise ValueError("this processor reads images only: it has no video processor")
        return super().__call__(images=images, text=text, **kwargs)


# exist_ok: the key is a transformers config (Qwen2-VL's), which register otherwise skips silently
AutoProcessor.register(Qwen2VLConfig, ImageOnlyQwen2VLProcessor, exist_ok=True)


def build_vlm_processor(tokenizer) -> ImageOnlyQwen2VLProcessor:
    """A Qwen2-VL processor whose image processor turns an IMAGE_PIXELS-square image into exactly
    GRID_CELLS x GRID_CELLS merged tokens: image_grid_thw (1, 6, 6), 36 patches of 14x14 pixels, 9
    <|image_pad|> tokens. The PIL image processor needs no torchvision."""
    pixels = IMAGE_PIXELS * IMAGE_PIXELS
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": pixels, "longest_edge": pixels},  # min = max pixels: every image is 84x84
        patch_size=PATCH_SIZE,
        merge_size=SPATIAL_MERGE_SIZE,
        temporal_patch_size=2,
    )
    return ImageOnlyQwen2VLProcessor(image_processor, tokenizer, chat_template=CHAT_TEMPLATE)


MARKER_CONFIG_FIELDS = {
    "image_token_id": IMAGE_PAD,
    "video_token_id": VIDEO_PAD,
    "vision_start_token_id": VISION_START,
    "vision_end_token_id": VISION_END,
}


def build_tiny_vlm(tokenizer):
    """A small Qwen2VLForConditionalGeneration from a Qwen2VLConfig: a 2-layer vision tower (embed 64, 4
    heads) whose merger outputs the text width, and a 3-layer text model the size of grpo_ma's embedded
    Qwen2 (hidden 128, 4 heads of 32, 2 key-value heads); 873,216 parameters, 274,048 of them in the
    vision tower."""
    text_hidden = 128
    vision = dict(depth=2, embed_dim=64, num_heads=4, mlp_ratio=4, hidden_size=text_hidden, in_channels=3)
    vision.update(patch_size=PATCH_SIZE, spatial_merge_size=SPATIAL_MERGE_SIZE, temporal_patch_size=2)
    # multimodal rotary positions split each head's 16 rotary frequencies (head_dim 32 / 2) into temporal,
    # height and width sections
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]}
    text = dict(hidden_size=text_hidden, intermediate_size=384, num_hidden_layers=3)
    text.update(max_position_embeddings=256)  # a prompt and its longest solution: about 80 positions
    text.update(num_attention_heads=4, num_key_value_heads=2, rope_parameters=rope)
    text.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, bos_token_id=None)
    text["eos_token_id"] = tokenizer.eos_token_id
    ids = {name: tokenizer.convert_tokens_to_ids(marker) for name, marker in MARKER_CONFIG_FIELDS.items()}
    config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
    return Qwen2VLForConditionalGeneration(config)


def save_initial_model(folder: str | Path, seed: int) -> None:
    """Build the tokenizer, processor and a freshly initialised tiny VLM (weights fixed by `seed`) and save
    model and processor into `folder`, loadable by AutoModelForImageTextToText and AutoProcessor."""
    torch.manual_seed(seed)
    tokenizer = build_vlm_tokenizer()
    processor = build_vlm_processor(tokenizer)
    model = build_tiny_vlm(tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)


# ================================================================================================
# 4. The run: supervised warm-up, then GRPO-MA, on seeds; results and a figure of held-out answers
# ================================================================================================
RESULTS = Path("paper_figures/results/counting_vlm.json")
FIGURE = Path("paper_figures/out/counting_vlm.png")
# the CPU recipe: a warm-up that leaves the policy partly right (the vision tower stays frozen throughout,
# see the training note above), then T4A4 GRPO-MA
DEMO_DEFAULTS = dict(
    device="cpu",
    thoughts=4,
    answers=4,
    prompts_per_step=8,
    steps=150,
    warmup_steps=600,
    warmup_batch=32,
    warmup_lr=1e-3,
    lr=5e-5,
    max_thought_tokens=48,
    max_answer_tokens=8,
    eval_size=200,
    eval_every=50,
    save_every=50,
    freeze_vision=True,
    out="runs/counting_vlm",
)


def to_examples(dicts: list[dict]) -> list:
    """grpo_ma.Examples from make_counting_example's dicts (their `description` is only for the split)."""
    return [
        grpo_ma.Example(**{key: value for key, value in d.items() if key != "description"}) for d in dicts
    ]


def demo_splits(seed: int, train_size: int, eval_size: int) -> tuple[list, list]:
    """A pool of training scenes and the held-out scenes, fixed by the seed."""
    train = sample_counting_examples(random.Random(seed), train_size, held_out=False)
    held_out = sample_counting_examples(random.Random(10_000 + seed), eval_size, held_out=True)
    return to_examples(train), to_examples(held_out)


def draw_answers(folder: Path, examples: list, figure: Path) -> None:
    """Held-out images with the question, the true count and the trained policy's greedy answer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = grpo_ma.Config(model=str(folder), device="cpu", max_thought_tokens=48, max_answer_tokens=8)
    model, tokenizer, processor = grpo_ma.load_policy(cfg, torch.device("cpu"))
    _, prompt_ids, vision = grpo_ma.encode_prompts(tokenizer, examples, processor)
    with torch.no_grad():
        tree = grpo_ma.sample_tree(model, tokenizer, prompt_ids, 1, 1, cfg, do_sample=False, vision=vision)
    fig, axes = plt.subplots(1, len(examples), figsize=(2.2 * len(examples), 2.8))
    for p, (axis, example) in enumerate(zip(axes, examples)):
        answer = grpo_ma.extract_answer(tree.answers[p][0][0])
        axis.imshow(example.images[0])
        axis.set_axis_off()
        mark = "right" if answer == example.answer else "wrong"
        axis.set_title(f"{example.question}\ntrue {example.answer}, model {answer} ({mark})", fontsize=8)
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(figure, dpi=120)
    plt.close(fig)


def record_result(path: Path, row: dict, meta: dict) -> None:
    """Add one run to the results file, replacing an earlier run of the same seed and LoRA rank."""
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    runs = [r for r in runs if (r["seed"], r["lora_rank"]) != (row["seed"], row["lora_rank"])]
    runs = sorted([*runs, row], key=lambda r: (r["lora_rank"], r["seed"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": meta, "runs": runs}, indent=2) + "\n")


def run_seed(cfg, seed: int, train_size: int) -> dict:
    """One demo run: a fresh tiny VLM saved in OUT/initial-model, loaded through grpo_ma's VLM path."""
    out = Path(cfg.out) / (f"seed{seed}" + (f"_lora{cfg.lora_rank}" if cfg.lora_rank else ""))
    initial = out.parent / f"{out.name}-initial-model"
    save_initial_model(initial, seed)
    cfg = dataclasses.replace(cfg, seed=seed, model=str(initial), out=str(out))
    train_pool, held_out = demo_splits(seed, train_size, cfg.eval_size)
    summary = grpo_ma_run.train(cfg, train_pool, held_out)
    keys = ("seed", "start_greedy_accuracy", "final_greedy_accuracy", "start_sampled_accuracy")
    row = {key: summary[key] for key in keys} | {"final_sampled_accuracy": summary["final_sampled_accuracy"]}
    return row | {"lora_rank": cfg.lora_rank, "wall_seconds": summary["wall_seconds"], "out": str(out)}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run per seed (default: 0)")
    parser.add_argument("--train-size", type=int, default=4000, help="training scenes (default: %(default)s)")
    parser.add_argument("--results", default=str(RESULTS), help="results file (default: %(default)s)")
    parser.add_argument("--figure", default=str(FIGURE), help="figure of held-out answers ('' for none)")
    grpo_ma.build_parser(grpo_ma_run.RunConfig(**DEMO_DEFAULTS), parser)
    args = vars(parser.parse_args(argv))
    seeds = args.pop("seeds")
    train_size = args.pop("train_size")
    results = Path(args.pop("results"))
    figure = args.pop("figure")
    debug = args.pop("debug")
    args.pop("seed")  # --seeds sets it
    cfg = grpo_ma_run.RunConfig(**args)
    meta = {"command": "python -m demos.counting_vlm --seeds S [--lora-rank R]", "torch": torch.__version__}
    meta |= {"transformers": transformers.__version__, "machine": platform.machine()}
    meta |= {"cpu_threads": torch.get_num_threads(), "config": DEMO_DEFAULTS}
    rows = []
    for seed in seeds:
        row = grpo_ma.run_cli(run_seed, cfg, seed, train_size, debug=debug)
        record_result(results, row, meta)
        rows.append(row)
        if figure and seed == 0 and not cfg.lora_rank:
            draw_answers(Path(row["out"]) / grpo_ma.FINAL, demo_splits(0, 1, 6)[1], Path(figure))
    for row in rows:
        gain = 100 * (row["final_greedy_accuracy"] - row["start_greedy_accuracy"])
        print(
            f"seed {row['seed']}: held-out greedy {row['start_greedy_accuracy']:.3f} -> "
            f"{row['final_greedy_accuracy']:.3f} ({gain:+.1f} pts), {row['wall_seconds'] / 60:.1f} min"
        )
    return rows


if __name__ == "__main__":
    main()
