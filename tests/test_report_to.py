"""--report-to: the live view gets the same numbers as metrics.jsonl, under the same names, and the packages
stay optional. tensorboard is a test extra, so its events are written and read back for real; wandb is not
installed here, so a stand-in module records what the run sends it (and checks it stays offline)."""

import importlib.machinery
import json
import sys
import types

import pytest
from test_runs import refused, tiny_args, train_with_varying_reward

import grpo_ma_run as R

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def read_metrics(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


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
