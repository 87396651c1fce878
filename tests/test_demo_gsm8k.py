"""Tests of demos/gsm8k_qwen.py on CPU, offline: GSM8K parsing, the numeric reward, the CLI, and the whole
path (JSONL -> Examples -> grpo_ma.train) through a small Qwen2 saved to disk with a chat template."""

import dataclasses
import json
import re
import sys

import pytest
import torch

import grpo_ma as G
import grpo_ma_run as R
from demos import gsm8k_qwen as D

TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | lower }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
# only characters the char tokenizer knows, except in what the demo never tokenizes (calculator notes, ####)
RECORDS = [
    {
        "question": "tom has 3 apples and buys 4 more. how many apples does he have?",
        "answer": "he has 3+4=<<3+4=7>>7 apples.\n#### 7",
    },
    {
        "question": "a box holds 12 pens. how many pens are in 3 boxes?",
        "answer": "3 boxes hold 12*3=<<12*3=36>>36 pens.\n#### 36",
    },
    {
        "question": "ann had 20 coins and spent 8. how many are left?",
        "answer": "20-8=<<20-8=12>>12 coins are left.\n#### 12",
    },
    {
        "question": "a farm has 1000 cows and buys 234 more. how many cows now?",
        "answer": "1000+234=<<1000+234=1234>>1234 cows.\n#### 1,234",
    },
    {
        "question": "each of 5 kids has 6 cards. how many cards in all?",
        "answer": "5*6=<<5*6=30>>30 cards.\n#### 30",
    },
    {
        "question": "bob reads 9 pages a day for 2 days. how many pages?",
        "answer": "9*2=<<9*2=18>>18 pages.\n#### 18",
    },
    {
        "question": "a shop sold 15 cakes and 7 pies. how many items?",
        "answer": "15+7=<<15+7=22>>22 items.\n#### 22",
    },
    {
        "question": "sam had 50 and paid 21. how much is left?",
        "answer": "50-21=<<50-21=29>>29 is left.\n#### 29.00",
    },
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def local_qwen(tmp_path_factory):
    """A small Qwen2 and a char tokenizer with a chat template, saved like a hub checkpoint."""
    folder = tmp_path_factory.mktemp("tiny_qwen")
    tokenizer = G.build_char_tokenizer()
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    torch.manual_seed(0)
    model = G.build_embedded_model(tokenizer)
    model.config.max_position_embeddings = 512  # the chat prompt is ~200 characters
    tokenizer.save_pretrained(folder)
    model.save_pretrained(folder)
    return folder


# ------------------------------------------------------------------------------------------------
# GSM8K parsing and the numeric reward
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, number",
    [
        ("1,234", "1234"),
        (" $1,234.50 ", "1234.5"),
        ("72.0", "72"),
        ("72.", "72"),
        ("-3", "-3"),
        ("-0.0", "0"),
        ("0.10", "0.1"),
        ("100", "100"),
        ("seven", None),
        ("", None),
    ],
)
def test_normalize_number_gives_one_spelling_per_number(text, number):
    assert D.normalize_number(text) == number


def test_gsm8k_answer_splits_into_rationale_and_normalized_number():
    assert D.split_gsm8k_answer("1000+234=<<1000+234=1234>>1234 cows.\n#### 1,234") == (
        "1000+234=<<1000+234=1234>>1234 cows.",
        "1234",
    )
    with pytest.raises(ValueError, match="####"):
        D.split_gsm8k_answer("no final answer here")


def test_example_thought_drops_calculator_notes_and_key_steps_come_from_them():
    example = D.to_example(
        {"question": " q? ", "answer": "a 48/2 = <<48/2=24>>24, b 24*2=<<24*2=48>>48.\n#### 72"}
    )
    assert example == G.Example("q?", "a 48/2 = 24, b 24*2=48.</think>", example.key_steps, "72")
    assert "48/2=24" in example.key_steps[0] and "48 / 2 = 24" in example.key_steps[0]
    assert {"24*2=48", "24 x 2 = 48", "24×2=48"} <= set(example.key_steps[1])
    assert (
        D.to_example({"question": "q", "answer": "<<1+1=2>>2\n#### 2"}, use_key_steps=False).key_steps == []
    )


def test_numeric_reward_reads_the_number_in_the_answer_block():
    example = G.Example("q", "t</think>", [], "1234")
    answers = [
        "<answer>1,234</answer>",
        "\n<answer>$1234.00</answer>",
        "<answer>1235</answer>",
        "1234",
        "<answer>the total is 1234",
        "<answer>12.34</answer>",
        "<answer></answer>",
    ]
    scores = D.numeric_answer(["p"] * len(answers), ["t"] * len(answers), answers, [example] * len(answers))
    assert scores == [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]


def test_reward_flags_select_numeric_format_and_steprar_with_weights():
    cfg = G.Config(reward="accuracy,format,steprar", reward_weights="1,0.5,2", step_alpha=0.1)
    (accuracy, w1), (fmt, w2), (steprar, w3) = D.gsm8k_reward_functions(cfg)
    assert (accuracy, fmt, (w1, w2, w3)) == (D.numeric_answer, G.format_reward, (1.0, 0.5, 2.0))
    example = G.Example("q", "t", [["3+4=7"], ["7*2=14"]], "14")
    assert steprar(["p"], ["so 3+4=7 then</think>"], ["<answer>14</answer>"], [example]) == [
        pytest.approx(1.05)
    ]
    with pytest.raises(ValueError, match="steprvr"):
        D.gsm8k_reward_functions(G.Config(reward="accuracy,steprvr"))
    with pytest.raises(ValueError, match="weights"):
        D.gsm8k_reward_functions(G.Config(reward="accuracy,format", reward_weights="1"))


# ------------------------------------------------------------------------------------------------
# data splits, CLI, memory estimate
# ------------------------------------------------------------------------------------------------
def test_held_out_split_is_the_end_of_the_training_file(tmp_path):
    cfg, args = D.parse_args(
        [
            "--data",
            str(write_jsonl(tmp_path / "t.jsonl", RECORDS)),
            "--holdout-fraction",
            "0.25",
            "--prompts-per-step",
            "2",
        ]
    )
    train_pool, eval_examples = D.load_splits(args, cfg)
    assert [e.answer for e in train_pool] == ["7", "36", "12", "1234", "30", "18"]
    assert [e.answer for e in eval_examples] == ["22", "29"]
    cfg, args = D.parse_args(
        [
            "--data",
            str(tmp_path / "t.jsonl"),
            "--limit",
            "4",
            "--eval-data",
            str(tmp_path / "t.jsonl"),
            "--eval-size",
            "3",
            "--prompts-per-step",
            "2",
        ]
    )
    train_pool, eval_examples = D.load_splits(args, cfg)
    assert (len(train_pool), len(eval_examples)) == (4, 3)


def test_too_few_examples_for_a_step_is_an_error(tmp_path):
    cfg, args = D.parse_args(
        ["--data", str(write_jsonl(tmp_path / "t.jsonl", RECORDS)), "--prompts-per-step", "8"]
    )
    with pytest.raises(ValueError, match="prompts-per-step"):
        D.load_splits(args, cfg)


def test_without_data_or_datasets_library_the_error_says_what_to_do(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    cfg, args = D.parse_args([])
    with pytest.raises(SystemExit, match="--data"):
        D.load_splits(args, cfg)


def test_help_lists_every_flag_with_a_help_string():
    parser = D.build_parser()
    help_text = parser.format_help()
    listed = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", help_text))
    fields = dataclasses.fields(R.RunConfig)
    config_flags = {"--" + f.name.replace("_", "-") for f in fields}
    negations = {"--no-" + f.name.replace("_", "-") for f in fields if isinstance(f.default, bool)}
    demo_flags = {
        "--data",
        "--eval-data",
        "--limit",
        "--holdout-fraction",
        "--key-steps",
        "--no-key-steps",
        "--hub-dataset",
        "--hub-config",
    }
    assert config_flags | negations | demo_flags | {"--help", "--debug"} == listed
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.option_strings


def test_cli_defaults_are_the_single_gpu_recipe():
    cfg, args = D.parse_args([])
    assert (cfg.model, cfg.thoughts, cfg.answers, cfg.warmup_steps, cfg.beta) == (
        "Qwen/Qwen2.5-0.5B-Instruct",
        4,
        4,
        0,
        0.04,
    )
    assert cfg.lr == 1e-6 and (cfg.prompts_per_step, cfg.micro_batch_tokens) == (8, 4096)
    assert (cfg.max_thought_tokens, cfg.max_answer_tokens) == (384, 32)
    assert args.data is None
    cfg, _ = D.parse_args(["--micro-batch-tokens", "512", "--thoughts", "16", "--answers", "1"])
    assert (cfg.micro_batch_tokens, cfg.thoughts, cfg.answers) == (512, 16, 1)


# ------------------------------------------------------------------------------------------------
# the whole path
# ------------------------------------------------------------------------------------------------
def test_demo_trains_a_local_qwen_on_gsm8k_jsonl_offline(tmp_path, local_qwen, no_network):
    data = write_jsonl(tmp_path / "train.jsonl", RECORDS)
    out = tmp_path / "run"
    summary = D.main(
        [
            "--model",
            str(local_qwen),
            "--data",
            str(data),
            "--holdout-fraction",
            "0.25",
            "--steps",
            "1",
            "--thoughts",
            "2",
            "--answers",
            "2",
            "--prompts-per-step",
            "2",
            "--max-thought-tokens",
            "8",
            "--max-answer-tokens",
            "4",
            "--warmup-steps",
            "1",
            "--warmup-batch",
            "2",
            "--eval-size",
            "2",
            "--reward",
            "accuracy,format,steprar",
            "--device",
            "cpu",
            "--out",
            str(out),
        ]
    )
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1]
    assert set(G.METRIC_KEYS) | {"reward/numeric_answer", "reward/format_reward", "reward/steprar"} == set(
        metrics[1]
    )
    assert metrics[1]["tokens_generated"] > 0 and metrics[1]["eval_greedy_accuracy"] is not None
    assert json.loads((out / "config.json").read_text())["model"] == str(local_qwen)
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["config"] == "T2A2" and summary["device"] == "cpu"


# ------------------------------------------------------------------------------------------------
# why float32 master weights
# ------------------------------------------------------------------------------------------------
def test_bfloat16_adamw_rounds_away_most_updates_at_lr_1e_6():
    """Why grpo_ma keeps float32 master weights: an AdamW step of ~1e-6 is below the bfloat16 spacing of
    typical weights."""
    torch.manual_seed(0)
    changed = {}
    for dtype in (torch.bfloat16, torch.float32):
        weights = torch.nn.Parameter((torch.randn(20_000) * 0.02).to(dtype))
        start = weights.detach().clone()
        optimizer = torch.optim.AdamW([weights], lr=1e-6, weight_decay=0.0)
        for _ in range(5):
            weights.grad = torch.randn_like(weights)
            optimizer.step()
        changed[dtype] = (weights.detach() != start).float().mean().item()
    assert changed[torch.bfloat16] < 0.1 and changed[torch.float32] > 0.99
