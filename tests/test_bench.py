"""paper_figures/bench.py in a tiny setting: a 2-layer Qwen2 with a 97-token vocabulary, lengths of a few
tokens, one repetition, measured in this process (the full bench measures each in a fresh child)."""

import json

import pytest
import torch

from paper_figures import bench as B

CONFIG_LABELS = {"T16A1", "T4A1", "T4A4", "T4A8", "T2A8"}
MEASUREMENT_FIELDS = {
    "seconds", "seconds_all", "cpu_seconds", "parameters", "vocab", "gradient_checkpointing",
    "forwarded_tokens", "lm_head_rows", "counted_tokens", "torch_threads", "loss", "grad_norm",
    "peak_rss_kib", "baseline_rss_kib", "peak_minus_baseline_kib", "rss_at_start_kib", "cuda_peak_bytes",
    "cuda_baseline_bytes", "cuda_peak_minus_baseline_bytes",
}  # fmt: skip
UPDATE_ROW_FIELDS = {
    "setting", "model", "config", "k", "m", "prompts", "lengths", "tree_micro_batch", "flat", "tree",
    "agreement", "tree_over_flat_seconds", "tree_over_flat_cpu_seconds",
}  # fmt: skip
WHOLE_ROW_FIELDS = {"config", "rollout_seconds", "train_seconds", "step_seconds", "step_cpu_seconds"}
AGREEMENT_FIELDS = {"logp_max_rel_diff", "loss_rel_diff", "grad_norm_rel_diff", "max_rel_diff", "ok"}

TINY_PLAN = B.Plan(
    name="tiny",
    settings=(
        B.Setting(
            name="tiny",
            model="tiny",
            prompt_len=3,
            thought_len=5,
            answer_len=3,
            prompts=2,
            runs=((16, 1, (0,)), (4, 1, (0,)), (4, 4, (0, 1)), (4, 8, (0,)), (2, 8, (1,))),
            flat=True,
            flat_checkpointing=True,
            warmup_reps=0,
            reps=1,
        ),
    ),
    sweep=B.Sweep("tiny", 3, 5, 3, (4, 4), (1, 2, 4, 8), (1, 2), 1, True),
    whole_step_warmup=2,
    whole_step_steps=1,
    whole_step_prompts=2,
)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """One tiny bench, in this process, written to a temporary results and figure folder."""
    folder = tmp_path_factory.mktemp("bench")
    block = B.run_bench(TINY_PLAN, "cpu", 1, cap_gib=8.0, command="test", isolate=False, quiet=True)
    B.write_results(block, "cpu", folder / "results", folder / "out")
    return folder, block


def test_flat_and_tree_losses_agree_for_every_configuration_and_micro_batch(written):
    _, block = written
    checks = [row["agreement"] for row in block["update"] + block["memory_sweep"] if row["agreement"]]
    assert len(checks) == 6 + len(TINY_PLAN.sweep.flat_prompts)
    for check in checks:
        assert check["ok"] and check["max_rel_diff"] < 1e-4, check
    assert block["agreement_ok"] is True


def test_agreement_flags_a_different_computation():
    flat = {"logps": [-1.0, -2.0], "loss": 0.5, "grad_norm": 1.0}
    assert B.agreement(flat, dict(flat), "cpu")["ok"]
    assert not B.agreement(flat, flat | {"logps": [-1.0, -2.1]}, "cpu")["ok"]
    assert not B.agreement(flat, flat | {"grad_norm": 1.1}, "cpu")["ok"]
    assert not B.agreement(flat, flat | {"logps": [-1.0]}, "cpu")["ok"]


def test_json_has_every_configuration_and_field(written):
    folder, _ = written
    results = json.loads((folder / "results" / "bench.json").read_text())
    assert results["devices"]["cuda"] is None  # no GPU measured: the GPU rows stay null
    block = results["devices"]["cpu"]
    assert {r["config"] for r in block["update"]} == CONFIG_LABELS
    for row in block["update"]:
        assert UPDATE_ROW_FIELDS <= row.keys()
        assert AGREEMENT_FIELDS <= row["agreement"].keys()
        for path in ("flat", "tree"):
            assert MEASUREMENT_FIELDS <= row[path].keys(), path
            assert "logps" not in row[path]
            assert row[path]["peak_rss_kib"] > 0 and row[path]["seconds"] > 0
    # one flat row per answer: every forwarded position goes through the LM head; the tree keeps fewer
    t4a8 = next(r for r in block["update"] if r["config"] == "T4A8" and r["tree_micro_batch"] == 0)
    assert t4a8["flat"]["lm_head_rows"] == t4a8["flat"]["forwarded_tokens"] == 2 * 4 * 8 * (3 + 5 + 3)
    assert t4a8["tree"]["forwarded_tokens"] < t4a8["flat"]["forwarded_tokens"]
    assert {r["config"] for r in block["whole_step"]["rows"]} == CONFIG_LABELS
    assert all(WHOLE_ROW_FIELDS <= r.keys() for r in block["whole_step"]["rows"])
    assert [r["prompts"] for r in block["memory_sweep"]] == [1, 2, 4, 8]
    assert len(block["formula"]) == 2 + 4  # every tree run at micro-batch 1: T4A4, T2A8 and the sweep
    for row in block["formula"]:
        assert row["total_bytes"] == sum(row["terms_bytes"].values())
        assert row["measured_over_formula"] > 0
    assert set(block["headline"]["targets"]) == {
        "embedded_update_t4a4_over_t16a1",
        "embedded_whole_step_t4a4_over_t16a1",
        "memory_growth_1_to_8_prompts_tree",
        "qwen05_t4a4_micro_batch_1_peak_bytes",
    }
    assert block["headline"]["values"]["memory_growth_1_to_8_prompts_tree"] > 0
    for key in ("cpu", "cpu_cores", "torch_threads", "torch", "transformers", "device"):
        assert block["machine"][key] is not None


def test_markdown_and_figure_are_written(written):
    folder, _ = written
    text = (folder / "results" / "bench.md").read_text()
    assert "No GPU measured" in text and "## GPU" in text
    for heading in ("1. Update cost", "2. Whole step", "3. Peak update memory", "4. Memory formula"):
        assert heading in text
    for config in CONFIG_LABELS:
        assert f"| {config} |" in text
    assert "ru_maxrss" in text and "gradient checkpointing" in text
    for ext in ("png", "pdf"):
        assert (folder / "out" / f"bench.{ext}").stat().st_size > 0


def test_a_cuda_block_is_kept_when_the_cpu_block_is_rewritten(written, tmp_path):
    _, block = written
    B.write_results(block | {"command": "cuda run"}, "cuda", tmp_path / "results", tmp_path / "out")
    B.write_results(block, "cpu", tmp_path / "results", tmp_path / "out")
    results = json.loads((tmp_path / "results" / "bench.json").read_text())
    assert results["devices"]["cuda"]["command"] == "cuda run"
    assert "No GPU measured" not in (tmp_path / "results" / "bench.md").read_text()
    (tmp_path / "results" / "bench.md").unlink()
    B.redraw("cuda", tmp_path / "results", tmp_path / "out")  # nothing measured: md and figure from the json
    assert "## GPU" in (tmp_path / "results" / "bench.md").read_text()


def test_a_child_process_measures_what_this_process_measures():
    spec = B.update_spec("tiny", (3, 5, 3), 4, 4, 2, "tree", 1, checkpointing=False, warmup_reps=0, reps=1)
    spec |= {"device": "cpu", "threads": 1}
    child = B.run_isolated(spec, cap_kib=4 * 1024**2, timeout_s=300)
    here = B.run_isolated(spec, cap_kib=None, timeout_s=300, isolate=False)
    assert "error" not in child, child.get("error")
    assert child["loss"] == pytest.approx(here["loss"], rel=1e-6)
    torch.testing.assert_close(torch.tensor(child["logps"]), torch.tensor(here["logps"]))
    assert child["peak_reset"] and child["peak_rss_kib"] >= child["baseline_rss_kib"] > 0


def test_a_child_past_the_memory_cap_is_stopped():
    spec = B.update_spec("tiny", (3, 5, 3), 4, 4, 1, "tree", 1, checkpointing=False, warmup_reps=0, reps=1)
    result = B.run_isolated(spec | {"device": "cpu", "threads": 1}, cap_kib=1024, timeout_s=300)
    assert result["error"].startswith("killed: resident size")
