"""Training evidence (paper_figures/README.md): every run behind the training figures, then the figures and
tables.

    python -m paper_figures.training [--fast] [--jobs N]      (python -m paper_figures runs this too)

Groups of runs (each a list of (label, seed, Config changes) on top of the embedded default, warm-started):
    ablation     T16A1, T4A1, T4A2, T4A4, T4A8              -> gradient spikes, T x A ablation, cost figures
    answer_pool  T4A4 with --answer-pool all vs thought
    kl           constant beta 0 / 0.04 / 0.1 vs GRPO-D (0, 0.02) and (0.04, 0.10), T4A4
    rewards      accuracy+format vs StepRAR vs StepRVR vs both, T4A4
    methods      start, SFT, GRPO (T16A1), GRPO-D, GRPO-MA (T4A4), GRPO-MA + GRPO-D; same- and cross-task eval

Every run is cached (paper_figures/runs.py); the numbers go to RESULTS/training.json and training_runs.csv,
the figures (plots.py) and the markdown tables (tables.py) are drawn from those files only.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import multiprocessing
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from grpo_ma_run import RunConfig as Config  # every grpo_ma.Config field, and the run's
from paper_figures import common, runs, tables

GROUPS = ("ablation", "answer_pool", "kl", "rewards", "methods")
CROSS_TASK = "muladd"  # uses '*', which the addsub training family never writes


@dataclass(frozen=True)
class Plan:
    """How much to run. `base` holds extra Config changes for every run and warm start (tests shrink it)."""

    name: str
    steps: int
    eval_every: int
    eval_size: int
    ablation_seeds: tuple[int, ...]  # T x A ablation, gradient spikes, cost, answer pool
    compare_seeds: tuple[int, ...]  # beta sweep, rewards, methods
    check_warm_start: bool = True  # retrain one warm-up through plain grpo_ma.train and compare
    base: tuple[tuple[str, object], ...] = ()
    groups: tuple[str, ...] = GROUPS


FAST = Plan("fast", steps=60, eval_every=10, eval_size=200, ablation_seeds=(0, 1, 2), compare_seeds=(0,))
FULL = Plan(
    "full", steps=300, eval_every=20, eval_size=200, ablation_seeds=(0, 1, 2, 3, 4), compare_seeds=(0, 1, 2)
)

TREES = {"T16A1": (16, 1), "T4A1": (4, 1), "T4A2": (4, 2), "T4A4": (4, 4), "T4A8": (4, 8)}
GRPO_D = {"kl_schedule": "dynamic", "beta_min": 0.04, "beta_max": 0.10}  # the default pair of Config
GROUP_SETTINGS = {
    "answer_pool": [("all K·M answers", {}), ("one thought's M answers", {"answer_pool": "thought"})],
    "kl": [
        ("β = 0", {"beta": 0.0}),
        ("β = 0.04", {}),
        ("β = 0.1", {"beta": 0.1}),
        ("GRPO-D (0, 0.02)", {"kl_schedule": "dynamic", "beta_min": 0.0, "beta_max": 0.02}),
        ("GRPO-D (0.04, 0.10)", dict(GRPO_D)),
    ],
    "rewards": [
        ("accuracy + format", {}),
        ("StepRAR + format", {"reward": "steprar,format"}),
        ("accuracy + format + StepRVR", {"reward": "accuracy,format,steprvr"}),
        ("StepRAR + format + StepRVR", {"reward": "steprar,format,steprvr"}),
    ],
    "methods": [
        ("GRPO (T16A1)", {"thoughts": 16, "answers": 1}),
        ("GRPO-D (T16A1)", {"thoughts": 16, "answers": 1, **GRPO_D}),
        ("GRPO-MA (T4A4)", {}),
        ("GRPO-MA + GRPO-D (T4A4)", dict(GRPO_D)),
    ],
}
GROUP_TITLES = {
    "ablation": "T×A ablation",
    "answer_pool": "answer-advantage pool (T4A4)",
    "kl": "KL weight: constant β vs GRPO-D (T4A4)",
    "rewards": "rewards (T4A4)",
    "methods": "SFT vs GRPO vs GRPO-D vs GRPO-MA",
}

# Seconds on the 2-core CPU this was written on, one torch thread per process (measured, rounded up):
# one optimizer step at 8 prompts per tree shape, one warm-up step of 64 examples, one held-out prompt
# evaluated greedy + sampled, and the fixed cost of a run (loading, checkpoints).
STEP_SECONDS = {(16, 1): 0.85, (4, 1): 0.27, (4, 2): 0.34, (4, 4): 0.5, (4, 8): 1.2}
WARMUP_STEP_SECONDS = 0.17
EVAL_PROMPT_SECONDS = 0.007
RUN_OVERHEAD_SECONDS = 3.0


# ------------------------------------------------------------------------------------------------
# what to run
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    group: str
    label: str
    seed: int
    changes: tuple[tuple[str, object], ...] = ()
    kind: str = "grpo"  # grpo | sft | start


def base_config(plan: Plan, seed: int) -> Config:
    """The embedded default with the plan's length and evaluation settings (warm-up fields included)."""
    return dataclasses.replace(
        Config(),
        **dict(plan.base),
        seed=seed,
        steps=plan.steps,
        eval_every=plan.eval_every,
        eval_size=plan.eval_size,
    )


def run_config(plan: Plan, spec: Spec, start_folder: Path) -> Config:
    return dataclasses.replace(
        base_config(plan, spec.seed), model=str(start_folder), warmup_steps=0, **dict(spec.changes)
    )


def specs(plan: Plan) -> list[Spec]:
    """Every entry of every group; one run can serve several groups (the T4A4 default serves all five)."""
    out = []
    for group in plan.groups:
        seeds = plan.ablation_seeds if group in ("ablation", "answer_pool") else plan.compare_seeds
        for seed in seeds:
            if group == "ablation":
                out += [
                    Spec(group, label, seed, (("thoughts", k), ("answers", m)))
                    for label, (k, m) in TREES.items()
                ]
                continue
            if group == "methods":
                base = base_config(plan, seed)
                out.append(Spec(group, "start policy", seed, kind="start"))
                out.append(
                    Spec(
                        group,
                        f"SFT (lr {base.warmup_lr:g}, {base.warmup_batch}/step)",
                        seed,
                        (("sft_lr", base.warmup_lr), ("sft_batch", base.warmup_batch)),
                        kind="sft",
                    )
                )
                out.append(
                    Spec(
                        group,
                        f"SFT (lr {base.lr:g}, {base.prompts_per_step}/step)",
                        seed,
                        (("sft_lr", base.lr), ("sft_batch", base.prompts_per_step)),
                        kind="sft",
                    )
                )
            out += [
                Spec(group, label, seed, tuple(changes.items())) for label, changes in GROUP_SETTINGS[group]
            ]
    return out


def seeds_of(plan: Plan) -> list[int]:
    return sorted({s.seed for s in specs(plan)})


# ------------------------------------------------------------------------------------------------
# running: warm starts first, then every run not in the cache (in worker processes when jobs > 1)
# ------------------------------------------------------------------------------------------------
def _start_description(plan: Plan, seed: int) -> dict:
    return runs.start_description(dataclasses.replace(base_config(plan, seed), model="embedded"))


def _sft_settings(spec: Spec) -> tuple[float, int]:
    changes = dict(spec.changes)
    return changes["sft_lr"], changes["sft_batch"]


def _sft_families(plan: Plan, seed: int) -> tuple[str, ...]:
    return tuple(dict.fromkeys((base_config(plan, seed).task, CROSS_TASK)))


def _task_seconds(plan: Plan, task: tuple) -> float:
    kind = task[0]
    cfg = task[1]
    base = base_config(plan, cfg.seed)
    if kind in ("warm", "check"):
        return base.warmup_steps * WARMUP_STEP_SECONDS * base.warmup_batch / 64 + RUN_OVERHEAD_SECONDS
    evals = (cfg.steps // cfg.eval_every + 2) * cfg.eval_size
    if kind == "sft":
        return cfg.steps * WARMUP_STEP_SECONDS * task[4] / 64 + 4 * cfg.eval_size * EVAL_PROMPT_SECONDS
    k = cfg.thoughts
    m = cfg.answers
    step = STEP_SECONDS.get((k, m), 0.004 * (k + k * m) * 8) * cfg.prompts_per_step / 8
    return cfg.steps * step + evals * EVAL_PROMPT_SECONDS + RUN_OVERHEAD_SECONDS


def pending_tasks(plan: Plan, cache_dir: Path) -> tuple[list[tuple], list[tuple]]:
    """(warm starts to make, runs to train), each a picklable task tuple, skipping whatever is cached."""
    warm = []
    work = []
    for seed in seeds_of(plan):
        base = base_config(plan, seed)
        folder = runs.warm_start_folder(seed, cache_dir, base)
        if not (folder / "done.json").exists():
            warm.append(("warm", base, str(cache_dir)))
    if plan.check_warm_start:
        base = base_config(plan, min(seeds_of(plan)))
        if not runs.check_done(base, cache_dir):
            work.append(("check", base, str(cache_dir)))
    for spec in specs(plan):
        if spec.kind == "start":
            continue
        folder = runs.warm_start_folder(spec.seed, cache_dir, base_config(plan, spec.seed))
        start = _start_description(plan, spec.seed)
        if spec.kind == "sft":
            lr, batch = _sft_settings(spec)
            cfg = run_config(plan, dataclasses.replace(spec, changes=()), folder)
            task = ("sft", cfg, str(cache_dir), lr, batch, _sft_families(plan, spec.seed))
            done = runs.sft_run_dir(cfg, cache_dir, start, lr, batch, task[5]) / "summary.json"
        else:
            cfg = run_config(plan, spec, folder)
            task = ("grpo", cfg, str(cache_dir))
            done = runs.grpo_run_dir(cfg, cache_dir, start) / "summary.json"
        if not done.exists() and task not in work:
            work.append(task)
    return warm, work


def estimate_seconds(plan: Plan, cache_dir: Path, jobs: int) -> dict:
    warm, work = pending_tasks(plan, cache_dir)
    total = sum(_task_seconds(plan, t) for t in warm + work)
    # `jobs` workers share the work; no worker waits except at the end, behind the last long task
    wall = total / jobs + max((_task_seconds(plan, t) for t in warm + work), default=0) * (1 - 1 / jobs) / 2
    return {"warm_starts": len(warm), "runs": len(work), "cpu_seconds": total, "wall_seconds": wall}


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _execute(task: tuple) -> str:
    """Do one task in this process; the results land in the cache."""
    kind = task[0]
    cfg = task[1]
    cache_dir = Path(task[2])
    if kind == "warm":
        runs.warm_start(cfg.seed, cache_dir, cfg)
        return f"warm start seed {cfg.seed}"
    if kind == "check":
        runs.check_warm_start(runs.warm_start_folder(cfg.seed, cache_dir, cfg), cfg, cache_dir)
        return f"warm-start check seed {cfg.seed}"
    if kind == "sft":
        runs.run_sft(cfg, task[3], task[4], cache_dir, task[5])
        return f"SFT lr {task[3]:g} batch {task[4]} seed {cfg.seed}"
    runs.run_grpo(cfg, cache_dir)
    return f"T{cfg.thoughts}A{cfg.answers} {describe_changes(cfg)} seed {cfg.seed}"


def describe_changes(cfg: Config) -> str:
    default = Config()
    keys = ("answer_pool", "beta", "kl_schedule", "beta_min", "beta_max", "reward")
    return (
        " ".join(f"{k}={getattr(cfg, k)}" for k in keys if getattr(cfg, k) != getattr(default, k))
        or "default"
    )


def run_all(plan: Plan, cache_dir: Path, jobs: int, threads: int) -> None:
    """Make the warm starts, then train every pending run, `jobs` at a time, longest first; a run starts as
    soon as its seed's warm start exists."""
    warm, work = pending_tasks(plan, cache_dir)
    queue = warm + sorted(work, key=lambda t: -_task_seconds(plan, t))
    unready_seeds = {t[1].seed for t in warm}
    started = time.time()
    total = len(queue)
    done = 0

    def report(what: str) -> None:
        nonlocal done
        done += 1
        print(f"  [{done}/{total}] {what}  ({time.time() - started:.0f} s)", flush=True)

    if jobs <= 1:
        _init_worker(threads)
        for task in queue:
            report(_execute(task))
        return
    context = multiprocessing.get_context("spawn")  # torch is not fork-safe once it has threads
    with ProcessPoolExecutor(
        max_workers=jobs, mp_context=context, initializer=_init_worker, initargs=(threads,)
    ) as pool:
        running = {}
        while queue or running:
            while len(running) < jobs:
                task = next((t for t in queue if t[0] == "warm" or t[1].seed not in unready_seeds), None)
                if task is None:
                    break
                queue.remove(task)
                running[pool.submit(_execute, task)] = task
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                task = running.pop(future)
                report(future.result())
                if task[0] == "warm":
                    unready_seeds.discard(task[1].seed)


# ------------------------------------------------------------------------------------------------
# collecting: every number the figures and tables use, from the cache into one results file
# ------------------------------------------------------------------------------------------------
PER_STEP = (
    "grad_norm",
    "gss",
    "tokens_generated",
    "reward_mean",
    "train_accuracy",
    "kl",
    "beta",
    "zero_std_thought_frac",
    "zero_std_answer_frac",
    "truncated_frac",
    "thought_len",
    "answer_len",
)


def _round(x, digits: int = 6):
    return None if x is None else round(float(x), digits)


def grpo_record(run: dict, cfg: Config) -> dict:
    """A finished run as the results file keeps it: its per-step series, eval curve and summary numbers."""
    steps = [m for m in run["metrics"] if m["step"] > 0]
    evals = [m for m in run["metrics"] if m.get("eval_greedy_accuracy") is not None]
    grad = np.array([m["grad_norm"] for m in steps], dtype=float)
    step_seconds = [m["rollout_seconds"] + m["train_seconds"] for m in steps]
    summary = run["summary"]
    stats = {
        "start_greedy_accuracy": summary["start_greedy_accuracy"],
        "final_greedy_accuracy": summary["final_greedy_accuracy"],
        "start_sampled_accuracy": summary["start_sampled_accuracy"],
        "final_sampled_accuracy": summary["final_sampled_accuracy"],
        "gss_over_10": summary["gss_over_10"],
        "grad_norm_p99": _round(np.percentile(grad, 99)) if len(grad) else None,
        "grad_norm_max": _round(grad.max()) if len(grad) else None,
        "grad_norm_median": _round(np.median(grad)) if len(grad) else None,
        "gss_max": _round(max((m["gss"] for m in steps if m["gss"] is not None), default=None)),
        "mean_step_seconds": _round(np.mean(step_seconds)) if steps else None,
        "mean_rollout_seconds": _round(np.mean([m["rollout_seconds"] for m in steps])) if steps else None,
        "mean_train_seconds": _round(np.mean([m["train_seconds"] for m in steps])) if steps else None,
        "mean_tokens_per_step": _round(np.mean([m["tokens_generated"] for m in steps])) if steps else None,
        "run_seconds": _round(tables.wall_seconds(summary), 1),
        "device": summary["device"],
    }
    return {
        "kind": "grpo",
        "key": run["key"],
        "seed": cfg.seed,
        "tree": f"T{cfg.thoughts}A{cfg.answers}",
        "grpo_ma_sha256": run["provenance"].get("grpo_ma_sha256"),
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k not in runs.NOT_IN_KEY | {"model"}},
        "stats": stats,
        "curve": {
            "step": [m["step"] for m in evals],
            "greedy": [m["eval_greedy_accuracy"] for m in evals],
            "sampled": [m["eval_sampled_accuracy"] for m in evals],
        },
        "per_step": {
            "step": [m["step"] for m in steps],
            "step_seconds": [_round(s) for s in step_seconds],
            **{k: [_round(m[k]) for m in steps] for k in PER_STEP},
        },
    }


def collect(plan: Plan, cache_dir: Path, threads: int) -> dict:
    """Read every run of the plan from the cache (evaluating final policies on the cross-task family, which
    is cached too) into the results dict."""
    torch.set_num_threads(threads)
    records = {}
    groups = {g: {"title": GROUP_TITLES[g], "labels": [], "entries": []} for g in plan.groups}
    for spec in specs(plan):
        base = base_config(plan, spec.seed)
        folder = runs.warm_start_folder(spec.seed, cache_dir, base)
        families = _sft_families(plan, spec.seed)
        entry = {"label": spec.label, "seed": spec.seed}
        if spec.kind == "start":
            cfg = run_config(plan, dataclasses.replace(spec, changes=()), folder)
            key = f"start_seed{spec.seed}_{folder.name}"
            made = json.loads((folder / "done.json").read_text())
            records[key] = {
                "kind": "start",
                "key": key,
                "seed": spec.seed,
                "warm_up_seconds": made["seconds"],
                "grpo_ma_sha256": made.get("provenance", {}).get("grpo_ma_sha256"),
            }
            entry["eval"] = {
                f: runs.eval_policy(cfg, f, folder / f"eval_{f}_{runs.cache_key(cfg, 'eval')}.json")
                for f in families
            }
        elif spec.kind == "sft":
            lr, batch = _sft_settings(spec)
            cfg = run_config(plan, dataclasses.replace(spec, changes=()), folder)
            run = runs.run_sft(cfg, lr, batch, cache_dir, families)
            key = run["key"]
            records[key] = {
                "kind": "sft",
                "key": key,
                "seed": spec.seed,
                "sft_lr": lr,
                "sft_batch": batch,
                "steps": cfg.steps,
                "train_seconds": _round(run["summary"]["train_seconds"], 2),
                "grpo_ma_sha256": run["summary"].get("provenance", {}).get("grpo_ma_sha256"),
            }
            entry["eval"] = run["summary"]["eval"]
        else:
            cfg = run_config(plan, spec, folder)
            run = runs.run_grpo(cfg, cache_dir)
            key = run["key"]
            records.setdefault(key, grpo_record(run, cfg))
            if spec.group == "methods":
                entry["eval"] = {
                    f: runs.eval_policy(
                        cfg, f, Path(run["dir"]) / f"eval_{f}.json", Path(run["dir"]) / "checkpoint.pt"
                    )
                    for f in families
                }
        entry["key"] = key
        group = groups[spec.group]
        group["entries"].append(entry)
        if spec.label not in group["labels"]:
            group["labels"].append(spec.label)
    results = {
        "plan": dataclasses.asdict(plan),
        "environment": runs.environment(),
        "base_config": {
            k: v
            for k, v in dataclasses.asdict(base_config(plan, 0)).items()
            if k not in runs.NOT_IN_KEY | {"model", "seed"}
        },
        "cross_task": CROSS_TASK,
        "groups": groups,
        "runs": records,
    }
    made_with = sorted({str(r["grpo_ma_sha256"]) for r in records.values()})
    results["grpo_ma_sha256_of_runs"] = made_with
    if made_with != [runs.grpo_ma_sha256()]:
        print(
            f"WARNING: cached runs were made with grpo_ma.py {made_with}, the file now is "
            f"{runs.grpo_ma_sha256()}: delete {cache_dir} (or bump runs.CACHE_VERSION) to rerun them"
        )
    if plan.check_warm_start:
        seed = min(seeds_of(plan))
        base = base_config(plan, seed)
        check = runs.check_warm_start(runs.warm_start_folder(seed, cache_dir, base), base, cache_dir)
        # the same start accuracy measured inside a warm-started grpo_ma.train run (the T4A4 default)
        warm_run = runs.run_grpo(
            run_config(plan, Spec("", "", seed), runs.warm_start_folder(seed, cache_dir, base)), cache_dir
        )
        check["warm_started_train_start_greedy_accuracy"] = warm_run["summary"]["start_greedy_accuracy"]
        # sampled accuracy draws from the global torch stream, which the two paths reach in different states
        check["warm_started_train_start_sampled_accuracy"] = warm_run["summary"]["start_sampled_accuracy"]
        results["warm_start_check"] = check
    return results


def _seconds_of(record: dict) -> float:
    if record["kind"] == "grpo":
        return record["stats"]["run_seconds"]
    if record["kind"] == "sft":
        return record["train_seconds"]
    return record["warm_up_seconds"]


def write_results(results: dict, results_dir: Path) -> tuple[Path, Path]:
    """training.json (everything) and training_runs.csv (one row per group entry)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / "training.json"
    csv_path = results_dir / "training_runs.csv"
    json_path.write_text(json.dumps(results, indent=1))
    columns = [
        "group",
        "label",
        "seed",
        "key",
        "tree",
        "start_greedy_accuracy",
        "final_greedy_accuracy",
        "final_sampled_accuracy",
        "same_task_greedy",
        "cross_task_greedy",
        "gss_over_10",
        "grad_norm_p99",
        "mean_step_seconds",
        "mean_tokens_per_step",
        "device",
    ]
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for group, data in results["groups"].items():
            for entry in data["entries"]:
                record = results["runs"][entry["key"]]
                row = {
                    "group": group,
                    "label": entry["label"],
                    "seed": entry["seed"],
                    "key": entry["key"],
                    "tree": record.get("tree", record["kind"]),
                    **record.get("stats", {}),
                }
                if "eval" in entry:
                    families = list(entry["eval"])
                    row["same_task_greedy"] = entry["eval"][families[0]]["greedy"]
                    row["cross_task_greedy"] = entry["eval"].get(results["cross_task"], {}).get("greedy")
                writer.writerow({c: row.get(c, "") for c in columns})
    return json_path, csv_path


def main(
    fast: bool = False,
    out_dir=common.OUT_DIR,
    results_dir=common.RESULTS_DIR,
    cache_dir=common.CACHE_DIR,
    jobs: int = 2,
    threads: int = 1,
    plan: Plan | None = None,
) -> dict:
    """Run (or read from the cache) every training run, write the results, draw the figures and tables."""
    from paper_figures import plots

    plan = plan or (FAST if fast else FULL)
    started = time.time()
    out_dir = Path(out_dir)
    results_dir = Path(results_dir)
    cache_dir = Path(cache_dir)
    estimate = estimate_seconds(plan, cache_dir, jobs)
    print(
        f"training evidence ({plan.name}): {estimate['warm_starts']} warm starts and {estimate['runs']} runs "
        f"to do, about {estimate['cpu_seconds'] / 60:.1f} CPU-minutes = "
        f"{estimate['wall_seconds'] / 60:.1f} min with {jobs} job(s) on an otherwise idle 2-core CPU",
        flush=True,
    )
    run_all(plan, cache_dir, jobs, threads)
    compute_seconds = time.time() - started
    results = collect(plan, cache_dir, threads)
    # this call's time (near 0 when everything was cached) and the time the cached runs took when they ran
    results["seconds"] = {
        "this_call_compute": round(compute_seconds, 1),
        "this_call_estimate_wall": round(estimate["wall_seconds"], 1),
        "runs_when_computed": round(sum(_seconds_of(r) for r in results["runs"].values()), 1),
        "jobs": jobs,
        "threads_per_job": threads,
    }
    json_path, csv_path = write_results(results, results_dir)
    figures = plots.make_all(results, out_dir)
    markdown = tables.write_tables(json_path, results_dir / "tables.md")
    print(
        f"training figures -> {', '.join(str(out_dir / f) for f in figures)} (.png, .pdf); numbers -> "
        f"{json_path}, {csv_path}; tables -> {results_dir / 'tables.md'} ({time.time() - started:.0f} s)"
    )
    results["markdown"] = markdown
    return results


def cli(argv=None) -> dict:
    """`python -m paper_figures.training`: the shared flags of paper_figures.common."""
    args = common.parser(
        "python -m paper_figures.training",
        __doc__,
        "fast",
        "out_dir",
        "results_dir",
        "cache_dir",
        "jobs",
        "threads",
        helps={"fast": "CPU setting: short runs, fewer seeds (paper_figures/README.md gives the time)"},
    ).parse_args(argv)
    return main(args.fast, args.out_dir, args.results_dir, args.cache_dir, args.jobs, args.threads)


if __name__ == "__main__":
    cli()
