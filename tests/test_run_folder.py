"""A run folder has one owner, and nothing a user does to it corrupts it: a second process is refused while a
run holds the folder, a lock left by a killed run is named and taken over, --overwrite clears everything a
run wrote, a start that fails leaves no folder behind, errors about the folder name --out, and resuming a
finished run changes nothing."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import grpo_ma as G
import grpo_ma_run as R

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(G.__file__).resolve().parent
TINY = ["--thoughts", "2", "--answers", "2", "--prompts-per-step", "2", "--eval-size", "4", "--device", "cpu"]


def tiny(out, *extra):
    return [*TINY, "--warmup-steps", "3", "--steps", "1", "--out", str(out), *extra]


def refused(argv, capsys) -> str:
    """R.main(argv) fails as the command does: exit status 1 and one 'error: ...' line. Returns it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as failure:
        R.main(argv)
    assert failure.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def ended_process_id() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_second_resume_while_the_run_goes_on_is_refused_and_the_run_ends_clean(tmp_path):
    """The probe: start a run, then --resume the same folder while it trains. The second process stops with
    one line; the first ends normally with exactly one metrics line per step."""
    out = tmp_path / "run"
    environment = os.environ | {"OMP_NUM_THREADS": "1"}
    flags = [*TINY, "--warmup-steps", "3", "--steps", "8", "--save-every", "1", "--out", str(out)]
    first = subprocess.Popen(
        [sys.executable, "grpo_ma_run.py", *flags],
        cwd=REPO,
        env=environment,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not (out / "checkpoint.pt").exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert first.poll() is None, "the first run ended before the probe"
    second = subprocess.run(
        [sys.executable, "grpo_ma_run.py", *flags, "--resume"],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err[-2000:]
    assert second.returncode == 1
    errors = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"--out {out} is in use by process {first.pid}" in errors[0]
    assert [line["step"] for line in read_metrics(out)] == list(range(9))
    assert not (out / R.LOCK).exists()


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_folder_whose_lock_names_a_running_process_is_refused_before_any_write(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / R.LOCK).write_text(f"{os.getpid()}\n")
    before = snapshot(out)
    line = refused(tiny(out), capsys)
    assert f"--out {out} is in use by process {os.getpid()}" in line
    assert snapshot(out) == before


def test_lock_of_an_ended_process_is_named_and_taken_over(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    dead = ended_process_id()
    (out / R.LOCK).write_text(f"{dead}\n")
    R.main(tiny(out))
    assert f"names process {dead}, which has ended" in capsys.readouterr().out
    assert (out / "summary.json").exists() and not (out / R.LOCK).exists()


def test_lock_is_removed_when_a_run_stops_with_an_error(tmp_path, monkeypatch):
    def failing_step(*args):
        raise RuntimeError("stopped")

    monkeypatch.setattr(G, "train_step", failing_step)
    with pytest.raises(RuntimeError, match="stopped"):
        R.train(R.parse_args(tiny(tmp_path / "run")))
    assert (tmp_path / "run" / "config.json").exists() and not (tmp_path / "run" / R.LOCK).exists()


def test_overwrite_clears_live_views_merged_models_and_set_aside_checkpoints(tmp_path):
    out = tmp_path / "run"
    R.main(tiny(out, "--report-to", "tensorboard"))
    (out / "checkpoint.pt.unreadable").write_bytes(b"old")
    (out / "final-merged").mkdir()
    old_events = sorted((out / "tensorboard").iterdir())
    R.main(tiny(out, "--overwrite"))
    assert not (out / "checkpoint.pt.unreadable").exists()
    assert not (out / "final-merged").exists() and not (out / "tensorboard").exists()
    assert old_events and (out / "summary.json").exists()


def test_start_that_fails_leaves_no_new_folder(tmp_path, capsys):
    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "readme.txt").write_text("no model here")
    line = refused(tiny(tmp_path / "new", "--model", str(not_a_model)), capsys)
    assert f"--model {not_a_model}: cannot load it" in line
    assert not (tmp_path / "new").exists()


def test_out_that_is_a_file_is_named(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    line = refused(tiny(tmp_path / "file"), capsys)
    assert line == f"error: --out {tmp_path / 'file'} is a file, not a folder"


def test_out_that_cannot_be_made_names_out(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    line = refused(tiny(tmp_path / "file" / "run"), capsys)
    assert line == f"error: --out {tmp_path / 'file' / 'run'}: cannot write there (Not a directory)"


def test_resuming_a_finished_run_changes_no_file(tmp_path, capsys):
    out = tmp_path / "run"
    R.main(tiny(out))
    before = snapshot(out)
    summary = R.main(tiny(out, "--resume"))
    assert "finished at step 1: nothing to do" in capsys.readouterr().out
    assert snapshot(out) == before and summary["steps"] == 1


def test_bad_flag_under_torchrun_is_one_line_from_rank_0(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "grpo_ma_run.py"]
    result = subprocess.run(
        [*command, *tiny(tmp_path / "run"), "--lr", "-1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: --lr must be > 0, got -1.0"]
