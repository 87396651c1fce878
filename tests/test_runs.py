"""Run safety, through the command line (grpo_ma.main and one `python grpo_ma.py`): a run never writes into
another run's folder unless told, never adopts another run's checkpoint, rejects bad settings before it
writes anything, survives a corrupt checkpoint and a cut-off metrics file, and keeps its totals over resumed
parts. Each test name states the probe it checks.

Runs that train use `answer_length` in place of the rewards --reward names (those are still checked): the
embedded start policy scores 0 everywhere on accuracy and format, so a run would not learn, and two
checkpoints could not be told apart."""

import io
import json
import os
import shutil
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import grpo_ma as G
import grpo_ma_run as R

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]
EVERY_STEP = ("--save-every", "1", "--eval-every", "1")


def answer_length(prompts, thoughts, answers, examples):
    """A reward that varies from the first step: a tenth of the answer's length in characters."""
    return [len(answer) / 10 for answer in answers]


def train_with_varying_reward(patch: pytest.MonkeyPatch):
    real = G.reward_functions

    def varying_reward(cfg):
        real(cfg)  # rejects what it rejects
        return [(answer_length, 1.0)]

    patch.setattr(G, "reward_functions", varying_reward)


@pytest.fixture
def learning(monkeypatch):
    train_with_varying_reward(monkeypatch)


def tiny_args(out, *extra):
    flags = ["--thoughts", "2", "--answers", "2", "--prompts-per-step", "2", "--steps", "2"]
    return [*flags, "--warmup-steps", "5", "--eval-size", "8", "--out", str(out), *extra]


def refused(argv, capsys) -> str:
    """main(argv) fails as the command does: exit status 1 and an 'error: ...' line on stderr (its last
    line: progress bars may come before it). Returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as failure:
        R.main(argv)
    assert failure.value.code == 1
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: ")
    return line


def snapshot(folder: Path) -> dict:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def read_metrics(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def load_checkpoint(folder, name="checkpoint.pt"):
    return torch.load(folder / name, map_location="cpu", weights_only=True)


def copy_of(folder: Path, tmp_path: Path) -> Path:
    shutil.copytree(folder, tmp_path / "run")
    return tmp_path / "run"


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-step run with a checkpoint at every step; its warm-up takes a second longer, so that the
    first part of a resumed run is clearly longer than the resumed part's overhead."""
    folder = tmp_path_factory.mktemp("finished") / "run"
    real_warmup = G.supervised_warmup

    def slow_warmup(run, cfg):
        time.sleep(1.0)
        real_warmup(run, cfg)

    with pytest.MonkeyPatch.context() as patch:
        train_with_varying_reward(patch)
        patch.setattr(G, "supervised_warmup", slow_warmup)
        R.main(tiny_args(folder, *EVERY_STEP))
    lines = read_metrics(folder)
    assert [line["step"] for line in lines] == [0, 1, 2]
    assert all(line["grad_norm"] > 0 for line in lines[1:])
    start = torch.load(folder / "reference.pt", map_location="cpu")
    model = load_checkpoint(folder)["model"]
    assert any(not torch.equal(model[name], start[name]) for name in start)  # it learned
    return folder


# ------------------------------------------------------------------------------------------------
# a folder holding a run
# ------------------------------------------------------------------------------------------------
def test_folder_holding_another_run_is_refused_and_left_untouched(finished_run, tmp_path, capsys):
    folder = copy_of(finished_run, tmp_path)
    before = snapshot(folder)
    line = refused(tiny_args(folder, "--seed", "1"), capsys)
    assert str(folder) in line and "--resume" in line and "--overwrite" in line
    assert snapshot(folder) == before


@pytest.mark.parametrize("name", [*R.RUN_FILES, *R.CHECKPOINTS])
def test_folder_holding_any_run_file_is_refused(tmp_path, capsys, name):
    (tmp_path / name).write_text("{}")
    assert "holds another run" in refused(tiny_args(tmp_path), capsys)
    assert [path.name for path in tmp_path.iterdir()] == [name]


def test_overwrite_clears_the_run_files_and_starts_a_new_run(finished_run, tmp_path, learning):
    folder = copy_of(finished_run, tmp_path)
    (folder / "notes.txt").write_text("not a run file")
    old_reference = (folder / "reference.pt").read_bytes()
    R.main(tiny_args(folder, "--overwrite", "--steps", "0", "--seed", "1"))
    assert [line["step"] for line in read_metrics(folder)] == [0]
    assert json.loads((folder / "config.json").read_text())["seed"] == 1
    checkpoint = load_checkpoint(folder)
    assert checkpoint["progress"]["step"] == 0 and checkpoint["config"]["seed"] == 1
    assert not (folder / "checkpoint.prev.pt").exists()  # the old run's second checkpoint went too
    assert json.loads((folder / "summary.json").read_text())["steps"] == 0
    assert (folder / "reference.pt").read_bytes() != old_reference
    assert (folder / "notes.txt").read_text() == "not a run file"


def test_resume_without_a_checkpoint_names_the_folder(tmp_path, capsys):
    folder = tmp_path / "empty"
    line = refused(tiny_args(folder, "--resume"), capsys)
    assert str(folder) in line and "no readable checkpoint" in line


def test_second_run_killed_in_its_warm_up_never_adopts_the_first_runs_checkpoint(
    finished_run, tmp_path, capsys, monkeypatch
):
    folder = copy_of(finished_run, tmp_path)

    def killed(run, cfg):
        raise KeyboardInterrupt("killed during the warm-up")

    with monkeypatch.context() as patch:
        patch.setattr(G, "supervised_warmup", killed)
        with pytest.raises(KeyboardInterrupt):
            R.main(tiny_args(folder, *EVERY_STEP, "--overwrite", "--seed", "1"))
    assert not any((folder / name).exists() for name in R.CHECKPOINTS)
    assert not any((folder / name).exists() for name in ("reference.pt", "summary.json", "final"))
    assert json.loads((folder / "config.json").read_text())["seed"] == 1
    assert (folder / "metrics.jsonl").read_text() == ""
    for settings in (["--seed", "1"], []):  # the second run's settings, and the first run's
        line = refused(tiny_args(folder, *EVERY_STEP, "--resume", *settings), capsys)
        assert "no readable checkpoint" in line
    assert "holds another run" in refused(tiny_args(folder, *EVERY_STEP), capsys)


def test_resume_compares_with_the_settings_the_checkpoint_recorded(finished_run, tmp_path, capsys):
    """config.json rewritten to another run's settings: the checkpoint still speaks for the run."""
    folder = copy_of(finished_run, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"seed": 1}))
    before = snapshot(folder)
    line = refused(tiny_args(folder, *EVERY_STEP, "--resume", "--seed", "1"), capsys)
    assert "seed" in line and "differ from the checkpoint" in line
    assert snapshot(folder) == before


def test_resume_below_the_checkpoints_step_is_refused(finished_run, tmp_path, capsys):
    folder = copy_of(finished_run, tmp_path)
    line = refused(tiny_args(folder, *EVERY_STEP, "--resume", "--steps", "1"), capsys)
    assert "--steps 1" in line and "step 2" in line


# ------------------------------------------------------------------------------------------------
# bad settings are rejected before anything is written
# ------------------------------------------------------------------------------------------------
def test_command_rejects_a_negative_learning_rate_in_one_line_before_creating_the_folder(tmp_path):
    out = tmp_path / "new"
    command = [sys.executable, str(REPO / "grpo_ma.py"), "--lr", "-1", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 1
    assert done.stderr.splitlines() == ["error: --lr must be > 0, got -1.0"]
    assert done.stdout == ""
    assert not out.exists()


def test_negative_learning_rate_leaves_an_existing_folder_empty(tmp_path, capsys):
    folder = tmp_path / "existing"
    folder.mkdir()
    assert "--lr" in refused(tiny_args(folder, "--lr", "-1"), capsys)
    assert list(folder.iterdir()) == []


def test_missing_model_folder_is_named(tmp_path, capsys):
    line = refused(tiny_args(tmp_path / "new", "--model", "/nonexistent/path"), capsys)
    assert "--model /nonexistent/path" in line
    assert not (tmp_path / "new").exists()


def test_reward_weights_that_are_not_numbers_name_the_flag(tmp_path, capsys):
    line = refused(tiny_args(tmp_path / "new", "--reward-weights", "a,b"), capsys)
    assert "--reward-weights" in line and "'a,b'" in line
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("flag", ["--prompts-per-step", "--max-thought-tokens", "--eval-size"])
def test_zero_where_one_is_needed_names_the_flag(tmp_path, capsys, flag):
    line = refused(tiny_args(tmp_path / "new", flag, "0"), capsys)
    assert f"{flag} must be >= 1, got 0" in line
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------------------------------------------
# damaged files
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fallback_run(finished_run, tmp_path_factory):
    """The finished run with its newest checkpoint corrupt, resumed: from the one before."""
    folder = tmp_path_factory.mktemp("fallback") / "run"
    shutil.copytree(finished_run, folder)
    (folder / "checkpoint.pt").write_bytes(b"cut off")
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, redirect_stdout(out), redirect_stderr(err):
        train_with_varying_reward(patch)
        R.main(tiny_args(folder, *EVERY_STEP, "--resume"))
    return SimpleNamespace(folder=folder, out=out.getvalue(), err=err.getvalue())


def test_corrupt_checkpoint_falls_back_to_the_one_before_with_a_warning(fallback_run):
    folder = fallback_run.folder
    warnings = [line for line in fallback_run.err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and str(folder / "checkpoint.pt") in warnings[0]
    assert f"resuming {folder} from step 1" in fallback_run.out
    assert [line["step"] for line in read_metrics(folder)] == [0, 1, 2]
    assert load_checkpoint(folder)["progress"]["step"] == 2


def test_resume_from_the_fallback_keeps_a_readable_fallback(fallback_run):
    """The unreadable file is not rotated in as the fallback of the checkpoint written next: a kill or a
    damaged file then would leave the run without any checkpoint to resume."""
    assert load_checkpoint(fallback_run.folder, "checkpoint.prev.pt")["progress"]["step"] in (1, 2)


class RunsACommand:
    """What an attacker would put in a checkpoint: unpickled, it runs a shell command (here: touch a file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def foreign_checkpoint(kind: str, folder: Path, marker: Path):
    """A checkpoint.pt this program did not write, and the words the warning must use for it."""
    payload = load_checkpoint(folder)
    if kind == "code":
        payload = RunsACommand(marker)
        words = "cannot read"
    elif kind == "missing key":
        del payload["optimizer"]
        words = "'optimizer' is missing"
    elif kind == "wrong shape":
        name = next(iter(payload["model"]))
        payload["model"][name] = torch.zeros(3, 3)
        words = f"{name!r} ((3, 3)) is not one of this model's"
    else:  # a plain tensor
        payload = torch.zeros(2)
        words = "holds a Tensor"
    torch.save(payload, folder / "checkpoint.pt")
    return words


@pytest.mark.parametrize("kind", ["code", "missing key", "wrong shape", "tensor"])
def test_foreign_checkpoint_is_named_set_aside_and_never_executed(finished_run, tmp_path, kind, learning):
    """A run folder is data: the safe loader never runs what a file holds. A file that is not a checkpoint of
    this run gets one warning naming it and what is wrong, and the resume continues from the one before."""
    folder = copy_of(finished_run, tmp_path)
    marker = tmp_path / "code-ran"
    words = foreign_checkpoint(kind, folder, marker)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        R.main(tiny_args(folder, *EVERY_STEP, "--resume", "--steps", "3"))
    assert not marker.exists()
    warnings = [line for line in err.getvalue().splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and str(folder / "checkpoint.pt") in warnings[0] and words in warnings[0]
    assert (folder / "checkpoint.pt.unreadable").exists()
    assert f"resuming {folder} from step 1" in out.getvalue()
    assert [line["step"] for line in read_metrics(folder)] == [0, 1, 2, 3]


def test_run_holding_only_foreign_checkpoints_is_refused_without_running_them(finished_run, tmp_path, capsys):
    folder = copy_of(finished_run, tmp_path)
    marker = tmp_path / "code-ran"
    for name in R.CHECKPOINTS:
        torch.save(RunsACommand(marker), folder / name)
    line = refused(tiny_args(folder, *EVERY_STEP, "--resume", "--steps", "3"), capsys)
    assert not marker.exists()
    assert line == f"error: --resume: {folder} holds no readable checkpoint"


def test_malformed_metrics_line_is_reported_with_file_and_line_number(finished_run, tmp_path, capsys):
    folder = copy_of(finished_run, tmp_path)
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    lines[1] = '{"step": 1, "loss": '
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    before = snapshot(folder)
    line = refused(tiny_args(folder, *EVERY_STEP, "--resume", "--steps", "3"), capsys)
    assert f"{folder / 'metrics.jsonl'}:2" in line
    assert snapshot(folder) == before


def test_metrics_line_of_another_step_is_reported_with_file_and_line_number(finished_run, tmp_path, capsys):
    folder = copy_of(finished_run, tmp_path)
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    (folder / "metrics.jsonl").write_text("\n".join([lines[0], lines[2], lines[2]]) + "\n")  # step 1 lost
    line = refused(tiny_args(folder, *EVERY_STEP, "--resume", "--steps", "3"), capsys)
    assert f"{folder / 'metrics.jsonl'}:2" in line and "expected step 1, found 2" in line


@pytest.fixture(scope="module")
def extended_run(finished_run, tmp_path_factory):
    """The finished run with garbage after its last checkpointed line (what a kill mid-line leaves), then
    resumed with --steps 4."""
    folder = tmp_path_factory.mktemp("extended") / "run"
    shutil.copytree(finished_run, folder)
    first_part = load_checkpoint(folder)["progress"]["wall_seconds"]
    with (folder / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 3, "loss": 0.125}\n{"step": 3, "garbage')
    step_seconds = []
    real_step = G.train_step

    def timed_step(*args):
        started = time.time()
        record = real_step(*args)
        step_seconds.append(time.time() - started)
        return record

    with pytest.MonkeyPatch.context() as patch:
        train_with_varying_reward(patch)
        patch.setattr(G, "train_step", timed_step)
        started = time.time()
        R.main(tiny_args(folder, *EVERY_STEP, "--resume", "--steps", "4"))
        second_part = time.time() - started
    return SimpleNamespace(
        folder=folder, first_part=first_part, second_part=second_part, step_seconds=sum(step_seconds)
    )


def test_lines_after_the_checkpoint_are_dropped_without_being_parsed(extended_run):
    text = (extended_run.folder / "metrics.jsonl").read_text()
    assert "garbage" not in text
    assert all(json.loads(line)["loss"] != 0.125 for line in text.splitlines())


def test_resume_with_more_steps_extends_a_finished_run(extended_run, finished_run):
    folder = extended_run.folder
    lines = read_metrics(folder)
    assert [line["step"] for line in lines] == [0, 1, 2, 3, 4]  # one line per step, none twice
    assert lines[:3] == read_metrics(finished_run)
    assert all(line["grad_norm"] > 0 for line in lines[3:])
    assert load_checkpoint(folder)["progress"]["step"] == 4
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["final_greedy_accuracy"] == lines[-1]["eval_greedy_accuracy"]


def test_summary_wall_seconds_totals_every_part(extended_run):
    """The first part's seconds (as its last checkpoint counted them) plus the resumed part's: at least its
    steps, at most the whole call."""
    total = json.loads((extended_run.folder / "summary.json").read_text())["wall_seconds"]
    assert extended_run.first_part > 1.0  # it holds the slow warm-up
    assert total >= extended_run.first_part + extended_run.step_seconds
    assert total <= extended_run.first_part + extended_run.second_part


def test_dynamic_schedule_refuses_a_changed_step_count_on_resume(tmp_path, capsys, learning):
    args = tiny_args(
        tmp_path, "--kl-schedule", "dynamic", "--steps", "1", "--warmup-steps", "0", "--eval-size", "2"
    )
    R.main(args)
    before = snapshot(tmp_path)
    line = refused([*args, "--resume", "--steps", "2"], capsys)
    assert "--steps" in line and "dynamic" in line
    assert snapshot(tmp_path) == before
