"""A GRPO-MA run that can last days: grpo_ma.py's steps, plus what keeps a long run alive, none of which
changes what a step computes. grpo_ma.py never imports this file.

    python grpo_ma_run.py --out runs/long            # every grpo_ma.py flag, plus the run flags
    python grpo_ma_run.py --out runs/long --resume   # continue after a kill, bit-exact
    torchrun --nproc-per-node 2 grpo_ma_run.py       # data-parallel over processes (DDP)

It adds: a folder that never mixes runs and has one owner; checkpoints read back as data, with a fallback;
resume and extension; live views (--report-to); several processes, each growing whole trees for its prompts.
"""

import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import grpo_ma as G

REPORTERS = ("none", "tensorboard", "wandb")  # optional extras: pip install "grpo-ma[tensorboard]"


# ================================================================================================
# Settings: every grpo_ma.Config field, plus the run's
# ================================================================================================
@dataclass
class RunConfig(G.Config):
    resume: bool = G.setting(False, "continue the run in --out from its last checkpoint")
    overwrite: bool = G.setting(False, "clear the run files in --out and start a new run there")
    save_every: int = G.setting(10, "write a checkpoint every N steps", low=1)
    report_to: str = G.setting(
        "none", "also log to tensorboard (OUT/tensorboard) or wandb", choices=REPORTERS
    )


RESUMABLE_CHANGES = {  # the settings a resumed run may change: none changes what the run computes
    "resume", "overwrite", "device", "precision", "out", "steps", "save_every", "save_merged",
    "micro_batch_tokens", "compile_decode", "report_to",
}  # fmt: skip


def validate_run_config(cfg: RunConfig) -> None:
    """grpo_ma's checks, then the run's: all before any work."""
    G.validate_config(cfg)
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if cfg.report_to != "none" and importlib.util.find_spec(cfg.report_to) is None:
        extra = f'"grpo-ma[{cfg.report_to}]"'
        raise ValueError(f"--report-to {cfg.report_to} needs its package: pip install {extra}")
    processes = int(os.environ.get("WORLD_SIZE", "1"))  # set by torchrun
    if cfg.prompts_per_step % processes:
        raise ValueError(f"--prompts-per-step {cfg.prompts_per_step} does not split over {processes} ranks")


# ================================================================================================
# Processes: torchrun's, or this one alone
# ================================================================================================
def rank_and_count() -> tuple[int, int]:
    """(this process's rank, number of processes): (0, 1) unless launched by torchrun."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(obj) -> list:
    """Every process's `obj`, in rank order ([obj] in a single process)."""
    gathered = [obj] * rank_and_count()[1]
    if rank_and_count()[1] > 1:
        dist.all_gather_object(gathered, obj)
    return gathered


def sum_over_processes(numbers: dict) -> dict:
    """Each number summed over the processes."""
    parts = gather(numbers)
    return {key: sum(part[key] for part in parts) for key in numbers}


def from_rank_0(make: Callable):
    """make() on rank 0, its result handed to every process."""
    return gather(make() if rank_and_count()[0] == 0 else None)[0]


def start_processes(cfg: RunConfig) -> None:
    """Under torchrun, take this process's GPU (LOCAL_RANK) and join the process group: nccl on CUDA, gloo on
    the CPU. On the CPU, use every core this process may run on, shared among the processes."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    device = G.pick_device(cfg)
    if device.type == "cuda":
        torch.cuda.set_device(torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))))
    if processes > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // processes))
        if rank_and_count()[0] == 0:
            print(f"cpu: {torch.get_num_threads()} torch threads per process (OMP_NUM_THREADS sets another)")


# ================================================================================================
# The run's folder
# ================================================================================================
RUN_FILES = ("config.json", "metrics.jsonl", "reference.pt", "summary.json")
CHECKPOINTS = ("checkpoint.pt", "checkpoint.prev.pt")  # the newest first


LOCK = "run.lock"  # the process id of the run that owns the folder, while it runs
REPLACED = (*RUN_FILES, *CHECKPOINTS, G.FINAL, G.BASE, "final-merged", "tensorboard", "wandb", LOCK)


def lock_owner(out: Path) -> int | None:
    """The process id in OUT/run.lock, or None when there is no lock (an unreadable one reads as 0)."""
    if not (out / LOCK).is_file():
        return None
    text = (out / LOCK).read_text().strip()
    return int(text) if text.isdigit() else 0


def is_running(pid: int) -> bool:
    try:
        with contextlib.suppress(PermissionError):  # raised for another user's process, which exists
            os.kill(pid, 0)  # signal 0 only asks whether the process exists
    except ProcessLookupError:
        return False
    return pid > 0


def check_run_folder(cfg: RunConfig, out: Path) -> None:
    """Before any work, writing nothing: never into a folder a running process owns, nor into one another run
    holds unless told (`resume` compares the settings its checkpoint recorded: a run that died before its
    first checkpoint is never adopted)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    owner = lock_owner(out)
    if owner is not None and is_running(owner):
        raise ValueError(f"--out {out} is in use by process {owner} ({out / LOCK}): wait for it or stop it")
    holds_run = any((out / name).exists() for name in (*RUN_FILES, *CHECKPOINTS, G.FINAL, G.BASE))
    if holds_run and not (cfg.resume or cfg.overwrite):
        raise ValueError(f"--out {out} holds another run: --resume continues it, --overwrite replaces it")
    if cfg.resume and not any((out / name).exists() for name in CHECKPOINTS):
        raise ValueError(f"--resume: {out} holds no readable checkpoint")
    if cfg.resume and G.saves_base(cfg) and not (out / G.BASE).is_dir():
        raise ValueError(f"--resume: {out} has no {G.BASE}/, the base model its LoRA adapters belong on")


@contextlib.contextmanager
def owned_folder(cfg: RunConfig, out: Path):
    """Rank 0 makes the folder (only now: a start that failed leaves none) and owns it while the run goes on:
    OUT/run.lock, made atomically, holds its process id until the run ends, and stops a second process; a
    lock whose process has ended is named and replaced. Then --overwrite clears all the old run wrote."""
    if rank_and_count()[0] > 0:
        yield
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        stale = lock_owner(out)
        if stale is not None and not is_running(stale):
            print(f"warning: {out / LOCK} names process {stale}, which has ended: taking the folder over")
            (out / LOCK).unlink()
        with open(out / LOCK, "x") as lock:
            lock.write(f"{os.getpid()}\n")
    except FileExistsError:
        raise ValueError(f"--out {out} is in use by process {lock_owner(out)} ({out / LOCK})") from None
    except OSError as error:
        raise ValueError(f"--out {out}: cannot write there ({error.strerror})") from None
    try:
        (out / "checkpoint.tmp").unlink(missing_ok=True)  # half-written by a kill
        if cfg.overwrite:
            for path in [*(out / name for name in REPLACED if name != LOCK), *out.glob("*.unreadable")]:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)
        yield
    finally:
        (out / LOCK).unlink(missing_ok=True)


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of steps 0..step, checked, and drop the later ones unread: they will be recomputed."""
    kept = []
    with path.open() as lines:
        for number, line in zip(range(1, step + 2), lines):
            try:
                found = json.loads(line).get("step")
            except (json.JSONDecodeError, AttributeError):
                raise ValueError(f"{path}:{number}: malformed metrics line") from None
            if found != number - 1:
                raise ValueError(f"{path}:{number}: expected step {number - 1}, found {found}")
            kept.append(line.rstrip("\n") + "\n")
    if len(kept) != step + 1:
        raise ValueError(f"{path} has {len(kept)} lines; the checkpoint needs those of steps 0..{step}")
    path.write_text("".join(kept))


# ================================================================================================
# Checkpoints: tensors and plain values, read back by torch's safe loader
# ================================================================================================
def rng_states(device: torch.device) -> dict:
    """Every RNG a step draws from, as tensors and plain Python values (torch's safe loader reads them)."""
    kind, key, position, has_gauss, gauss = np.random.get_state()
    states = {"python": random.getstate(), "torch": torch.get_rng_state()}
    states["numpy"] = (kind, torch.from_numpy(key.astype(np.int64)), position, has_gauss, gauss)
    states["cuda"] = torch.cuda.get_rng_state(device) if device.type == "cuda" else None  # GPU only
    return states


def set_rng_states(states: dict, device: torch.device) -> None:
    random.setstate(states["python"])
    kind, key, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, key.numpy().astype(np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(states["torch"])
    if states["cuda"] is not None:
        torch.cuda.set_rng_state(states["cuda"], device)


def trained_weights(policy, cfg: G.Config) -> dict:
    """What a checkpoint keeps of the policy: every weight, or with LoRA the trained adapters alone (the
    frozen base never changes; the checkpoint names it by `base_identity` instead)."""
    weights = policy.state_dict()
    if not cfg.lora_rank:
        return weights
    trained = {name for name, parameter in policy.named_parameters() if parameter.requires_grad}
    return {name: value for name, value in weights.items() if name in trained}


def base_identity(model, cfg: G.Config, out: Path) -> dict:
    """Where a LoRA run's base loads from and a SHA-256 of its weights (taken before the adapters are added),
    so a resume on another base stops instead of training adapters that belong elsewhere."""
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(value.detach().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
    return {"model": G.base_source(cfg, out), "sha256": digest.hexdigest()}


def save_checkpoint(out: Path, run: G.Run, optimizer, progress: G.Progress, cfg: RunConfig, base=None):
    """Everything the next step depends on, RNGs included, as tensors and plain values. Written aside and
    renamed into place (a kill mid-write leaves no half file); the checkpoint before stays as a fallback."""
    rngs = gather(rng_states(run.device))  # every process samples from its own stream
    if rank_and_count()[0] > 0:
        return
    checkpoint = {"config": dataclasses.asdict(cfg), "progress": dataclasses.asdict(progress), "rng": rngs}
    checkpoint |= {"model": trained_weights(run.policy, cfg), "optimizer": optimizer.state_dict()}
    checkpoint |= {"data_rng": run.data_rng.getstate(), "base": base}
    torch.save(checkpoint, out / "checkpoint.tmp")
    if (out / CHECKPOINTS[0]).exists():
        os.replace(out / CHECKPOINTS[0], out / CHECKPOINTS[1])
    os.replace(out / "checkpoint.tmp", out / CHECKPOINTS[0])


class UnreadableCheckpoint(ValueError):
    """A checkpoint file that is not one this program wrote for this model: set aside, the one before used."""


CHECKPOINT_KEYS = {
    "config": dict, "progress": dict, "rng": list, "model": dict, "optimizer": dict, "data_rng": tuple,
    "base": (dict, type(None)),
}  # fmt: skip


def read_checkpoint(path: Path) -> dict:
    """A checkpoint read as data: torch's safe loader (weights_only) rebuilds tensors and plain values and
    refuses anything else, so a file can never run code. Raises UnreadableCheckpoint naming what is wrong."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # cut off, corrupt, or a pickle of other objects: torch raises several kinds
        raise UnreadableCheckpoint(f"cannot read {path} ({str(error).strip().splitlines()[0]})") from None
    if not isinstance(checkpoint, dict):
        raise UnreadableCheckpoint(f"{path} holds a {type(checkpoint).__name__}, not a grpo_ma checkpoint")
    for key, kind in CHECKPOINT_KEYS.items():
        if not isinstance(checkpoint.get(key), kind):
            raise UnreadableCheckpoint(f"{path} is not a grpo_ma checkpoint: {key!r} is missing or malformed")
    return checkpoint


def check_resume_settings(checkpoint: dict, cfg: RunConfig, base: dict | None, path: Path) -> None:
    """A resume continues the same run: the settings the checkpoint recorded (bar RESUMABLE_CHANGES), the same
    number of processes and, with LoRA, the same base weights."""
    saved = checkpoint["config"]
    now = {key: value for key, value in dataclasses.asdict(cfg).items() if key not in RESUMABLE_CHANGES}
    changed = {key: (saved.get(key), value) for key, value in now.items() if saved.get(key) != value}
    if changed:
        raise ValueError(f"--resume with settings that differ from the checkpoint {path}: {changed}")
    step = checkpoint["progress"].get("step")
    if not isinstance(step, int) or cfg.steps < step:
        raise ValueError(f"--steps {cfg.steps} is below step {step} of the checkpoint {path}")
    if cfg.steps != saved["steps"] and cfg.kl_schedule == "dynamic":
        raise ValueError("--steps cannot change with --kl-schedule dynamic: beta(s) depends on the total")
    if len(checkpoint["rng"]) != rank_and_count()[1]:
        raise ValueError(f"{path} ran with {len(checkpoint['rng'])} processes, not {rank_and_count()[1]}")
    hashes = [(identity or {}).get("sha256") for identity in (checkpoint["base"], base)]  # folders may move
    if hashes[0] != hashes[1]:
        raise ValueError(f"--resume: the base model is not the one {path} trained: {checkpoint['base']}")


def restore(checkpoint: dict, run: G.Run, optimizer, cfg: G.Config) -> G.Progress:
    """Put a checkpoint back: weights (with LoRA the adapters), optimizer, data stream and every RNG. A
    weight of another name or shape is an error before anything is changed."""
    expected = trained_weights(run.policy, cfg)
    for name, value in checkpoint["model"].items():
        if name not in expected or not isinstance(value, torch.Tensor) or value.shape != expected[name].shape:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"its weight {name!r} ({shape}) is not one of this model's")
    if len(checkpoint["model"]) != len(expected):
        raise ValueError(f"it holds {len(checkpoint['model'])} of the model's {len(expected)} weights")
    run.policy.load_state_dict(checkpoint["model"], strict=not cfg.lora_rank)
    optimizer.load_state_dict(checkpoint["optimizer"])
    run.data_rng.setstate(checkpoint["data_rng"])
    set_rng_states(checkpoint["rng"][rank_and_count()[0]], run.device)
    return G.Progress(**checkpoint["progress"])


def resume(out: Path, run: G.Run, optimizer, cfg: RunConfig, base: dict | None) -> G.Progress:
    """Continue from the newest checkpoint that reads as this run's; one that does not (cut off, corrupt,
    foreign) is named, set aside as NAME.unreadable and the one before used. Other settings stop it."""
    for name in CHECKPOINTS:
        path = out / name
        if not path.exists():
            continue
        try:
            checkpoint = read_checkpoint(path)
            check_resume_settings(checkpoint, cfg, base, path)
            try:
                return restore(checkpoint, run, optimizer, cfg)
            except (KeyError, TypeError, ValueError, RuntimeError) as error:
                raise UnreadableCheckpoint(f"{path}: {str(error).strip().splitlines()[0]}") from None
        except UnreadableCheckpoint as error:
            print(f"warning: {error}; using the checkpoint before it", file=sys.stderr)
            if rank_and_count()[0] == 0:
                os.replace(path, out / f"{name}.unreadable")
    raise ValueError(f"--resume: {out} holds no readable checkpoint")


# ================================================================================================
# Live views, and the run
# ================================================================================================
def open_reporter(cfg: RunConfig, out: Path, step: int):
    """The live view --report-to asks for, imported only then: tensorboard in OUT/tensorboard (a resume drops
    the events after `step`, as metrics.jsonl its lines), or wandb, offline unless WANDB_MODE says so."""
    if cfg.report_to == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(out / "tensorboard", purge_step=step + 1 if cfg.resume else None)
    if cfg.report_to == "wandb":
        import wandb

        os.environ.setdefault("WANDB_MODE", "offline")
        return wandb.init(project="grpo-ma", dir=out, name=out.name, config=dataclasses.asdict(cfg))
    return None


def log_step(path: Path, record: dict, reporter) -> None:
    """A step's line in metrics.jsonl, and its numbers to the live view under the same names."""
    G.write_metrics(path, record)
    values = {
        key: value for key, value in record.items() if isinstance(value, (int, float)) and key != "step"
    }
    if hasattr(reporter, "add_scalar"):  # tensorboard
        for key, value in values.items():
            reporter.add_scalar(key, value, record["step"])
        reporter.flush()
    elif reporter is not None:  # wandb
        reporter.log(values, step=record["step"])


def train(
    cfg: RunConfig,
    train_pool: Sequence[G.Example] | None = None,
    eval_examples: Sequence[G.Example] | None = None,
    reward_fns: list[tuple[G.RewardFn, float]] | None = None,
    is_correct: Callable[[str, G.Example], bool] = G.answer_is_correct,
) -> dict:
    """grpo_ma.train's run, kept alive: the same warm-up, evaluations and steps, plus a checkpoint every
    --save-every steps, --resume, --report-to and torchrun. Rank 0 evaluates and writes every file. Returns
    the summary also written to OUT/summary.json."""
    validate_run_config(cfg)
    start_processes(cfg)
    out = Path(cfg.out)
    check_run_folder(cfg, out)
    # a resumed LoRA run whose base exists nowhere else loads it from OUT/base
    model = str(out / G.BASE) if cfg.resume and G.saves_base(cfg) else cfg.model
    base_cfg = dataclasses.replace(cfg, model=model)
    run = G.start_run(base_cfg, train_pool, eval_examples, reward_fns, is_correct)
    try:
        with owned_folder(cfg, out):
            if rank_and_count()[1] > 1:
                dist.barrier()  # rank 0 owns the folder before any process goes on
            summary = run_in_folder(cfg, run, out)
            if rank_and_count()[1] > 1:
                dist.barrier()  # no process closes the group while rank 0 still writes the final files
            return summary
    finally:
        if dist.is_initialized():  # a gloo group left open, or closed under a busy peer, can abort at exit
            dist.destroy_process_group()


def run_in_folder(cfg: RunConfig, run: G.Run, out: Path) -> dict:
    """The run in its folder: start it (or resume it), then the steps with their checkpoints and metrics."""
    started = time.time()
    rank, count = rank_and_count()
    if rank > 0:
        os.environ["TQDM_DISABLE"] = "1"  # one process draws the progress bars
    processes = G.Processes(rank, count, sum_over_processes if count > 1 else None)
    metrics = out / "metrics.jsonl"
    if not cfg.resume:
        if rank == 0:
            (out / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2))
            metrics.write_text("")
        G.supervised_warmup(run, cfg)
        if rank == 0 and not cfg.lora_rank:
            torch.save(run.policy.state_dict(), out / "reference.pt")  # the start policy, for a resume
        if rank == 0 and G.saves_base(cfg):
            G.save_model(run, out / G.BASE)
    base = base_identity(run.policy, cfg, out) if cfg.lora_rank else None
    G.add_adapters(run, cfg, out)
    trainable = [p for p in run.policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=0.0)
    if cfg.resume:
        progress = resume(out, run, optimizer, cfg, base)
        if progress.step == cfg.steps and (out / "summary.json").exists():
            print(f"{out} finished at step {progress.step}: nothing to do (a larger --steps extends it)")
            return json.loads((out / "summary.json").read_text())
    else:
        progress = G.Progress(start_eval=from_rank_0(functools.partial(G.evaluate, run, cfg)))
        progress.last_eval = progress.start_eval
    reference = G.kl_reference(run, cfg)
    if reference is not None and not cfg.lora_rank:  # the start policy, also when resumed
        start = torch.load(out / "reference.pt", map_location=run.device, weights_only=True)
        reference.load_state_dict(start)
    reporter = open_reporter(cfg, out, progress.step) if rank == 0 else None
    if cfg.resume and rank == 0:
        truncate_metrics(metrics, progress.step)
        print(f"resuming {out} from step {progress.step}")
    elif not cfg.resume:
        if rank == 0:
            log_step(metrics, {"step": 0, **progress.start_eval}, reporter)
            G.say_accuracy("start policy", progress.start_eval)
        if count > 1:
            torch.manual_seed(cfg.seed * 1000 + rank)  # each process samples rollouts of its own
        save_checkpoint(out, run, optimizer, progress, cfg, base)
    if count > 1:
        dist.barrier()  # rank 0 has written reference.pt
        devices = [run.device] if run.device.type == "cuda" else None
        run.forward = torch.nn.parallel.DistributedDataParallel(run.forward, device_ids=devices)

    bar = tqdm(total=cfg.steps, initial=progress.step, desc="GRPO-MA", unit="step", disable=rank > 0)
    for step in range(progress.step + 1, cfg.steps + 1):
        record = G.train_step(step, run, optimizer, progress, reference, cfg, processes)
        progress.step = step
        bar.update(1)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            progress.last_eval = from_rank_0(functools.partial(G.evaluate, run, cfg))
            record |= progress.last_eval
            bar.unpause()  # the bar's rate and ETA count training steps, not evaluations
        if rank == 0:
            log_step(metrics, record, reporter)
        bar.set_postfix(reward=f"{record['reward_mean']:.2f}")
        if step % cfg.save_every == 0 or step == cfg.steps:
            progress.wall_seconds += time.time() - started
            started = time.time()
            save_checkpoint(out, run, optimizer, progress, cfg, base)
    bar.close()

    progress.wall_seconds += time.time() - started  # every part of a resumed run
    if rank > 0:
        return G.summarise(cfg, progress, run.device, count)
    if hasattr(reporter, "close"):  # tensorboard
        reporter.close()
    elif reporter is not None:  # wandb
        reporter.finish()
    return G.finish(run, cfg, progress, out, count)


def parse_args(argv: Sequence[str] | None = None) -> RunConfig:
    return G.parse_args(argv, RunConfig())


def main(argv: Sequence[str] | None = None) -> dict:
    """The command; under torchrun only rank 0 prints an error."""
    argv = sys.argv[1:] if argv is None else list(argv)
    first = os.environ.get("RANK", "0") == "0"
    return G.run_cli(train, parse_args(argv), debug="--debug" in argv, say_errors=first)


if __name__ == "__main__":
    main()
