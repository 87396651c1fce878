"""Keeping a run alive through grpo_ma_run: what a run writes, a run killed and resumed that ends bit for bit
as the straight one, checkpoints that restore everything, a run folder with one owner that never adopts
another run's files, settings rejected before anything is written, damaged and foreign files, totals kept over
resumed parts, the live views of --report-to, and data-parallel training under torchrun (gloo on the CPU).
Each test name states the probe it checks.

Runs that train use `answer_length` in place of the rewards --reward names (those are still checked): the
embedded start policy scores 0 everywhere on accuracy and format, so a run would not learn, and two
checkpoints could not be told apart. For --report-to, tensorboard is a test extra, so its events are written
and read back for real; wandb is not installed here, so a stand-in module records what the run sends it (and
checks it stays offline). The DDP test runs two real processes; each grows the trees of its own prompt, and
their averaged gradient must equal the gradient one process computes over both prompts' trees."""

import dataclasses
import importlib.machinery
import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
import types
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from conftest import (
    LEARNING,
    REWARDS,
    answer_length,
    assert_learned,
    assert_same_tensors,
    config_from_flags,
    load_checkpoint,
    read_metrics,
    small_config,
    start,
    tiny_config,
)

import grpo_ma as G
import grpo_ma_run as R

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(G.__file__).resolve().parent
EVERY_STEP = ("--save-every", "1", "--eval-every", "1")
TIMING_KEYS = {"rollout_seconds", "train_seconds"}
TINY = ["--thoughts", "2", "--answers", "2", "--prompts-per-step", "2", "--eval-size", "4", "--device", "cpu"]


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
    """T2A2 on 2 prompts: 2 steps after 5 warm-up steps, 8 held-out prompts."""
    flags = ["--thoughts", "2", "--answers", "2", "--prompts-per-step", "2", "--steps", "2"]
    return [*flags, "--warmup-steps", "5", "--eval-size", "8", "--out", str(out), *extra]


def tiny(out, *extra):
    """T2A2 on 2 prompts on the CPU: 1 step after 3 warm-up steps, 4 held-out prompts."""
    return [*TINY, "--warmup-steps", "3", "--steps", "1", "--out", str(out), *extra]


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


def refused_in_one_line(argv, capsys) -> str:
    """R.main(argv) fails as the command does: exit status 1 and one 'error: ...' line. Returns it."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as failure:
        R.main(argv)
    assert failure.value.code == 1
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1
    return lines[0]


def snapshot(folder: Path) -> dict:
    return {
        str(path.relative_to(folder)): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def copy_of(folder: Path, tmp_path: Path) -> Path:
    shutil.copytree(folder, tmp_path / "run")
    return tmp_path / "run"


def without_timing(lines):
    return [{key: value for key, value in line.items() if key not in TIMING_KEYS} for line in lines]


def summary_without_wall(folder):
    summary = json.loads((folder / "summary.json").read_text())
    summary.pop("wall_seconds")
    return summary


def assert_same_optimizer_state(left: dict, right: dict):
    assert left["param_groups"] == right["param_groups"]
    assert left["state"].keys() == right["state"].keys()
    for index, moments in left["state"].items():
        assert_same_tensors(moments, right["state"][index])


# ------------------------------------------------------------------------------------------------
# end to end: a straight run, and the same run killed after its step-2 checkpoint and resumed
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def learning_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("learning")
    R.train(tiny_config(root / "straight", **LEARNING), reward_fns=REWARDS)
    real_step = G.train_step

    def killed_at_step_3(step, *args):
        if step == 3:
            raise KeyboardInterrupt("killed")
        return real_step(step, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(G, "train_step", killed_at_step_3)
        with pytest.raises(KeyboardInterrupt):
            R.train(tiny_config(root / "killed", **LEARNING), reward_fns=REWARDS)
    start_policy = torch.load(root / "killed" / "reference.pt", map_location="cpu")
    checkpoint = load_checkpoint(root / "killed")
    references = []

    def recording_the_reference(step, run, optimizer, progress, reference, *rest):
        references.append({name: value.clone() for name, value in reference.state_dict().items()})
        return real_step(step, run, optimizer, progress, reference, *rest)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(G, "train_step", recording_the_reference)
        R.train(tiny_config(root / "killed", resume=True, **LEARNING), reward_fns=REWARDS)
    return SimpleNamespace(
        straight=root / "straight",
        killed=root / "killed",
        start_policy=start_policy,
        checkpoint_before_resume=checkpoint,
        references_after_resume=references,
    )


def test_tiny_run_writes_config_metrics_checkpoint_summary_and_final(learning_runs):
    folder = learning_runs.straight
    lines = read_metrics(folder)
    assert [line["step"] for line in lines] == [0, 1, 2, 3, 4]
    assert all(list(line)[: len(G.METRIC_KEYS)] == list(G.METRIC_KEYS) for line in lines)
    assert all(list(line)[len(G.METRIC_KEYS) :] == ["reward/answer_length"] for line in lines[1:])
    assert all(line["tokens_generated"] > 0 and line["beta"] == 0.04 for line in lines[1:])
    assert all(line["kl"] is not None for line in lines[1:])
    evaluated = [line["step"] for line in lines if line["eval_greedy_accuracy"] is not None]
    assert evaluated == [0, 3, 4]  # the start, every --eval-every steps, the end
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["final_greedy_accuracy"] == lines[-1]["eval_greedy_accuracy"]
    assert summary["start_sampled_accuracy"] == lines[0]["eval_sampled_accuracy"]
    assert summary["config"] == "T2A2" and summary["steps"] == 4 and summary["wall_seconds"] > 0
    assert json.loads((folder / "config.json").read_text())["answers"] == 2
    checkpoint = load_checkpoint(folder)
    assert checkpoint["progress"]["step"] == 4
    assert load_checkpoint(folder, "checkpoint.prev.pt")["progress"]["step"] == 2
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(folder / "final").state_dict()
    assert all(torch.equal(final[name], checkpoint["model"][name]) for name in final)


def test_learning_runs_have_gradients_and_move_the_weights(learning_runs):
    assert_learned(learning_runs.straight)
    assert_learned(learning_runs.killed)


def test_kill_and_resume_gives_the_same_final_state(learning_runs):
    straight, killed = learning_runs.straight, learning_runs.killed
    assert_learned(straight)  # two runs that do not learn would agree trivially
    assert_learned(killed)
    first, second = load_checkpoint(straight), load_checkpoint(killed)
    assert_same_tensors(first["model"], second["model"])
    assert_same_optimizer_state(first["optimizer"], second["optimizer"])
    assert without_timing(read_metrics(straight)) == without_timing(read_metrics(killed))
    assert summary_without_wall(straight) == summary_without_wall(killed)


def test_resumed_run_keeps_the_start_policy_as_kl_reference(learning_runs):
    before = learning_runs.checkpoint_before_resume
    assert before["progress"]["step"] == 2
    start = learning_runs.start_policy
    assert any(not torch.equal(before["model"][name], start[name]) for name in start)  # the policy moved
    assert len(learning_runs.references_after_resume) == 2  # steps 3 and 4
    for reference in learning_runs.references_after_resume:
        assert_same_tensors(reference, start)
    assert_same_tensors(torch.load(learning_runs.killed / "reference.pt", map_location="cpu"), start)


def test_kl_reference_is_the_policy_after_the_warm_up(learning_runs):
    cfg = tiny_config(learning_runs.straight, **LEARNING)
    run = G.start_run(cfg, reward_fns=REWARDS)
    untrained = {name: value.clone() for name, value in run.policy.state_dict().items()}
    G.supervised_warmup(run, cfg)
    reference = torch.load(learning_runs.straight / "reference.pt", map_location="cpu")
    assert_same_tensors(reference, run.policy.state_dict())
    assert any(not torch.equal(untrained[name], reference[name]) for name in reference)


def test_resuming_a_finished_run_changes_nothing(learning_runs, tmp_path):
    folder = tmp_path / "finished"
    shutil.copytree(learning_runs.straight, folder)
    before = load_checkpoint(folder)
    metrics = read_metrics(folder)
    summary = summary_without_wall(folder)
    R.train(tiny_config(folder, resume=True, **LEARNING), reward_fns=REWARDS)
    assert_same_tensors(load_checkpoint(folder)["model"], before["model"])
    assert read_metrics(folder) == metrics
    assert summary_without_wall(folder) == summary


def test_resume_with_different_settings_is_refused(learning_runs, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(learning_runs.straight, folder)
    with pytest.raises(ValueError, match="answers"):
        R.train(tiny_config(folder, resume=True, answers=3, **LEARNING), reward_fns=REWARDS)
    with pytest.raises(ValueError, match="lr"):
        R.train(tiny_config(folder, resume=True, lr=1e-3, **LEARNING), reward_fns=REWARDS)
    assert load_checkpoint(folder)["progress"]["step"] == 4


def test_a_trained_policy_in_final_continues_training_through_model_flag(learning_runs, tmp_path):
    """python grpo_ma.py --model OUT/final --warmup-steps 0 starts from the trained weights."""
    final = learning_runs.straight / "final"
    flags = [
        "--thoughts",
        "2",
        "--answers",
        "2",
        "--prompts-per-step",
        "2",
        "--steps",
        "1",
        "--eval-size",
        "4",
    ]
    flags += ["--warmup-steps", "0", "--model", str(final), "--out", str(tmp_path / "more")]
    R.train(config_from_flags(flags), reward_fns=REWARDS)
    start = torch.load(tmp_path / "more" / "reference.pt")
    assert_same_tensors(start, load_checkpoint(learning_runs.straight)["model"])
    assert_learned(tmp_path / "more")


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------
def test_restore_puts_back_weights_optimizer_moments_data_stream_and_rngs(tmp_path):
    cfg = small_config(lr=1e-3)
    run, optimizer = start(cfg)
    state = G.Progress()
    G.train_step(1, run, optimizer, state, None, cfg)
    state.step = 1
    R.save_checkpoint(tmp_path, run, optimizer, state, cfg)
    rng = torch.get_rng_state()
    data = run.data_rng.getstate()

    other, other_optimizer = start(small_config(lr=1e-3, seed=1))  # another start: restore must overwrite it
    torch.manual_seed(123)
    payload = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    restored = R.restore(payload, other, other_optimizer, cfg)
    assert restored == state
    for name, value in run.policy.state_dict().items():
        assert torch.equal(other.policy.state_dict()[name], value), name
    mine, theirs = optimizer.state_dict(), other_optimizer.state_dict()
    assert mine["state"].keys() == theirs["state"].keys() and len(mine["state"]) > 0
    for index, moments in mine["state"].items():
        for key, value in moments.items():
            assert torch.equal(theirs["state"][index][key], value), (index, key)
    assert torch.equal(torch.get_rng_state(), rng)
    assert other.data_rng.getstate() == data


# ------------------------------------------------------------------------------------------------
# a folder holding a run
# ------------------------------------------------------------------------------------------------
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
# one owner: the lock, --overwrite, --out, a finished run
# ------------------------------------------------------------------------------------------------
def ended_process_id() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_second_resume_while_the_run_goes_on_is_refused_and_the_run_ends_clean(tmp_path):
    """The probe: start a run, then --resume the same folder while it trains. The second process stops with
    one line; the first ends normally with exactly one metrics line per step."""
    out = tmp_path / "run"
    environment = os.environ | {"OMP_NUM_THREADS": "1"}
    # 60 steps: the first run must still be going when the second process has started and looked
    flags = [*TINY, "--warmup-steps", "3", "--steps", "60", "--save-every", "1", "--out", str(out)]
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
    assert [line["step"] for line in read_metrics(out)] == list(range(61))
    assert not (out / R.LOCK).exists()


def test_folder_whose_lock_names_a_running_process_is_refused_before_any_write(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / R.LOCK).write_text(f"{os.getpid()}\n")
    before = snapshot(out)
    line = refused_in_one_line(tiny(out), capsys)
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
    line = refused_in_one_line(tiny(tmp_path / "new", "--model", str(not_a_model)), capsys)
    assert f"--model {not_a_model}: cannot load it" in line
    assert not (tmp_path / "new").exists()


def test_out_that_is_a_file_is_named(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    line = refused_in_one_line(tiny(tmp_path / "file"), capsys)
    assert line == f"error: --out {tmp_path / 'file'} is a file, not a folder"


def test_out_that_cannot_be_made_names_out(tmp_path, capsys):
    (tmp_path / "file").write_text("")
    line = refused_in_one_line(tiny(tmp_path / "file" / "run"), capsys)
    assert line == f"error: --out {tmp_path / 'file' / 'run'}: cannot write there (Not a directory)"


def test_resuming_a_finished_run_changes_no_file(tmp_path, capsys):
    out = tmp_path / "run"
    R.main(tiny(out))
    before = snapshot(out)
    summary = R.main(tiny(out, "--resume"))
    assert "finished at step 1: nothing to do" in capsys.readouterr().out
    assert snapshot(out) == before and summary["steps"] == 1


# ------------------------------------------------------------------------------------------------
# bad settings are rejected before anything is written
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--thoughts", "1"], "--thoughts"),
        (["--answers", "0"], "--answers"),
        (["--answers", "1", "--answer-pool", "thought"], "--answer-pool"),
        (["--temperature", "0"], "--temperature"),
        (["--reward", "accuracy,nope"], "nope"),
        (["--reward-weights", "1,2,3"], "--reward-weights"),
        (["--task", "calculus"], "--task"),
        (["--kl-schedule", "dynamic", "--steps", "0"], "--kl-schedule dynamic"),
        (["--beta-min", "0.2", "--beta-max", "0.1"], "--beta-min"),
        (["--epsilon", "1"], "--epsilon"),
        (["--explore-share", "0"], "--explore-share"),
        (["--ddof", "2"], "--ddof"),
        (["--resume", "--overwrite"], "--resume and --overwrite"),
        (["--model", "./no/such/model"], "--model ./no/such/model"),
    ],
)
def test_invalid_settings_are_rejected_naming_the_flag(flags, message):
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        R.validate_run_config(config_from_flags(flags))


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


# ------------------------------------------------------------------------------------------------
# a finished run resumed with more steps
# ------------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------------
# --report-to: the live view gets the numbers of metrics.jsonl, and its package stays optional
# ------------------------------------------------------------------------------------------------
def tensorboard_scalars(folder) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    scalars = {}
    for tag in events.Tags()["scalars"]:
        steps = [event.step for event in events.Scalars(tag)]
        assert len(steps) == len(set(steps)), f"{tag}: a step logged twice: {steps}"
        scalars[tag] = {event.step: event.value for event in events.Scalars(tag)}
    return scalars


def test_tensorboard_holds_every_step_of_metrics_jsonl_and_resume_drops_the_recomputed_ones(
    tmp_path, monkeypatch
):
    pytest.importorskip("tensorboard")
    train_with_varying_reward(monkeypatch)
    out = tmp_path / "run"
    every_step = ("--save-every", "1", "--eval-every", "1")
    R.main(tiny_args(out, "--report-to", "tensorboard", *every_step))
    scalars = tensorboard_scalars(out)
    for record in read_metrics(out):
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                assert scalars[key][record["step"]] == pytest.approx(value, rel=1e-6), key
    assert sorted(scalars["reward_mean"]) == [1, 2]
    assert sorted(scalars["eval_greedy_accuracy"]) == [0, 1, 2]

    # resume from step 1's checkpoint: step 2 is recomputed, and the live view keeps only the new one
    (out / "checkpoint.pt").replace(out / "checkpoint.pt.step2")
    (out / "checkpoint.prev.pt").replace(out / "checkpoint.pt")
    R.main(tiny_args(out, "--report-to", "tensorboard", "--resume", "--steps", "3", *every_step))
    scalars = tensorboard_scalars(out)
    records = read_metrics(out)
    assert sorted(scalars["reward_mean"]) == [1, 2, 3]
    for record in records[1:]:
        assert scalars["reward_mean"][record["step"]] == pytest.approx(record["reward_mean"], rel=1e-6)


def fake_wandb(monkeypatch) -> list:
    """A stand-in wandb module; returns the calls it receives, in order."""
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", step, dict(values)))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs, R.os.environ.get("WANDB_MODE")))
        return Run()

    module = types.ModuleType("wandb")
    module.__spec__ = importlib.machinery.ModuleSpec("wandb", None)
    module.init = init
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_wandb_gets_every_step_offline_by_default(tmp_path, monkeypatch):
    train_with_varying_reward(monkeypatch)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    calls = fake_wandb(monkeypatch)
    out = tmp_path / "run"
    R.main(tiny_args(out, "--report-to", "wandb"))
    assert calls[0][0] == "init" and calls[0][2] == "offline"
    assert calls[0][1]["config"]["report_to"] == "wandb"
    assert calls[-1] == ("finish",)
    logged = {step: values for _, step, values in calls[1:-1]}
    records = read_metrics(out)
    assert sorted(logged) == [record["step"] for record in records]
    for record in records:
        numbers = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        assert logged[record["step"]] == numbers
    assert "eval_greedy_accuracy" in logged[0] and "loss" in logged[2]


def test_wandb_mode_set_by_the_user_is_kept(tmp_path, monkeypatch):
    train_with_varying_reward(monkeypatch)
    monkeypatch.setenv("WANDB_MODE", "disabled")
    calls = fake_wandb(monkeypatch)
    R.main(tiny_args(tmp_path / "run", "--report-to", "wandb", "--steps", "1"))
    assert calls[0][2] == "disabled"


def test_missing_reporter_package_is_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import of it fails, find_spec finds nothing
    line = refused(tiny_args(tmp_path / "run", "--report-to", "wandb"), capsys)
    assert line == 'error: --report-to wandb needs its package: pip install "grpo-ma[wandb]"'
    assert not (tmp_path / "run").exists()


def test_no_reporter_imports_nothing(tmp_path, monkeypatch):
    train_with_varying_reward(monkeypatch)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    R.main(tiny_args(tmp_path / "run", "--steps", "1"))
    assert "torch.utils.tensorboard" not in sys.modules
    assert not (tmp_path / "run" / "tensorboard").exists()


# ------------------------------------------------------------------------------------------------
# torchrun: data-parallel processes
# ------------------------------------------------------------------------------------------------
DDP_STEP = """
import sys, torch, torch.distributed as dist
sys.path.insert(0, sys.argv[2])
from test_runs import step_through_train_step
dist.init_process_group("gloo")
result = step_through_train_step(distributed=True)
if dist.get_rank() == 0:
    torch.save(result, sys.argv[1])
dist.barrier()  # closing the group while the other process still works can abort it
dist.destroy_process_group()
"""


def fixed_tree(model, tokenizer, prompt_ids, k, m, cfg, do_sample=True, vision=None, caches=None) -> G.Tree:
    """In place of sampling: thoughts and answers of digits drawn from each prompt's own tokens, so a prompt
    grows the same tree in whichever process takes it."""
    digits = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    grown = []
    for ids in prompt_ids:
        rng = random.Random(sum(ids) * 31 + len(ids))
        thoughts = [[rng.choice(digits) for _ in range(rng.randint(1, 5))] for _ in range(k)]
        answers = [
            [[rng.choice(digits) for _ in range(rng.randint(1, 4))] for _ in range(m)] for _ in range(k)
        ]
        grown.append((thoughts, answers))
    thought_ids = [thoughts for thoughts, _ in grown]
    answer_ids = [answers for _, answers in grown]
    forced = [[[] for _ in range(k)] for _ in prompt_ids]
    thoughts = [[tokenizer.decode(t) for t in by_p] for by_p in thought_ids]
    answers = [[[tokenizer.decode(a) for a in by_k] for by_k in by_p] for by_p in answer_ids]
    ended = [[["budget"] * m for _ in range(k)] for _ in prompt_ids]
    return G.Tree(prompt_ids, thought_ids, forced, answer_ids, thoughts, answers, ended)


def step_through_train_step(distributed: bool) -> dict:
    """One grpo_ma.train_step on 2 prompts (T2A2, a thought per pass, fixed trees, varied rewards): in one
    process over both prompts, or, with `distributed`, in this process of two over its share, its forward in
    DistributedDataParallel and its counts summed as grpo_ma_run hands them in. Returns the gradient and the
    step's metrics."""
    G.sample_tree = fixed_tree
    cfg = G.Config(thoughts=2, answers=2, prompts_per_step=2, warmup_steps=0, micro_batch_tokens=1, beta=0.0)
    cfg = dataclasses.replace(cfg, temperature=0.7, grad_clip=1e9, device="cpu")
    run = G.start_run(cfg, reward_fns=REWARDS)
    processes = G.Processes()
    if distributed:
        processes = G.Processes(dist.get_rank(), dist.get_world_size(), R.sum_over_processes)
        run.forward = torch.nn.parallel.DistributedDataParallel(run.forward)
    optimizer = torch.optim.SGD(run.policy.parameters(), lr=0.0)
    record = G.train_step(1, run, optimizer, G.Progress(), None, cfg, processes)
    grads = {name: p.grad.clone() for name, p in run.policy.named_parameters()}
    return {"grads": grads, "record": {k: v for k, v in record.items() if not k.endswith("seconds")}}


def torchrun(script: Path, *args, timeout=300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script), *args]
    environment = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=environment)


def test_train_step_in_two_processes_is_one_process_over_both_trees(tmp_path, monkeypatch):
    """train_step itself under torchrun: each process takes one prompt, DDP averages the gradients and the
    normaliser and metrics are summed over both, so the gradient and every metric are those of one process
    that grew both trees."""
    script = tmp_path / "ddp_step.py"
    script.write_text(DDP_STEP)
    result = torchrun(script, str(tmp_path / "step.pt"), str(Path(__file__).parent))
    assert result.returncode == 0, result.stderr[-3000:]
    distributed = torch.load(tmp_path / "step.pt")
    monkeypatch.setattr(G, "sample_tree", G.sample_tree)  # step_through_train_step replaces it
    single = step_through_train_step(distributed=False)
    assert single["record"]["reward_std"] > 0 and single["record"]["grad_norm"] > 0
    assert distributed["record"].keys() == single["record"].keys()
    for key, value in single["record"].items():
        assert distributed["record"][key] == (value if value is None else pytest.approx(value, rel=1e-5)), key
    for name, grad in single["grads"].items():
        torch.testing.assert_close(distributed["grads"][name], grad, rtol=1e-5, atol=1e-7)


DDP_RUN = """
import sys
sys.path.insert(0, sys.argv[1])
from conftest import REWARDS
import grpo_ma_run as R
R.train(R.parse_args(sys.argv[2:]), reward_fns=REWARDS)
"""


def test_two_process_run_resumed_ends_bit_exact(tmp_path):
    """Under torchrun a checkpoint holds every process's RNG streams: 2 steps, then --resume to 3, ends with
    the weights, optimizer moments and metrics of 3 straight steps. (Both evaluate every step: a run's last
    step evaluates, and sampled evaluation draws from rank 0's stream.)"""
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_RUN)
    flags = [*TINY_TORCHRUN, "--save-every", "1", "--eval-every", "1"]
    tests = str(Path(__file__).parent)
    for out, steps, extra in (("straight", "3", ()), ("parts", "2", ()), ("parts", "3", ("--resume",))):
        result = torchrun(script, tests, *flags, "--steps", steps, "--out", str(tmp_path / out), *extra)
        assert result.returncode == 0, result.stderr[-3000:]
    straight, parts = (load_checkpoint(tmp_path / name) for name in ("straight", "parts"))
    assert len(straight["rng"]) == 2 and straight["progress"]["step"] == 3
    assert_same_tensors(straight["model"], parts["model"])
    for slot, moments in straight["optimizer"]["state"].items():
        assert torch.equal(moments["exp_avg"], parts["optimizer"]["state"][slot]["exp_avg"])
    timing = ("rollout_seconds", "train_seconds")
    lines = [
        [{k: v for k, v in line.items() if k not in timing} for line in read_metrics(tmp_path / name)]
        for name in ("straight", "parts")
    ]
    assert lines[0] == lines[1] and all(line["grad_norm"] > 0 for line in lines[0][1:])


TINY_TORCHRUN = [
    "--device",
    "cpu",
    "--thoughts",
    "2",
    "--answers",
    "2",
    "--warmup-steps",
    "5",
    "--eval-size",
    "4",
]


def test_torchrun_run_writes_one_metrics_line_per_step_and_a_loadable_final_model(tmp_path):
    out = tmp_path / "run"
    flags = ["--device", "cpu", "--thoughts", "2", "--answers", "2", "--steps", "2", "--warmup-steps", "5"]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "grpo_ma_run.py"]
    result = subprocess.run(
        [*command, *flags, "--eval-size", "8", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert [line["step"] for line in read_metrics(out)] == [0, 1, 2]
    assert json.loads((out / "summary.json").read_text())["processes"] == 2
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    reference = torch.load(out / "reference.pt")
    assert set(model.state_dict()) >= set(reference)


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
