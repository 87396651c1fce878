"""grpo_ma.py on its own: copied alone into an empty folder, its command and its train() train the embedded
default; it imports nothing of this repository; and grpo_ma_run's loop, which adds checkpoints, resume and
live views, trains exactly what grpo_ma's plain loop trains. Runs train with `answer_length`, a reward that
varies from the first step."""

import ast
import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import LEARNING, REWARDS, assert_same_tensors, read_metrics, tiny_config

import grpo_ma as G
import grpo_ma_run as R

REPO = Path(G.__file__).resolve().parent

pytestmark = pytest.mark.usefixtures("one_torch_thread")


STANDALONE = """
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

import grpo_ma

assert Path(grpo_ma.__file__).parent == Path.cwd(), grpo_ma.__file__  # the copy, not the repository's


def answer_length(prompts, thoughts, answers, examples):
    return [len(answer) / 10 for answer in answers]


tiny = dict(thoughts=2, answers=2, prompts_per_step=2, warmup_steps=5, eval_size=4, device="cpu")
for steps in (0, 2):
    grpo_ma.train(grpo_ma.Config(steps=steps, out=f"run{steps}", **tiny), reward_fns=[(answer_length, 1.0)])
start, trained = (load_file(f"run{steps}/final/model.safetensors") for steps in (0, 2))
assert any(not torch.equal(start[name], trained[name]) for name in start), "the steps moved no weight"
repo = sys.argv[1]
files = [getattr(module, "__file__", None) or "" for module in list(sys.modules.values())]
mine = [path for path in files if path.startswith(repo) and "site-packages" not in path]
assert not mine, mine
"""


def test_grpo_ma_py_copied_alone_into_an_empty_folder_trains(tmp_path):
    """grpo_ma.py runs alone: copied by itself into an empty folder, its command trains the embedded default
    (exit 0, one metrics line per step), its train() moves the weights when rewards vary, and nothing of
    this repository but that one file is imported."""
    shutil.copy(REPO / "grpo_ma.py", tmp_path / "grpo_ma.py")
    (tmp_path / "standalone.py").write_text(STANDALONE)
    flags = ["--thoughts", "2", "--answers", "2", "--prompts-per-step", "2", "--steps", "2"]
    flags += ["--warmup-steps", "5", "--eval-size", "4", "--device", "cpu", "--out", "cli"]
    environment = os.environ | {"OMP_NUM_THREADS": "1"}
    command = subprocess.run(
        [sys.executable, "grpo_ma.py", *flags], cwd=tmp_path, capture_output=True, text=True, env=environment
    )
    assert command.returncode == 0, command.stderr[-2000:]
    assert [line["step"] for line in read_metrics(tmp_path / "cli")] == [0, 1, 2]
    script = subprocess.run(
        [sys.executable, "standalone.py", str(REPO)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=environment,
    )
    assert script.returncode == 0, script.stderr[-2000:]


def test_grpo_ma_py_imports_nothing_of_this_repository():
    modules = {"grpo_ma_run", "theory", "paper_figures", "demos", "tests"}
    tree = ast.parse((REPO / "grpo_ma.py").read_text())
    imported = {
        alias.name.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
    }
    imported |= {
        node.module.split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module
    }
    assert not imported & modules


def test_grpo_ma_run_trains_exactly_what_grpo_ma_trains(tmp_path):
    """The run file adds checkpoints, resume and live views, none of which changes what a step computes:
    the same settings give the same metrics (bar the seconds) and the same final weights."""
    from safetensors.torch import load_file

    run_cfg = tiny_config(tmp_path / "run", **LEARNING)
    plain = {field.name: getattr(run_cfg, field.name) for field in dataclasses.fields(G.Config)}
    G.train(G.Config(**(plain | {"out": str(tmp_path / "plain")})), reward_fns=REWARDS)
    R.train(run_cfg, reward_fns=REWARDS)
    timing = ("rollout_seconds", "train_seconds")
    lines = [
        [{k: v for k, v in line.items() if k not in timing} for line in read_metrics(tmp_path / name)]
        for name in ("plain", "run")
    ]
    assert lines[0] == lines[1] and len(lines[0]) == LEARNING["steps"] + 1
    weights = [load_file(tmp_path / name / "final" / "model.safetensors") for name in ("plain", "run")]
    assert_same_tensors(weights[0], weights[1])
