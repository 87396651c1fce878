"""The visual counting demo (demos/counting_vlm.py): its scenes hold exactly the count asked for, its
reference reasoning passes grpo_ma's step rewards, its split never leaks, and a short run goes through
grpo_ma's vision-language path end to end and records its result and figure."""

import json
import random

import numpy as np
import pytest

import grpo_ma as G
from demos import counting_vlm as C

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def cells_of(image, colour, shape=None) -> int:
    """The grid cells holding a shape of the colour (and the shape), read off the pixels: the centre
    gives the colour; a square also fills its box's corner, which a circle leaves as background."""
    pixels = np.asarray(image)
    half = C.CELL_PIXELS // 2
    corner = C.SHAPE_MARGIN + 1
    found = 0
    for row, column in C.CELLS:
        top, left = row * C.CELL_PIXELS, column * C.CELL_PIXELS
        centre = tuple(int(v) for v in pixels[top + half, left + half])
        filled = tuple(int(v) for v in pixels[top + corner, left + corner]) == centre
        found += centre == C.COLOURS[colour] and shape in (None, "square" if filled else "circle")
    return found


def test_the_image_holds_the_count_the_answer_gives():
    rng = random.Random(3)
    for _ in range(60):
        example = C.make_counting_example(rng)
        words = example["question"].removesuffix("?").split()  # "how many red circles"
        shape = None if words[3] == "objects" else words[3].removesuffix("s")
        assert cells_of(example["images"][0], words[2], shape) == int(example["answer"])


def test_reference_reasoning_passes_both_step_rewards():
    rng = random.Random(4)
    for _ in range(30):
        fields = C.make_counting_example(rng)
        fields.pop("description")
        example = G.Example(**fields)
        answer = G.ANSWER_OPEN + example.answer + G.ANSWER_CLOSE
        assert G.reasoning_is_valid(example.thought, answer)
        assert G.key_step_fraction(example.thought, example.key_steps) == 1.0
        assert G.answer_is_correct(answer, example)


def test_counts_are_spread_and_the_held_out_split_is_disjoint():
    train = C.sample_counting_examples(random.Random(0), 600, held_out=False)
    held_out = C.sample_counting_examples(random.Random(1), 150, held_out=True)
    assert not {e["description"] for e in train} & {e["description"] for e in held_out}
    counts = [int(e["answer"]) for e in train]
    assert set(counts) == set(range(C.MAX_COUNT + 1))
    assert max(counts.count(n) for n in set(counts)) < 0.3 * len(counts)


def test_short_demo_run_records_its_result_and_draws_held_out_answers(tmp_path, monkeypatch):
    results = tmp_path / "counting.json"
    figure = tmp_path / "counting.png"
    args = ["--seeds", "0", "--steps", "2", "--warmup-steps", "3", "--eval-size", "4", "--train-size", "40"]
    args += ["--thoughts", "2", "--answers", "2", "--prompts-per-step", "2", "--max-thought-tokens", "6"]
    args += ["--out", str(tmp_path / "runs"), "--results", str(results), "--figure", str(figure)]
    rows = C.main(args)
    saved = json.loads(results.read_text())
    assert saved["runs"] == rows and rows[0]["seed"] == 0 and rows[0]["lora_rank"] == 0
    assert 0 <= rows[0]["final_greedy_accuracy"] <= 1
    assert figure.stat().st_size > 0
    metrics = (tmp_path / "runs" / "seed0" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [0, 1, 2]
    # a second run of another LoRA rank is added beside it, not in its place
    C.main([*args, "--lora-rank", "2", "--figure", ""])
    assert [(r["seed"], r["lora_rank"]) for r in json.loads(results.read_text())["runs"]] == [(0, 0), (0, 2)]
