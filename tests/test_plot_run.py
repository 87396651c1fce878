"""paper_figures.plot_run on synthetic metrics.jsonl files written here: PNGs, overlays, clear errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from paper_figures import plot_run

REPO = Path(__file__).resolve().parents[1]
METRIC_KEYS = (
    "step",
    "reward_mean",
    "reward_std",
    "train_accuracy",
    "loss",
    "kl",
    "beta",
    "clip_frac",
    "grad_norm",
    "gss",
    "gss_over_10",
    "zero_std_thought_frac",
    "zero_std_answer_frac",
    "thought_len",
    "answer_len",
    "truncated_frac",
    "tokens_generated",
    "rollout_seconds",
    "train_seconds",
    "eval_greedy_accuracy",
    "eval_sampled_accuracy",
)


def metrics_lines(steps: int = 6, reward_functions: bool = True, offset: float = 0.0) -> list[dict]:
    """What grpo_ma.train writes: a step-0 line with only the start evaluation, then one line per step,
    nulls where a value is not measured (no GSS before its window fills, eval only every 3 steps); with
    `reward_functions`, the per-function means of a newer trainer."""
    start = dict.fromkeys(METRIC_KEYS)
    start.update(step=0, eval_greedy_accuracy=0.4 + offset, eval_sampled_accuracy=0.3 + offset)
    lines = [start]
    for step in range(1, steps + 1):
        line = {key: 0.1 * step + offset for key in METRIC_KEYS}
        line.update(step=step, gss=None if step < 3 else 1.5, gss_over_10=0, beta=0.04, clip_frac=0.01)
        if step % 3:
            line.update(eval_greedy_accuracy=None, eval_sampled_accuracy=None)
        if reward_functions:
            line.update({"reward/accuracy": 0.5 + offset, "reward/format": 0.9, "clip_ratio": 0.02})
        lines.append(line)
    return lines


def write_run(folder: Path, lines: list, raw: dict[int, str] | None = None) -> Path:
    """A run folder with metrics.jsonl (and config.json); `raw` replaces some lines (1-based) verbatim."""
    folder.mkdir(parents=True, exist_ok=True)
    text = [json.dumps(line) for line in lines]
    for number, content in (raw or {}).items():
        text[number - 1] = content
    (folder / "metrics.jsonl").write_text("\n".join(text) + "\n")
    (folder / "config.json").write_text(
        json.dumps({"thoughts": 4, "answers": 4, "seed": 0, "steps": len(lines) - 1})
    )
    return folder


def is_png(path: Path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_one_run_with_nulls_and_reward_functions_writes_curves_png_in_the_run_folder(tmp_path, capsys):
    run = write_run(tmp_path / "t4a4", metrics_lines())
    assert plot_run.main([str(run)]) == 0
    assert is_png(run / "curves.png")
    assert str(run / "curves.png") in capsys.readouterr().out


def test_reward_functions_and_clip_ratio_are_drawn_when_present_and_only_then(tmp_path):
    with_keys = plot_run.load_runs([write_run(tmp_path / "new", metrics_lines())])
    without = plot_run.load_runs([write_run(tmp_path / "old", metrics_lines(reward_functions=False))])
    reward, loss = plot_run.PANELS[0], plot_run.PANELS[4]
    assert [s.key for s in plot_run.panel_series(reward, with_keys)] == [
        "reward_mean",
        "reward/accuracy",
        "reward/format",
    ]
    assert [s.key for s in plot_run.panel_series(reward, without)] == ["reward_mean"]
    assert "clip_ratio" in [s.key for s in plot_run.panel_series(loss, with_keys)]
    assert "clip_ratio" not in [s.key for s in plot_run.panel_series(loss, without)]


def test_null_values_are_left_out_and_step_zero_holds_the_start_evaluation(tmp_path):
    rows = plot_run.load_runs([write_run(tmp_path / "run", metrics_lines(steps=6))])["run"]
    steps, values = plot_run.points(rows, "eval_greedy_accuracy")
    assert steps == [0, 3, 6] and values == pytest.approx([0.4, 0.3, 0.6])
    assert plot_run.points(rows, "gss")[0] == [3, 4, 5, 6]
    assert plot_run.points(rows, "train_accuracy")[0] == [1, 2, 3, 4, 5, 6]


def test_several_runs_overlay_into_one_png_labelled_by_folder_name(tmp_path, monkeypatch):
    first = write_run(tmp_path / "t16a1", metrics_lines(reward_functions=False))
    second = write_run(tmp_path / "t4a4", metrics_lines(offset=0.1))
    monkeypatch.chdir(tmp_path)
    assert plot_run.main([str(first), str(second)]) == 0
    assert is_png(tmp_path / "runs_curves.png")
    assert list(plot_run.load_runs([first, second])) == ["t16a1", "t4a4"]


def test_output_flag_chooses_the_png(tmp_path):
    run = write_run(tmp_path / "run", metrics_lines())
    target = tmp_path / "figures" / "mine.png"
    assert plot_run.main([str(run), "--output", str(target), "--quiet"]) == 0
    assert is_png(target) and not (run / "curves.png").exists()


@pytest.mark.parametrize(
    "bad, why",
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"loss": 1.0}', "'step' must be an integer"),
        ('{"step": 2, "kl": "high"}', "'kl' must be a number or null"),
    ],
)
def test_a_malformed_line_is_one_error_line_naming_file_and_line_number(tmp_path, capsys, bad, why):
    run = write_run(tmp_path / "run", metrics_lines(), raw={3: bad})
    assert plot_run.main([str(run)]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"{run / 'metrics.jsonl'}, line 3: {why}" in err
    assert not (run / "curves.png").exists()


def test_a_folder_without_metrics_is_one_error_line_naming_the_folder(tmp_path, capsys):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    assert plot_run.main([str(empty)]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{empty}: no metrics.jsonl" in err
    assert plot_run.main([str(tmp_path / "missing")]) != 0
    assert f"{tmp_path / 'missing'}: no such run folder" in capsys.readouterr().err


def test_command_line_reports_a_malformed_line_without_a_traceback(tmp_path):
    run = write_run(tmp_path / "run", metrics_lines(), raw={2: '{"step": 1, "loss": [1]}'})
    result = subprocess.run(
        [sys.executable, "-m", "paper_figures.plot_run", str(run)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"plot_run: error: {run / 'metrics.jsonl'}, line 2: 'loss' must be a number or null, found [1]"
    ]
