"""Tests of demos/vlm_qwen.py on CPU, offline: the JSONL of images and questions, the rewards, the GRPO-D pair
per task, the CLI, and the whole path (JSONL -> Examples with images -> grpo_ma.train with LoRA) through the
tiny Qwen2-VL of demos/counting_vlm.py saved to disk. Questions use only characters its tokenizer knows."""

import dataclasses
import json
import random
import re

import pytest
import torch
from PIL import Image

import grpo_ma as G
import grpo_ma_run as R
from demos import counting_vlm as C  # importing it registers the tiny model's processor with AutoProcessor
from demos import vlm_qwen as D

pytestmark = pytest.mark.usefixtures("one_torch_thread")
COUNTS = [0, 1, 2, 3, 1, 2]


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    """The counting demo's tiny Qwen2-VL and its image-only processor, saved like a hub checkpoint."""
    folder = tmp_path_factory.mktemp("tiny_vlm")
    C.save_initial_model(folder, seed=0)
    return folder


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def counting_records(folder, counts=COUNTS) -> list[dict]:
    """One 84x84 scene per count, saved as a PNG under folder/images, with records naming it relative to
    `folder` and key steps as plain strings."""
    (folder / "images").mkdir(exist_ok=True)
    rng = random.Random(0)
    records = []
    for i, count in enumerate(counts):
        image, _ = C.draw_scene(rng, "red", "circle", count)
        image.save(folder / "images" / f"scene{i}.png")
        record = {"image": f"images/scene{i}.png", "question": "how many red circles?", "answer": count}
        records.append(record | {"key_steps": C.counting_steps(count)})
    return records


# ------------------------------------------------------------------------------------------------
# the JSONL file
# ------------------------------------------------------------------------------------------------
def test_records_resolve_image_paths_and_normalise_key_steps(tmp_path, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    first, second = counting_records(data, [2, 0])
    first["key_steps"] = ["0+1=1", ["1+1=2", "1 + 1 = 2"]]
    second |= {"image": str(data / "images" / "scene1.png"), "answer": "0.50", "thought": " look. "}
    del second["key_steps"]  # optional
    path = write_jsonl(data / "train.jsonl", [first, second])
    monkeypatch.chdir(tmp_path)  # relative paths are the file's folder's, not the working directory's
    records = D.read_jsonl(str(path.relative_to(tmp_path)))
    assert [r["image"] for r in records] == [data / "images" / "scene0.png", data / "images" / "scene1.png"]
    examples = [D.to_example(r, max_pixels=0) for r in records]
    assert examples[0].key_steps == [["0+1=1"], ["1+1=2", "1 + 1 = 2"]]
    assert examples[1].key_steps == []
    assert [e.answer for e in examples] == ["2", "0.5"]
    assert [e.thought for e in examples] == [G.THINK_CLOSE, "look." + G.THINK_CLOSE]
    image = examples[0].images[0]
    assert (len(examples[0].images), image.mode, image.size) == (1, "RGB", (84, 84))


def test_images_are_read_as_rgb_and_large_ones_downscaled_with_their_aspect(tmp_path):
    Image.new("L", (400, 100), 128).save(tmp_path / "wide.png")
    Image.new("RGBA", (30, 20)).save(tmp_path / "small.png")
    wide = D.open_image(tmp_path / "wide.png", max_pixels=10_000)
    assert wide.mode == "RGB" and wide.width * wide.height <= 10_000 and wide.size == (200, 50)
    assert D.open_image(tmp_path / "small.png", max_pixels=10_000).size == (30, 20)
    assert D.open_image(tmp_path / "wide.png", max_pixels=0).size == (400, 100)


def test_missing_image_is_one_line_error_naming_the_line_and_the_path(tmp_path, tiny_vlm, capsys, no_network):
    records = counting_records(tmp_path)
    records[1]["image"] = "images/lost.png"
    path = write_jsonl(tmp_path / "train.jsonl", records)
    capsys.readouterr()
    with pytest.raises(SystemExit) as failure:
        G.run_cli(D.main, ["--model", str(tiny_vlm), "--device", "cpu", "--data", str(path)])
    assert failure.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [f"error: {path}:2: image not found: {tmp_path / 'images' / 'lost.png'}"]


@pytest.mark.parametrize(
    "change, message",
    [
        ({"answer": "three"}, "'answer' must be a number"),
        ({"answer": True}, "'answer' must be a number"),
        ({"key_steps": [["0+1=1", 3]]}, "each key step"),
        ({"key_steps": "0+1=1"}, "'key_steps' must be a list"),
        ({"question": None}, "must be strings"),
    ],
)
def test_malformed_records_are_errors_naming_their_line(tmp_path, change, message):
    records = counting_records(tmp_path, [1, 2])
    records[1] |= change
    path = write_jsonl(tmp_path / "train.jsonl", records)
    with pytest.raises(ValueError, match=re.escape(f"{path}:2: ") + ".*" + re.escape(message)):
        D.read_jsonl(str(path))
    (tmp_path / "broken.jsonl").write_text(json.dumps(records[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'broken.jsonl'}:2: not JSON")):
        D.read_jsonl(str(tmp_path / "broken.jsonl"))


def test_held_out_split_is_the_end_of_the_training_file(tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", counting_records(tmp_path))
    flags = ["--data", str(path), "--prompts-per-step", "2", "--holdout-fraction", "0.34"]
    cfg, args = D.parse_args(flags)
    train_pool, eval_examples = D.load_splits(args, cfg)
    assert [e.answer for e in train_pool] == ["0", "1", "2", "3"]
    assert [e.answer for e in eval_examples] == ["1", "2"]
    cfg, args = D.parse_args([*flags, "--limit", "3", "--eval-data", str(path), "--eval-size", "4"])
    train_pool, eval_examples = D.load_splits(args, cfg)
    assert (len(train_pool), len(eval_examples)) == (3, 4)
    cfg, args = D.parse_args([*flags, "--prompts-per-step", "5"])
    with pytest.raises(ValueError, match="prompts-per-step"):
        D.load_splits(args, cfg)


# ------------------------------------------------------------------------------------------------
# rewards
# ------------------------------------------------------------------------------------------------
def test_format_reward_takes_exactly_one_number_decimals_allowed():
    answers = [
        "<answer>3</answer>",
        " <answer>2.5</answer>\n",
        "<answer>-4</answer>",
        "<answer>2.5 cm</answer>",
        "<answer>3</answer> done",
        "<answer>3",
        "3",
    ]
    example = G.Example("q", G.THINK_CLOSE, [], "3")
    n = len(answers)
    assert D.numeric_format(["p"] * n, ["t"] * n, answers, [example] * n) == [1, 1, 1, 0, 0, 0, 0]


def test_reward_flags_select_numeric_rewards_and_steprvr_is_refused():
    cfg = G.Config(reward="accuracy,format,steprar", reward_weights="1,0.5,2", step_alpha=0.1)
    (accuracy, w1), (fmt, w2), (steprar, w3) = D.vlm_reward_functions(cfg)
    assert (accuracy, fmt, (w1, w2, w3)) == (D.numeric_answer, D.numeric_format, (1.0, 0.5, 2.0))
    example = G.Example("q", G.THINK_CLOSE, [["0+1=1"], ["1+1=2"]], "2.5")
    scores = steprar(["p"], ["0+1=1 then</think>"], ["<answer>2.50</answer>"], [example])
    assert scores == [pytest.approx(1.05)]
    with pytest.raises(ValueError, match="steprvr"):
        D.vlm_reward_functions(G.Config(reward="accuracy,steprvr"))


def test_steprar_without_any_key_steps_is_refused():
    cfg = G.Config(reward="accuracy,steprar")
    without = [G.Example("q", G.THINK_CLOSE, [], "1")]
    with pytest.raises(ValueError, match="key_steps"):
        D.require_key_steps_for_steprar(cfg, without, "train.jsonl")
    D.require_key_steps_for_steprar(cfg, [*without, G.Example("q", G.THINK_CLOSE, [["1"]], "1")], "t")
    D.require_key_steps_for_steprar(G.Config(reward="accuracy"), without, "train.jsonl")


# ------------------------------------------------------------------------------------------------
# CLI
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, bounds",
    [
        ([], (0.04, 0.10)),
        (["--kl-pair", "counting"], (0.04, 0.10)),
        (["--kl-pair", "geometry"], (0.0, 0.02)),
        (["--kl-pair", "geometry", "--beta-max", "0.05"], (0.0, 0.05)),
        (["--beta-min", "0.01"], (0.01, 0.10)),
        (["--kl-pair", "geometry", "--beta-min", "0.001", "--beta-max", "0.3"], (0.001, 0.3)),
    ],
)
def test_kl_pair_sets_the_grpo_d_bounds_and_explicit_flags_win(flags, bounds):
    cfg, _ = D.parse_args(["--data", "d.jsonl", "--kl-schedule", "dynamic", *flags])
    assert (cfg.kl_schedule, (cfg.beta_min, cfg.beta_max)) == ("dynamic", bounds)


def test_help_lists_every_flag_with_a_help_string(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no flag split at its hyphen by line wrapping
    parser = D.build_parser()
    help_text = parser.format_help()
    listed = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", help_text))
    fields = dataclasses.fields(R.RunConfig)
    config_flags = {"--" + f.name.replace("_", "-") for f in fields}
    negations = {"--no-" + f.name.replace("_", "-") for f in fields if isinstance(f.default, bool)}
    demo_flags = {"--data", "--eval-data", "--limit", "--holdout-fraction", "--max-image-pixels", "--kl-pair"}
    assert config_flags | negations | demo_flags | {"--help", "--debug"} == listed
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.option_strings
    assert "None" not in help_text  # the GRPO-D bounds say where their default comes from


def test_cli_defaults_are_the_single_gpu_lora_recipe():
    cfg, args = D.parse_args(["--data", "d.jsonl"])
    assert (cfg.model, cfg.device, cfg.thoughts, cfg.answers) == ("Qwen/Qwen2.5-VL-3B-Instruct", "cuda", 4, 4)
    assert (cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lr) == (64, 128, 0.0, 1e-5)
    assert (cfg.prompts_per_step, cfg.micro_batch_tokens, cfg.warmup_steps) == (4, 4096, 0)
    assert (cfg.max_thought_tokens, cfg.max_answer_tokens, cfg.eval_size) == (256, 16, 100)
    assert (cfg.kl_schedule, cfg.beta, cfg.beta_min, cfg.beta_max) == ("constant", 0.04, 0.04, 0.10)
    assert (args.kl_pair, args.max_image_pixels, args.eval_data) == ("counting", 512 * 28 * 28, None)


def test_text_only_model_is_refused_before_any_image_is_read(tmp_path, no_network):
    folder = tmp_path / "text_model"
    tokenizer = G.build_char_tokenizer()
    G.build_embedded_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    missing = write_jsonl(tmp_path / "t.jsonl", [{"image": "none.png", "question": "q", "answer": 1}])
    with pytest.raises(ValueError, match="no vision tower"):
        D.main(["--model", str(folder), "--device", "cpu", "--data", str(missing)])
    with pytest.raises(ValueError, match="embedded"):
        D.main(["--model", G.EMBEDDED, "--device", "cpu", "--data", str(missing)])


# ------------------------------------------------------------------------------------------------
# the whole path
# ------------------------------------------------------------------------------------------------
def answer_length(prompts, thoughts, answers, examples):
    """A reward that varies from the first step (a tenth of the answer's length in characters): the random
    model scores 0 everywhere on accuracy, so without it the adapter could not move."""
    return [len(answer) / 10 for answer in answers]


def test_recipe_trains_only_the_lora_adapter_of_a_tiny_vlm_offline(
    tmp_path, tiny_vlm, monkeypatch, no_network
):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    real_rewards = D.vlm_reward_functions

    def varying_reward(cfg):
        real_rewards(cfg)  # rejects what it rejects
        return [(answer_length, 1.0)]

    monkeypatch.setattr(D, "vlm_reward_functions", varying_reward)
    real_add_lora = G.add_lora
    at_lora = {}

    def add_lora_recording_the_base(model, cfg):
        at_lora.update({name: tensor.clone() for name, tensor in model.state_dict().items()})
        return real_add_lora(model, cfg)

    monkeypatch.setattr(G, "add_lora", add_lora_recording_the_base)
    data = write_jsonl(tmp_path / "train.jsonl", counting_records(tmp_path))
    out = tmp_path / "run"
    tiny = ["--thoughts", "2", "--answers", "2", "--prompts-per-step", "2", "--steps", "2"]
    tiny += [
        "--warmup-steps",
        "2",
        "--warmup-batch",
        "2",
        "--max-thought-tokens",
        "8",
        "--max-answer-tokens",
        "4",
    ]
    summary = D.main(
        [
            *["--model", str(tiny_vlm), "--data", str(data), "--holdout-fraction", "0.34", "--device", "cpu"],
            *["--lora-rank", "4", *tiny, "--eval-size", "2", "--kl-schedule", "dynamic", "--out", str(out)],
        ]
    )
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert metrics[1]["reward_std"] > 0 and "reward/answer_length" in metrics[1]
    counting = G.Config(kl_schedule="dynamic", beta_min=0.04, beta_max=0.10)
    assert [m["beta"] for m in metrics[1:]] == [pytest.approx(G.kl_beta(s, 2, counting)) for s in (1, 2)]
    assert metrics[2]["beta"] == pytest.approx(0.10)  # GRPO-D ends at the counting pair's beta_max
    assert metrics[1]["kl"] == 0.0 and metrics[2]["kl"] > 0  # a fresh adapter is its reference, then moves

    trained = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    adapters = {name: tensor for name, tensor in trained.items() if "lora_" in name}
    assert adapters and any(tensor.abs().sum() > 0 for name, tensor in adapters.items() if "lora_B" in name)
    assert any("language_model" in name for name in adapters)
    assert not any("visual" in name for name in adapters)  # Qwen2-VL's vision MLP is fc1/fc2: not a target
    for name, tensor in trained.items():
        if name not in adapters:  # every base weight is still the one the adapter was added to
            plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
            assert torch.equal(tensor, at_lora[plain]), name

    base = AutoModelForImageTextToText.from_pretrained(tiny_vlm)
    loaded = PeftModel.from_pretrained(base, out / "final").state_dict()
    assert {name for name in loaded if "lora_" in name} == set(adapters)
    for name, tensor in adapters.items():
        assert torch.equal(loaded[name], tensor), name
    assert AutoProcessor.from_pretrained(out / "final").image_processor is not None
    assert summary == json.loads((out / "summary.json").read_text())
    assert (summary["config"], summary["device"]) == ("T2A2", "cpu")
