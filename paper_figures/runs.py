"""Training runs for the paper figures, cached by configuration.

The supervised warm-up of the embedded model is deterministic per seed and is the slowest part of a short run,
so it is done ONCE per seed (`warm_start`), with exactly the seeding of `grpo_ma.train`, and saved with
`save_pretrained`. Every configuration then trains from that folder with `warmup_steps=0`; a saved embedded
tokenizer has no chat template, so the prompts are the same as in a run that warms up itself
(`check_warm_start` verifies it against a plain `grpo_ma.train`).

A run lives in CACHE/runs/<key>/, where <key> hashes every Config field that can change the result (and, for
a warm start, the warm-up that made it instead of the folder's path). A folder with summary.json is done: a
rerun only reads it. A run cut short resumes from its checkpoint (grpo_ma's --resume).
"""

import dataclasses
import hashlib
import json
import platform
import random
import time
from pathlib import Path

import torch

import grpo_ma
import grpo_ma_run
from grpo_ma_run import RunConfig as Config  # every grpo_ma.Config field, and the run's

# Config fields left out of the key: where a run writes, how often it checkpoints, resuming; and the device,
# since a cache lives on one machine (the device a run used is in its summary).
NOT_IN_KEY = frozenset({"out", "resume", "overwrite", "save_every", "device", "micro_batch_tokens"})
# Bump to invalidate every cached run after a change to grpo_ma.py that changes results (the results file
# lists the grpo_ma.py hash each run was made with; `collect` warns when it differs from the current file).
CACHE_VERSION = 3
WARM_START_FIELDS = ("seed", "task", "warmup_steps", "warmup_lr", "warmup_batch")


# ------------------------------------------------------------------------------------------------
# cache keys
# ------------------------------------------------------------------------------------------------
def start_description(cfg: Config) -> dict:
    """What a warm start folder holds, in Config terms (its path is not part of any key)."""
    return {"kind": "warm_start", **{f: getattr(cfg, f) for f in WARM_START_FIELDS}}


def cache_key(cfg: Config, kind: str = "grpo", start: dict | None = None, extra: dict | None = None) -> str:
    """A short hash of every result-changing field of `cfg` (the seed included) plus what the run starts
    from. `start` replaces cfg.model (a cache path) by the description of the warm start it points to."""
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in NOT_IN_KEY}
    if start is not None:
        fields["model"] = start
    payload = json.dumps(
        {"kind": kind, "version": CACHE_VERSION, "config": fields, "extra": extra or {}},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------
# the warm start: the supervised warm-up once per seed
# ------------------------------------------------------------------------------------------------
def warm_start_folder(seed: int, cache_dir: Path, base: Config | None = None) -> Path:
    """CACHE/start_seed{seed}_<hash of the warm-up settings>: only the warm-up's own settings name it."""
    description = start_description(dataclasses.replace(base or Config(), seed=seed))
    digest = hashlib.sha256(json.dumps({"version": CACHE_VERSION, **description}, sort_keys=True).encode())
    return Path(cache_dir) / f"start_seed{seed}_{digest.hexdigest()[:8]}"


def warm_start(seed: int, cache_dir: Path, base: Config | None = None, quiet: bool = True) -> Path:
    """Warm up the embedded model exactly as grpo_ma.train would (same seeding, same order of random draws)
    and save model + tokenizer. Returns the folder; an existing one is reused."""
    base = dataclasses.replace(base or Config(), seed=seed, model=grpo_ma.EMBEDDED)
    folder = warm_start_folder(seed, cache_dir, base)
    if (folder / "done.json").exists():
        return folder
    started = time.time()
    run = grpo_ma.start_run(base)  # the seeding and order of draws of grpo_ma.train
    folder.mkdir(parents=True, exist_ok=True)

    def warm_up_and_save():
        grpo_ma.supervised_warmup(run, base)
        run.policy.save_pretrained(folder)
        run.tokenizer.save_pretrained(folder)

    _quietly(warm_up_and_save, quiet)
    # the data stream after the warm-up, so continued SFT draws fresh examples instead of repeating them
    state = run.data_rng.getstate()
    (folder / "done.json").write_text(
        json.dumps(
            {
                **start_description(base),
                "seconds": round(time.time() - started, 1),
                "provenance": environment(),
                "data_rng_state": [state[0], list(state[1]), state[2]],
            }
        )
    )
    return folder


def warm_start_data_rng(folder: Path) -> random.Random:
    version, internal, gauss = json.loads((Path(folder) / "done.json").read_text())["data_rng_state"]
    rng = random.Random()
    rng.setstate((version, tuple(internal), gauss))
    return rng


# ------------------------------------------------------------------------------------------------
# runs
# ------------------------------------------------------------------------------------------------
def start_of(folder: Path) -> dict:
    """The warm-up a start folder holds (what a run's cache key records instead of the folder's path)."""
    saved = json.loads((Path(folder) / "done.json").read_text())
    return {k: v for k, v in saved.items() if k in ("kind", *WARM_START_FIELDS)}


def grpo_run_dir(cfg: Config, cache_dir: Path, start: dict) -> Path:
    return Path(cache_dir) / "runs" / cache_key(cfg, "grpo", start=start)


def sft_run_dir(
    cfg: Config, cache_dir: Path, start: dict, sft_lr: float, sft_batch: int, families: tuple[str, ...]
) -> Path:
    extra = {"sft_lr": sft_lr, "sft_batch": sft_batch, "families": list(families)}
    return Path(cache_dir) / "runs" / cache_key(cfg, "sft", start=start, extra=extra)


def run_grpo(cfg: Config, cache_dir: Path, quiet: bool = True) -> dict:
    """Train `cfg` (warmup_steps 0, model a warm start folder) unless the cache holds it. Returns
    {"key", "dir", "cached", "summary", "metrics": the per-step dicts of metrics.jsonl}."""
    if cfg.warmup_steps != 0:
        raise ValueError("a run from a warm start must have warmup_steps=0")
    out = grpo_run_dir(cfg, cache_dir, start_of(cfg.model))
    cached = (out / "summary.json").exists()
    if not cached:
        # a run cut short goes on from its checkpoint; one that died before its first starts over
        resume = (out / "checkpoint.pt").exists() or (out / "checkpoint.prev.pt").exists()
        cfg = dataclasses.replace(cfg, out=str(out), resume=resume, overwrite=not resume)
        _quietly(lambda: grpo_ma_run.train(cfg), quiet)
        (out / "provenance.json").write_text(json.dumps(environment()))
    provenance = out / "provenance.json"
    return {
        "key": out.name,
        "dir": str(out),
        "cached": cached,
        "summary": json.loads((out / "summary.json").read_text()),
        "metrics": [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()],
        "provenance": json.loads(provenance.read_text()) if provenance.exists() else {},
    }


def evaluate_both(run: grpo_ma.Run, examples, cfg: Config) -> dict:
    """Greedy and sampled held-out accuracy; the sampler is seeded so the number is reproducible."""
    torch.manual_seed(cfg.seed)
    accuracy = grpo_ma.evaluate(run, cfg, examples)
    return {"greedy": accuracy["eval_greedy_accuracy"], "sampled": accuracy["eval_sampled_accuracy"]}


def eval_policy(cfg: Config, family: str, store: Path, checkpoint: Path | None = None) -> dict:
    """Held-out accuracy (greedy, sampled) on `family` of the warm start cfg.model, or of the policy saved in
    a grpo_ma checkpoint; stored in `store` so a rerun only reads it."""
    if store.exists():
        return json.loads(store.read_text())
    run = _quietly(lambda: grpo_ma.start_run(cfg), True)  # cfg.model: the warm start folder
    if checkpoint is not None:
        run.policy.load_state_dict(
            torch.load(checkpoint, map_location=run.device, weights_only=True)["model"]
        )
    result = evaluate_both(run, grpo_ma.held_out_examples(cfg, family), cfg)
    store.write_text(json.dumps(result))
    return result


def run_sft(
    cfg: Config, sft_lr: float, sft_batch: int, cache_dir: Path, families: tuple[str, ...], quiet: bool = True
) -> dict:
    """Continued supervised fine-tuning from the warm start for cfg.steps steps (grpo_ma.supervised_warmup on
    fresh examples), then held-out accuracy on each family with grpo_ma.evaluate."""
    start_folder = Path(cfg.model)
    out = sft_run_dir(cfg, cache_dir, start_of(start_folder), sft_lr, sft_batch, families)
    key = out.name
    if (out / "summary.json").exists():
        return {
            "key": key,
            "dir": str(out),
            "cached": True,
            "summary": json.loads((out / "summary.json").read_text()),
        }
    started = time.time()
    run = _quietly(lambda: grpo_ma.start_run(cfg), True)  # cfg.model: the warm start folder
    run.data_rng = warm_start_data_rng(start_folder)
    sft_cfg = dataclasses.replace(cfg, warmup_steps=cfg.steps, warmup_lr=sft_lr, warmup_batch=sft_batch)
    _quietly(lambda: grpo_ma.supervised_warmup(run, sft_cfg), quiet)
    train_seconds = time.time() - started
    summary = {
        "steps": cfg.steps,
        "seed": cfg.seed,
        "sft_lr": sft_lr,
        "sft_batch": sft_batch,
        "train_seconds": train_seconds,
        "provenance": environment(),
        "eval": {f: evaluate_both(run, grpo_ma.held_out_examples(cfg, f), cfg) for f in families},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return {"key": key, "dir": str(out), "cached": False, "summary": summary}


def check_dir(base: Config, cache_dir: Path) -> Path:
    base = dataclasses.replace(base, model=grpo_ma.EMBEDDED, steps=0)
    return Path(cache_dir) / f"check_seed{base.seed}_{cache_key(base, 'check')}"


def check_done(base: Config, cache_dir: Path) -> bool:
    return (check_dir(base, cache_dir) / "check.json").exists()


def check_warm_start(start_folder: Path, base: Config, cache_dir: Path) -> dict:
    """Run plain grpo_ma.train (its own warm-up, 0 RL steps) with the warm start's seed and warm-up settings
    and compare: the weights must be identical, and so the greedy start accuracy."""
    out = check_dir(base, cache_dir)
    base = dataclasses.replace(base, model=grpo_ma.EMBEDDED, steps=0)
    if not (out / "check.json").exists():
        plain = _quietly(
            lambda: grpo_ma_run.train(dataclasses.replace(base, out=str(out), overwrite=True)), True
        )
        reference = torch.load(out / "reference.pt", map_location="cpu")
        warm_cfg = dataclasses.replace(base, model=str(start_folder), warmup_steps=0)
        run = _quietly(lambda: grpo_ma.start_run(warm_cfg), True)
        saved = run.policy.state_dict()
        max_diff = max((reference[k].float() - saved[k].float().cpu()).abs().max().item() for k in reference)
        warm_greedy = grpo_ma.evaluate(run, warm_cfg)["eval_greedy_accuracy"]
        (out / "check.json").write_text(
            json.dumps(
                {
                    "seed": base.seed,
                    "eval_size": base.eval_size,
                    "max_abs_weight_diff": max_diff,
                    "plain_start_greedy_accuracy": plain["start_greedy_accuracy"],
                    "plain_start_sampled_accuracy": plain["start_sampled_accuracy"],
                    "saved_start_greedy_accuracy": warm_greedy,
                },
                indent=2,
            )
        )
        for name in ("checkpoint.pt", "checkpoint.prev.pt", "reference.pt"):
            (out / name).unlink(missing_ok=True)
    return json.loads((out / "check.json").read_text())


def grpo_ma_sha256() -> str:
    """Which grpo_ma.py made a run: the cache key does not hold it, so a changed file is detected by this."""
    return hashlib.sha256(Path(grpo_ma.__file__).read_bytes()).hexdigest()[:16]


def environment() -> dict:
    import transformers

    device = "cpu"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    return {
        "device": device,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "grpo_ma_sha256": grpo_ma_sha256(),
    }


def _quietly(fn, quiet: bool):
    """grpo_ma prints progress bars; a sweep of dozens of runs prints one line per run instead."""
    if not quiet:
        return fn()
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return fn()
