"""The embedded default, `python grpo_ma.py --seed S`, for seeds 0, 1, 2: held-out accuracy before and after
GRPO-MA and the wall-clock time of each run. Writes RESULTS/default_runs.{json,md}; with --lora-rank R the
runs are `python grpo_ma.py --seed S --lora-rank R` and go to RESULTS/default_runs_lora{R}.{json,md}.

    python -m paper_figures.default_runs            # reuses runs/default_seed{S}/ when already finished
    python -m paper_figures.default_runs --rerun    # trains again (paper_figures/README.md gives the time)
    python -m paper_figures.default_runs --lora-rank 8    # the same runs training LoRA adapters only
"""

import contextlib
import dataclasses
import io
import json
import platform
from pathlib import Path

import torch
import transformers

import grpo_ma_run
from paper_figures import common
from paper_figures.tables import runs_table


def run_seed(seed: int, runs_dir: Path, rerun: bool, quiet: bool = False, lora_rank: int = 0) -> dict:
    """Train (or reuse) one default run; a finished run whose config matches the default is reused."""
    name = f"default_lora{lora_rank}_seed{seed}" if lora_rank else f"default_seed{seed}"
    cfg = grpo_ma_run.RunConfig(seed=seed, lora_rank=lora_rank, out=str(runs_dir / name))
    out = Path(cfg.out)
    finished = (out / "summary.json").exists() and (out / "config.json").exists()
    if finished and not rerun:
        saved = json.loads((out / "config.json").read_text())
        wanted = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "overwrite")}
        if {k: v for k, v in saved.items() if k not in ("out", "overwrite")} == wanted:
            return json.loads((out / "summary.json").read_text())
    cfg = dataclasses.replace(cfg, overwrite=True)  # a stale or different run in the folder is replaced
    if not quiet:
        return grpo_ma_run.train(cfg)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return grpo_ma_run.train(cfg)


def main(argv=None) -> list[dict]:
    parser = common.parser(
        "python -m paper_figures.default_runs",
        __doc__,
        "seeds",
        "results_dir",
        "quiet",
        helps={"quiet": "hide grpo_ma's progress bars; print only the table"},
    )
    parser.add_argument("--runs-dir", default="runs", help="where the runs live (default: %(default)s)")
    parser.add_argument("--rerun", action="store_true", help="train again even when a finished run exists")
    parser.add_argument("--lora-rank", type=int, default=0, help="train LoRA adapters of this rank (0: all)")
    args = parser.parse_args(argv)
    rows = [run_seed(s, Path(args.runs_dir), args.rerun, args.quiet, args.lora_rank) for s in args.seeds]
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    lora = f" --lora-rank {args.lora_rank}" if args.lora_rank else ""
    meta = {
        "command": f"python grpo_ma.py --seed S{lora}",
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    name = f"default_runs_lora{args.lora_rank}" if args.lora_rank else "default_runs"
    (results / f"{name}.json").write_text(json.dumps({"meta": meta, "runs": rows}, indent=2))
    (results / f"{name}.md").write_text(runs_table(rows))
    print(runs_table(rows))
    return rows


if __name__ == "__main__":
    main()
