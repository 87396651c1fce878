"""The paper-figures pipeline on tiny settings: cache keys, warm start, tables, the README's generated blocks,
the shared flags, and one end-to-end run in a tmp dir."""

import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import grpo_ma
from grpo_ma_run import RunConfig as Config  # every grpo_ma.Config field, and the run's
from paper_figures import __main__ as pipeline
from paper_figures import (
    common,
    default_runs,
    planner,
    plot_run,
    rollout_bench,
    runs,
    tables,
    training,
    variance,
)

REPO = Path(__file__).resolve().parents[1]

TINY = training.Plan(
    "tiny",
    steps=1,
    eval_every=1,
    eval_size=2,
    ablation_seeds=(0,),
    compare_seeds=(0,),
    base=(
        ("warmup_steps", 2),
        ("warmup_batch", 4),
        ("prompts_per_step", 1),
        ("max_thought_tokens", 8),
        ("max_answer_tokens", 4),
    ),
)


# ------------------------------------------------------------------------------------------------
# cache keys
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "field, value",
    [
        ("lr", 1e-4),
        ("seed", 1),
        ("thoughts", 8),
        ("answer_pool", "thought"),
        ("reward", "steprar,format"),
        ("kl_schedule", "dynamic"),
        ("steps", 7),
    ],
)
def test_cache_key_changes_when_a_result_field_changes(field, value):
    assert runs.cache_key(Config()) != runs.cache_key(dataclasses.replace(Config(), **{field: value}))


@pytest.mark.parametrize(
    "field, value", [("out", "elsewhere"), ("resume", True), ("save_every", 3), ("device", "cpu")]
)
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
    keys = {
        spec.group: runs.cache_key(training.run_config(TINY, spec, "start"))
        for spec in training.specs(TINY)
        if spec.label in ("T4A4", "all K·M answers", "β = 0.04", "accuracy + format", "GRPO-MA (T4A4)")
    }
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


def test_noise_verdict_calls_a_difference_inside_the_interval_a_tie():
    assert "noise" in tables.noise_verdict(0.040, 0.069)
    assert "noise" in tables.noise_verdict(-0.040, 0.069)
    assert "larger than the ±0.069 interval" in tables.noise_verdict(0.1, 0.069)


def test_wall_seconds_reads_summaries_of_the_current_and_earlier_trainer():
    assert tables.wall_seconds({"wall_seconds": 12.5}) == 12.5
    assert tables.wall_seconds({"wall_seconds_this_run": 7.0}) == 7.0


def test_fill_readme_rewrites_the_blocks_and_leaves_the_text_around_them():
    begin = tables.BEGIN.format(name="a")
    end = tables.END.format(name="a")
    text = f"hand-written 0.5\n{begin}\nold | table\n{end}\nmore text\n"
    filled = tables.fill_readme(text, {"a": "new | table"})
    assert filled == f"hand-written 0.5\n{begin}\nnew | table\n{end}\nmore text\n"
    with pytest.raises(KeyError, match="'a'"):
        tables.fill_readme(text, {})


# ------------------------------------------------------------------------------------------------
# the committed README and results
# ------------------------------------------------------------------------------------------------
def test_readme_blocks_equal_what_tables_makes_from_the_committed_results():
    results = common.PACKAGE_DIR / "results"
    readme = common.README.read_text()
    assert set(tables.blocks_of(readme)) == set(tables.readme_blocks(results))
    assert tables.update(results, common.README, check=True) == [], "run `python -m paper_figures.tables`"


def test_readme_links_every_committed_figure_and_only_existing_ones():
    readme = common.README.read_text()
    linked = set(re.findall(r"\(out/([\w-]+\.png)\)", readme))
    committed = {p.name for p in (common.PACKAGE_DIR / "out").glob("*.png")}
    assert linked == committed


def test_embedded_model_has_the_parameter_count_the_scripts_state():
    model, _, _ = grpo_ma.load_policy(Config(), torch.device("cpu"))
    count = sum(p.numel() for p in model.parameters())
    assert count == common.EMBEDDED_PARAMETERS
    assert common.EMBEDDED_SIZE == f"{count / 1e6:.1f}M"


def test_every_mention_of_the_embedded_models_size_is_the_same():
    files = [
        *sorted((REPO / "paper_figures").glob("*.py")),
        common.README,
        REPO / "README.md",
        REPO / "grpo_ma.py",
    ]
    sizes = {f.name: re.findall(r"(\d+\.\d+)M[- ]param", f.read_text()) for f in files if f.exists()}
    assert {size for found in sizes.values() for size in found} <= {common.EMBEDDED_SIZE[:-1]}, sizes


SCRIPTS = {
    "paper_figures": pipeline.parse_args,
    "paper_figures.training": training.cli,
    "paper_figures.variance": variance.cli,
    "paper_figures.default_runs": default_runs.main,
    "paper_figures.tables": tables.main,
    "paper_figures.plot_run": plot_run.main,
    "paper_figures.planner": planner.main,
    "paper_figures.rollout_bench": rollout_bench.parse_args,
}


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_every_scripts_help_comes_from_the_shared_parser_and_states_the_model_size(script, capsys):
    with pytest.raises(SystemExit) as done:
        SCRIPTS[script](["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert text.startswith(f"usage: python -m {script} ")
    assert set(re.findall(r"(\d+\.\d+M)[- ]param", text)) <= {common.EMBEDDED_SIZE}
    if "--threads" in text:
        assert f"{common.EMBEDDED_SIZE}-parameter embedded model" in text


def test_common_flags_are_defined_only_in_common_py():
    for path in sorted((REPO / "paper_figures").glob("*.py")):
        if path.name != "common.py":
            source = path.read_text()
            defined = re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", source)
            assert [flag for flag, _ in common.FLAGS.values() if flag in defined] == [], path.name


def test_the_shared_parser_refuses_a_flag_it_does_not_define():
    with pytest.raises(ValueError, match="unknown common flags"):
        common.parser("x", None, "fast", "no_such_flag")
    args = pipeline.parse_args(["--fast", "--out-dir", "o", "--jobs", "3"])
    assert (args.fast, args.out_dir, args.jobs, args.results_dir) == (True, "o", 3, common.RESULTS_DIR)


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
    assert (
        saved["environment"]["torch"]
        and saved["environment"]["transformers"]
        and saved["environment"]["device"]
    )
    assert (paths["results_dir"] / "training_runs.csv").read_text().count("\n") == 1 + sum(
        len(g["entries"]) for g in saved["groups"].values()
    )


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
    titles = (
        "Gradient spikes",
        "T×A ablation",
        "Cost",
        "Answer-advantage pool",
        "KL weight",
        "Rewards",
        "Methods",
    )
    for title in titles:
        assert f"#### {title}" in markdown
    t16 = results["runs"][
        next(e["key"] for e in results["groups"]["ablation"]["entries"] if e["label"] == "T16A1")
    ]
    assert f"| T16A1 | 16 | {t16['stats']['start_greedy_accuracy']:.3f} |" in markdown


def test_tiny_results_make_every_training_block_of_the_readme(tiny_run):
    paths, _, _ = tiny_run
    blocks = tables.readme_blocks(paths["results_dir"])
    assert set(tables.TRAINING_BLOCKS) | {"setting", "times"} <= set(blocks)


def test_plot_run_draws_a_metrics_file_that_grpo_ma_train_wrote(tiny_run):
    paths, _, _ = tiny_run
    folder = next((paths["cache_dir"] / "runs").glob("*/metrics.jsonl")).parent
    assert plot_run.main([str(folder), "--output", str(paths["out_dir"] / "curves.png")]) == 0
    assert (paths["out_dir"] / "curves.png").stat().st_size > 0


# ------------------------------------------------------------------------------------------------
# the planner sweep (paper_figures/planner.py): its pieces on synthetic numbers
# ------------------------------------------------------------------------------------------------
def test_planner_variance_components_recover_a_two_level_design():
    """Thought values with variance 1/12 (Beta(1, 1)) and Bernoulli answers (E[sigma^2] = 1/6): the
    decomposition subtracts the answer noise from the spread of the thought values."""
    rng = np.random.default_rng(0)
    mu = rng.random((4000, 4))
    rewards = (rng.random((4000, 4, 8)) < mu[..., None]).astype(float)
    parts = planner.variance_components(rewards)
    assert abs(parts["between_var"] - 1 / 12) < 0.004
    assert abs(parts["mean_within_var"] - 1 / 6) < 0.003
    assert abs(parts["ratio"] - 2) < 0.15


def test_planner_repeat_shares_count_pairs_of_identical_texts():
    tree = SimpleNamespace(
        thoughts=[["a", "a", "b"]],
        answers=[[["x", "x", "y"], ["u", "v", "w"], ["z", "z", "z"]]],
    )
    rewards = np.array([[[1, 1, 0], [0, 0, 1], [0, 0, 0]]])
    shares = planner.repeat_shares(tree, rewards)
    assert shares == {"thought": 1 / 3, "right_answer": 1.0, "wrong_answer": 3 / 4}


def test_planner_tables_and_figure_from_synthetic_runs(tmp_path):
    """Predictions, rank correlations, the separation test, the markdown and the figure from made-up runs
    whose gains follow the gradient objective exactly."""
    inputs = {
        "mean_accuracy": 0.2,
        "mean_within_var": 0.13,
        "between_var": 0.004,
        "thought_len": 13.0,
        "answer_len": 3.4,
        "repeats": {"thought": 0.3, "right_answer": 1.0, "wrong_answer": 0.25},
    }
    inputs["ratio"] = inputs["mean_within_var"] * 0.7 / inputs["between_var"]
    trees = planner.TREES
    predicted = planner.predictions(inputs, trees)
    order = sorted(predicted, key=lambda name: predicted[name]["gradient_snr_per_token"])
    runs_ = [
        {
            "tree": name,
            "seed": seed,
            "gain_greedy": 0.01 * rank + 0.001 * seed,
            "gain_sampled": 0.0,
            "tokens_per_step": 2000.0,
            "zero_std_thought_frac": 0.1,
        }
        for rank, name in enumerate(order)
        for seed in range(3)
    ]
    gains = {name: [r["gain_greedy"] for r in runs_ if r["tree"] == name] for name in predicted}
    summary = {name: planner.spread(values) for name, values in gains.items()}
    correlations = planner.rank_correlations(predicted, summary, "gain_greedy")
    assert correlations["gradient_snr_per_token"]["rho"] == pytest.approx(1.0)
    separation = planner.separation(gains)
    assert separation["best"] == order[-1] and separation["friedman_p"] < 0.05
    sampled = {name: [0.01 * i, 0.02, 0.0] for i, name in enumerate(predicted)}
    results = {
        "plan": dataclasses.asdict(planner.FULL),
        "seeds": [0, 1, 2],
        "inputs": inputs,
        "predictions": predicted,
        "gains": {"gain_greedy": summary, "gain_sampled": {n: planner.spread(v) for n, v in sampled.items()}},
        "separation": {"gain_greedy": separation, "gain_sampled": planner.separation(sampled)},
        "spearman": {
            "gain_greedy": correlations,
            "gain_sampled": planner.rank_correlations(
                predicted, {n: planner.spread(v) for n, v in sampled.items()}, "gain_sampled"
            ),
        },
        "runs": runs_,
    }
    table = planner.markdown(results)
    assert all(f"| {name} |" in table for name in predicted)
    assert (planner.figure(results, tmp_path)).stat().st_size > 0


@pytest.mark.slow
def test_planner_sweep_end_to_end_on_tiny_settings(tmp_path, monkeypatch):
    """Warm starts, inputs, runs and collection on a model too small to be right: the inputs are measured for
    real, then replaced by a spread the planner can rank with (the tiny model has none)."""
    measure = planner.measure_inputs

    def measured(plan, seed, folder):
        inputs = measure(plan, seed, folder)
        assert set(inputs["repeats"]) == {"thought", "right_answer", "wrong_answer"}
        return {**inputs, "mean_accuracy": 0.3, "mean_within_var": 0.15, "between_var": 0.05}

    monkeypatch.setattr(planner, "measure_inputs", measured)
    plan = dataclasses.replace(
        planner.FULL,
        trees=((4, 2), (2, 3), (3, 2)),
        seeds=2,
        steps=1,
        warmup_steps=2,
        max_start=1.0,
        eval_size=4,
        measure_prompts=2,
        measure_tree=2,
        base=(
            ("warmup_batch", 4),
            ("prompts_per_step", 1),
            ("max_thought_tokens", 8),
            ("max_answer_tokens", 4),
        ),
    )
    results = planner.run_sweep(plan, tmp_path / "cache", say=lambda line: None)
    assert len(results["runs"]) == 6 and set(results["predictions"]) == {"T4A2", "T2A3", "T3A2"}
