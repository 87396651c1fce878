"""The paper-figures pipeline on tiny settings: cache keys, warm start, tables, one end-to-end run in a tmp dir."""
import dataclasses
import json

import pytest

from grpo_ma import Config
from paper_figures import runs, tables, training

TINY = training.Plan("tiny", steps=1, eval_every=1, eval_size=2, ablation_seeds=(0,), compare_seeds=(0,),
                     base=(("warmup_steps", 2), ("warmup_batch", 4), ("prompts_per_step", 1),
                           ("max_thought_tokens", 8), ("max_answer_tokens", 4)))


# ------------------------------------------------------------------------------------------------
# cache keys
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [("lr", 1e-4), ("seed", 1), ("thoughts", 8), ("answer_pool", "thought"),
                                          ("reward", "steprar,format"), ("kl_schedule", "dynamic"), ("steps", 7)])
def test_cache_key_changes_when_a_result_field_changes(field, value):
    assert runs.cache_key(Config()) != runs.cache_key(dataclasses.replace(Config(), **{field: value}))


@pytest.mark.parametrize("field, value", [("out", "elsewhere"), ("resume", True), ("save_every", 3),
                                          ("device", "cpu")])
def test_cache_key_ignores_fields_that_cannot_change_results(field, value):
    assert runs.cache_key(Config()) == runs.cache_key(dataclasses.replace(Config(), **{field: value}))


def test_cache_key_names_the_warm_start_by_its_settings_not_its_path():
    start = runs.start_description(Config(seed=3))
    here, there = Config(model="/a/start_seed3", seed=3), Config(model="/b/start_seed3", seed=3)
    assert runs.cache_key(here, start=start) == runs.cache_key(there, start=start)
    other = runs.start_description(Config(seed=3, warmup_steps=10))
    assert runs.cache_key(here, start=start) != runs.cache_key(here, start=other)


def test_warm_start_folder_depends_on_warmup_settings_only(tmp_path):
    folder = runs.warm_start_folder(0, tmp_path, Config())
    assert folder == runs.warm_start_folder(0, tmp_path, Config(steps=5, lr=1.0, eval_size=3))
    assert folder != runs.warm_start_folder(0, tmp_path, Config(warmup_lr=1e-2))
    assert folder != runs.warm_start_folder(1, tmp_path, Config())


def test_the_default_t4a4_run_serves_every_group():
    keys = {spec.group: runs.cache_key(training.run_config(TINY, spec, "start"))
            for spec in training.specs(TINY) if spec.label in ("T4A4", "all K·M answers", "β = 0.04",
                                                                "accuracy + format", "GRPO-MA (T4A4)")}
    assert set(keys) == set(training.GROUPS) and len(set(keys.values())) == 1


# ------------------------------------------------------------------------------------------------
# tables
# ------------------------------------------------------------------------------------------------
def test_spread_reads_mean_and_min_max():
    assert tables.spread([0.5, 0.7, 0.6]) == "0.600 [0.500, 0.700]"
    assert tables.spread([0.25]) == "0.250"
    assert tables.spread([]) == "–"


def test_markdown_table_has_a_header_rule_and_one_line_per_row():
    text = tables.markdown_table(["a", "b"], [[1, 2], [3, 4]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |", "| 3 | 4 |"]


# ------------------------------------------------------------------------------------------------
# end to end, in a tmp dir
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper_figures")
    paths = {"out_dir": root / "out", "results_dir": root / "results", "cache_dir": root / "cache"}
    before = training.estimate_seconds(TINY, paths["cache_dir"], jobs=1)
    results = training.main(plan=TINY, jobs=1, **paths)
    return paths, results, before


def test_tiny_pipeline_writes_every_figure_and_results_file(tiny_run):
    paths, _, before = tiny_run
    assert before["warm_starts"] == 1 and before["runs"] > 0 and before["wall_seconds"] > 0
    for name in ("grad_spikes", "ta_ablation", "cost", "answer_pool", "kl_schedule", "rewards", "methods"):
        for ext in ("png", "pdf"):
            assert (paths["out_dir"] / f"{name}.{ext}").stat().st_size > 0
    saved = json.loads((paths["results_dir"] / "training.json").read_text())
    assert set(saved["groups"]) == set(training.GROUPS)
    assert saved["environment"]["torch"] and saved["environment"]["transformers"] and saved["environment"]["device"]
    assert (paths["results_dir"] / "training_runs.csv").read_text().count("\n") == 1 + sum(
        len(g["entries"]) for g in saved["groups"].values())


def test_a_rerun_finds_everything_in_the_cache(tiny_run):
    paths, _, _ = tiny_run
    assert training.pending_tasks(TINY, paths["cache_dir"]) == ([], [])


def test_warm_started_run_starts_where_a_plain_run_starts(tiny_run):
    check = tiny_run[1]["warm_start_check"]
    assert check["max_abs_weight_diff"] == 0
    assert check["plain_start_greedy_accuracy"] == check["saved_start_greedy_accuracy"]
    assert check["plain_start_greedy_accuracy"] == check["warm_started_train_start_greedy_accuracy"]


def test_tables_are_generated_from_the_results_file(tiny_run):
    paths, results, _ = tiny_run
    markdown = (paths["results_dir"] / "tables.md").read_text()
    assert markdown == tables.make_tables(json.loads((paths["results_dir"] / "training.json").read_text()))
    titles = ("Gradient spikes", "T×A ablation", "Cost", "Answer-advantage pool", "KL weight", "Rewards", "Methods")
    for title in titles:
        assert f"#### {title}" in markdown
    t16 = results["runs"][next(e["key"] for e in results["groups"]["ablation"]["entries"] if e["label"] == "T16A1")]
    assert f"| T16A1 | 16 | {t16['stats']['start_greedy_accuracy']:.3f} |" in markdown
