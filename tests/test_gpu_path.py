"""The GPU path, run on the CPU. CI has no GPU, so each CUDA-only behaviour has a stand-in here: bf16 through
CPU autocast (the numerics CUDA runs by default), and the branches taken only on CUDA (device choice under
torchrun, the nccl process group, the CUDA RNG state in checkpoints) exercised with torch.cuda's answers
stubbed. What only a real GPU can show is listed in docs/algorithm.md."""

import random

import pytest
import torch
import torch.distributed as dist

import grpo_ma as G
import grpo_ma_run as R

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def warm_up_losses(precision: str, steps: int) -> list[float]:
    cfg = G.Config(precision=precision, device="cpu", warmup_steps=steps)
    return G.supervised_warmup(G.start_run(cfg), cfg)


def test_bf16_warm_up_learns_like_float32(monkeypatch):
    """Autocast keeps its bf16 copy of each weight until its context exits: a warm-up run inside one context
    trains on the step-0 weights and its loss barely moves (3.58 after 40 steps, against float32's 1.13).
    With autocast around each forward only, bf16 follows float32, and no optimizer step sees autocast on."""
    real_step = torch.optim.AdamW.step
    autocast_at_steps = []

    def step_and_record(self, *args, **kwargs):
        autocast_at_steps.append(torch.is_autocast_enabled("cpu"))
        return real_step(self, *args, **kwargs)

    fp32 = warm_up_losses("fp32", 40)
    monkeypatch.setattr(torch.optim.AdamW, "step", step_and_record)
    bf16 = warm_up_losses("bf16", 40)
    assert bf16[0] == pytest.approx(fp32[0], rel=0.01)  # the same start
    assert fp32[-1] < 0.5 * fp32[0]
    assert bf16[-1] == pytest.approx(fp32[-1], rel=0.15)
    assert autocast_at_steps == [False] * 40


def test_short_bf16_run_starts_from_a_warm_up_that_learned(tmp_path):
    """The whole command under --precision bf16 on the CPU: the start policy it evaluates answers some
    held-out questions right (a warm-up on stale weights answers none)."""
    cfg = G.Config(
        precision="bf16", device="cpu", warmup_steps=150, steps=1, eval_size=100, out=str(tmp_path)
    )
    summary = G.train(cfg)
    assert summary["start_greedy_accuracy"] >= 0.05


@pytest.fixture
def cuda_present(monkeypatch):
    """torch.cuda answers as on a machine with bf16-capable GPUs (nothing is run on them); set_device records
    the device it is given, and current_device answers with it."""
    chosen = [torch.device("cuda", 0)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: chosen[-1].index)
    return chosen


@pytest.mark.parametrize(
    "precision, device, bf16",
    [("auto", "cpu", False), ("auto", "cuda", True), ("fp32", "cuda", False), ("bf16", "cpu", True)],
)
def test_precision_picks_bf16_autocast_where_asked(cuda_present, precision, device, bf16):
    context = G.forward_precision(G.Config(precision=precision), torch.device(device))
    assert (context.device, context.fast_dtype, context._enabled) == (device, torch.bfloat16, bf16)


def test_torchrun_process_takes_the_gpu_of_its_local_rank(cuda_present, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    R.start_processes(R.RunConfig())
    assert cuda_present[-1] == torch.device("cuda", 3)
    assert G.pick_device(G.Config()) == torch.device("cuda", 3)
    assert G.pick_device(G.Config(device="cpu")) == torch.device("cpu")


def test_cuda_asked_for_without_a_gpu_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--device cuda"):
        G.pick_device(G.Config(device="cuda"))


@pytest.mark.parametrize("device, backend", [("auto", "nccl"), ("cpu", "gloo")])
def test_torchrun_joins_nccl_on_gpus_and_gloo_on_cpus(cuda_present, monkeypatch, device, backend):
    joined = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", joined.append)
    R.start_processes(R.RunConfig(device=device))
    assert joined == [backend]
    assert cuda_present[1:] == ([torch.device("cuda", 1)] if backend == "nccl" else [])


def test_cuda_rng_state_goes_through_a_checkpoint_and_back(tmp_path, monkeypatch):
    """On CUDA the sampling draws from the GPU's generator: its state is saved with the others, read back by
    the safe loader, and restored on the run's GPU."""
    cfg = G.Config(thoughts=2, answers=2, prompts_per_step=2, warmup_steps=0, device="cpu")
    run = G.start_run(cfg)
    run.device = torch.device("cuda", 0)  # the model stays on the CPU; only the RNG calls see the GPU
    gpu_state = torch.tensor(random.Random(0).choices(range(256), k=16), dtype=torch.uint8)
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: gpu_state.clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    optimizer = torch.optim.AdamW(run.policy.parameters(), lr=cfg.lr)
    R.save_checkpoint(tmp_path, run, optimizer, G.Progress(), cfg)
    payload = R.read_checkpoint(tmp_path / "checkpoint.pt")
    R.restore(payload, run, optimizer, cfg)
    ((state, device),) = restored
    assert torch.equal(state, gpu_state) and device == torch.device("cuda", 0)
