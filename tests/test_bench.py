"""paper_figures/bench.py at its tiny plan on the CPU: every setting and section, measured in this process
(the bench measures each in a fresh child process; one test runs a child). Speed and memory are recorded,
never asserted: these tests check what is measured and written, not how fast."""

import json

import pytest
import torch
from conftest import compiled_with

from demos import gsm8k_qwen, vlm_qwen
from paper_figures import bench as B
from paper_figures import rollout_bench as RB

ROW_FIELDS = {
    "name", "section", "config", "model", "text_layers", "vocab", "parameters", "trainable_parameters",
    "prompts_per_step", "max_thought_tokens", "max_answer_tokens", "micro_batch_tokens", "lora_rank",
    "image_pixels", "rollout_seconds", "update_seconds", "first_step_extra_seconds", "generate_steps",
    "decode_ms_per_step", "tokens_generated", "micro_batches", "peak_bytes", "update_peak_bytes",
    "compiled_decode", "graphs_compiled_in_second_step", "cudagraph_skips",
}  # fmt: skip
WHOLE_STEP_NAMES = [
    "embedded default T4A4", "0.5B GSM8K T16A1", "0.5B GSM8K T4A4", "VL-3B LoRA T4A4", "VL-3B LoRA T16A1",
]  # fmt: skip


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One tiny bench with its learning run, in this process, written to a temporary results folder."""
    folder = tmp_path_factory.mktemp("bench")
    torch.set_num_threads(1)
    block = B.run_bench("tiny", "cpu", threads=1, learn=True, isolate=False)
    B.write_results(block, "cpu", folder)
    return folder, block


def rows_of(block: dict, section: str) -> list[dict]:
    return [row for row in block["settings"] if row["section"] == section]


def test_every_setting_is_a_measured_whole_step(written):
    _, block = written
    assert [row["name"] for row in rows_of(block, "whole step")] == WHOLE_STEP_NAMES
    assert len(block["settings"]) == 5 + 2 + 3
    for row in block["settings"]:
        assert "error" not in row, row
        assert ROW_FIELDS <= row.keys(), ROW_FIELDS - row.keys()
        assert row["rollout_seconds"] > 0 and row["update_seconds"] > 0 and row["micro_batches"] >= 1
        close = 1  # </think> is one token; at M = 1 it is a decode step of the one call
        assert 0 < row["generate_steps"] <= row["max_thought_tokens"] + close + row["max_answer_tokens"]
        assert row["decode_ms_per_step"] == pytest.approx(
            1000 * row["rollout_seconds"] / row["generate_steps"]
        )
        assert row["tokens_generated"] >= row["generate_steps"]
        assert row["peak_bytes"] >= row["update_peak_bytes"] > 0


def test_the_shapes_are_the_ones_asked_for(written):
    _, block = written
    rows = {row["name"]: row for row in block["settings"]}
    assert rows["embedded default T4A4"]["model"] == "embedded"
    for name in WHOLE_STEP_NAMES[1:]:
        assert rows[name]["vocab"] == B.TINY_TEXT["vocab_size"] and rows[name]["text_layers"] == 2
    for name in ("VL-3B LoRA T4A4", "VL-3B LoRA T16A1"):
        assert rows[name]["image_pixels"] == 56
        assert rows[name]["lora_rank"] == vlm_qwen.GPU_DEFAULTS["lora_rank"]
        assert 0 < rows[name]["trainable_parameters"] < rows[name]["parameters"]  # LoRA: only the adapters
    assert rows["0.5B GSM8K T16A1"]["trainable_parameters"] == rows["0.5B GSM8K T16A1"]["parameters"]
    assert rows["0.5B GSM8K T16A1"]["config"] == "T16A1" and rows["0.5B GSM8K T4A4"]["config"] == "T4A4"


def test_a_cpu_run_decodes_as_grpo_ma_does_on_a_cpu_without_compiling(written):
    _, block = written
    for row in block["settings"]:
        assert not row["compiled_decode"] and row["graphs_compiled_in_second_step"] == 0, row["name"]
    assert "| off |" in B.render_markdown({"devices": {"cpu": block}})


@pytest.mark.parametrize("name", ["0.5B GSM8K T4A4", "VL-3B LoRA T4A4"])
def test_with_compiled_decoding_the_recipe_shapes_decode_compiled_and_step_2_compiles_nothing(
    name, monkeypatch
):
    """What --device cuda measures (compile_decode auto is on there), on the CPU with compile_decode on and
    the eager backend: the recipe shapes decode on the run's static caches (the LoRA one from its folded
    copy, rewritten in place after the first update), and the second step compiles no graph."""
    compiled_with("eager", monkeypatch)
    torch.set_num_threads(1)
    setting = next(setting for setting in B.plan_settings("tiny") if setting.name == name)
    setting = B.dataclasses.replace(setting, config=setting.config | {"compile_decode": "on"})
    row = B.measure_setting(setting, "cpu")
    assert row["compiled_decode"] and row["graphs_compiled_in_second_step"] == 0
    assert row["generate_steps"] > 2


def test_the_gpu_plan_runs_the_recipes_defaults_at_full_shapes():
    settings = {setting.name: setting for setting in B.plan_settings("gpu")}
    assert list(settings) == WHOLE_STEP_NAMES  # no CPU figures on the GPU plan
    assert settings["embedded default T4A4"].config == {}  # grpo_ma.Config() as it is
    for name, recipe, k, m in (
        ("0.5B GSM8K T16A1", gsm8k_qwen.GPU_DEFAULTS, 16, 1),
        ("VL-3B LoRA T4A4", vlm_qwen.GPU_DEFAULTS, 4, 4),
    ):
        config = settings[name].config
        assert (config["thoughts"], config["answers"]) == (k, m)
        assert {"prompts_per_step", "max_thought_tokens", "max_answer_tokens", "lr"} <= config.keys()
        shared = config.keys() & recipe.keys()
        assert {key: config[key] for key in shared} == {key: recipe[key] for key in shared}, name
    assert settings["VL-3B LoRA T4A4"].config["lora_rank"] == vlm_qwen.GPU_DEFAULTS["lora_rank"] > 0
    gpu = B.SCALES["gpu"]  # the recipes' shapes, unchanged
    assert gpu.text == gpu.vision == gpu.budgets == {} and gpu.image_pixels == 448 and gpu.figures is None


def test_forward_passes_fall_as_the_token_budget_grows(written):
    _, block = written
    rows = rows_of(block, "passes")
    budgets = [row["micro_batch_tokens"] for row in rows]
    passes = [row["micro_batches"] for row in rows]
    assert budgets == sorted(budgets) and len(budgets) >= 3
    assert passes == sorted(passes, reverse=True) and passes[0] > passes[-1]
    assert passes[0] == rows[0]["prompts_per_step"] * 4  # a budget of 1 token: one thought per pass
    assert passes[-1] == 1


def test_the_memory_figure_compares_1_and_8_prompts_at_one_budget(written):
    _, block = written
    one, eight = rows_of(block, "memory")
    assert (one["prompts_per_step"], eight["prompts_per_step"]) == (1, 8)
    assert one["micro_batch_tokens"] == eight["micro_batch_tokens"]
    assert eight["micro_batches"] > one["micro_batches"]
    growth = eight["update_peak_bytes"] / one["update_peak_bytes"]
    assert block["memory_growth_1_to_8_prompts"] == pytest.approx(growth)


def test_the_learning_run_reports_accuracy_before_and_after(written):
    _, block = written
    learning = block["learning"]
    assert learning["steps"] == 2 and learning["warmup_steps"] == 2
    for key in ("start_greedy_accuracy", "final_greedy_accuracy"):
        assert 0 <= learning[key] <= 1
    assert learning["learned"] == (learning["final_greedy_accuracy"] > learning["start_greedy_accuracy"])


def test_a_cpu_run_writes_no_cuda_block(written):
    folder, _ = written
    results = json.loads((folder / "bench.json").read_text())
    assert set(results["devices"]) == {"cpu"}
    measured = {"rollout_seconds", "update_seconds", "first_step_extra_seconds", "generate_steps"}
    measured |= {"decode_ms_per_step", "tokens_generated", "micro_batches", "peak_bytes", "update_peak_bytes"}
    measured |= {"compiled_decode", "graphs_compiled_in_second_step", "cudagraph_skips"}
    assert measured <= set(results["about"])  # every measured field is defined
    text = (folder / "bench.md").read_text()
    assert "cuda: not measured" in text
    for name in WHOLE_STEP_NAMES:
        assert f"| cpu | {name} |" in text


def test_rewriting_one_device_keeps_the_other(written, tmp_path):
    _, block = written
    cuda_block = block | {"plan": "gpu", "machine": block["machine"] | {"device": "a GPU"}}
    B.write_results(cuda_block, "cuda", tmp_path)
    B.write_results(block, "cpu", tmp_path)
    results = json.loads((tmp_path / "bench.json").read_text())
    assert results["devices"]["cuda"] == json.loads(json.dumps(cuda_block))
    assert results["devices"]["cpu"]["plan"] == "tiny"
    text = (tmp_path / "bench.md").read_text()
    assert "| cuda | VL-3B LoRA T16A1 |" in text and "not measured" not in text


def test_render_rebuilds_the_markdown_from_the_json_alone(written, tmp_path):
    folder, _ = written
    (tmp_path / "bench.json").write_text((folder / "bench.json").read_text())
    B.main(["--render", "--results-dir", str(tmp_path)])
    assert (tmp_path / "bench.md").read_text() == (folder / "bench.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_is_refused_without_a_gpu(tmp_path):
    with pytest.raises(SystemExit, match="no CUDA device"):
        B.main(["--device", "cuda", "--results-dir", str(tmp_path)])
    assert not (tmp_path / "bench.json").exists()  # a CUDA block is never written without a GPU


def test_a_child_process_measures_one_setting():
    setting = B.plan_settings("tiny")[1]
    spec = dict(kind="setting", setting=B.dataclasses.asdict(setting), device="cpu", threads=1)
    row = B.measure_in_child(spec)
    assert "error" not in row, row.get("error")
    assert row["name"] == setting.name and row["peak_bytes"] >= row["update_peak_bytes"] > 0


def test_a_failing_child_reports_its_error():
    setting = B.Setting("broken", "qwen2.5-0.5b", {"no_such_field": 1}, "tiny")
    spec = dict(kind="setting", setting=B.dataclasses.asdict(setting), device="cpu", threads=1)
    assert "no_such_field" in B.measure_in_child(spec)["error"]


# ------------------------------------------------------------------------------------------------
# paper_figures/rollout_bench.py: the rollout at M = 1 against one plain generate()
# ------------------------------------------------------------------------------------------------
def test_the_rollout_bench_times_both_rollouts_on_each_decoding_path(tmp_path, monkeypatch):
    """A tiny run with compiled decoding on (the eager backend): a dynamic and a compiled row, each with the
    tree's and the plain call's seconds, tokens and generate() steps, and ratios computed from them; the file
    keeps another device's block."""
    compiled_with("eager", monkeypatch)
    (tmp_path / "rollout_bench.json").write_text(json.dumps({"devices": {"cuda": {"kept": True}}}))
    flags = ["--results-dir", str(tmp_path), "--prompts", "2", "--thoughts", "3", "--rounds", "2"]
    block = RB.main(flags + ["--warmup-steps", "5", "--compile-decode", "on"])
    assert [row["path"] for row in block["paths"]] == ["dynamic", "compiled"]
    for row in block["paths"]:
        assert row["tree_seconds"] > 0 and row["plain_seconds"] > 0
        assert row["tree_over_plain"] == pytest.approx(row["tree_seconds"] / row["plain_seconds"])
        assert row["tree_tokens"] >= row["tree_steps"] > 0 and row["plain_tokens"] >= row["plain_steps"] > 0
    written = json.loads((tmp_path / "rollout_bench.json").read_text())
    assert written["devices"]["cuda"] == {"kept": True} and written["devices"]["cpu"] == block
    assert set(block["paths"][0]) - {"path"} <= set(written["about"])
