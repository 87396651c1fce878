"""Rollout cost at M = 1: GRPO-MA's two-stage rollout (`grpo_ma.sample_tree`: K thoughts per prompt, then one
answer per thought that continues the thought's KV cache) against the GRPO rollout it then stands for, one
plain generate() of the same P*K rows (the prompt's cache shared, thought and answer written in one call
until </answer>, eos or the tree's whole budget).

    python -m paper_figures.rollout_bench                        # the embedded model, warmed up, on a CPU
    python -m paper_figures.rollout_bench --device cuda --model qwen2.5-0.5b   # the GSM8K recipe's shape

Both draw from the same model at the same temperature; each seconds figure is the best of --rounds wall times
after one untimed round (start-up, and compilation for the compiled path). Decoding is timed as grpo_ma runs
it on the device (the dynamic cache; on CUDA, or with --compile-decode on, also static caches with the
compiled decode step). RESULTS/rollout_bench.json keeps one block per device.
"""

import argparse
import dataclasses
import functools
import json
import random
import shlex
import sys
import time
from pathlib import Path

import torch

import grpo_ma as G
from demos import gsm8k_qwen
from paper_figures import bench, common

ABOUT = {
    "tree_seconds": "best wall seconds of one sample_tree(K thoughts, M = 1) over the prompts",
    "plain_seconds": "best wall seconds of one generate() of the same P*K rows (thought and answer in one)",
    "tree_over_plain": "tree_seconds / plain_seconds: what the tree costs over one plain call",
    "tree_tokens": "thought and answer tokens a timed tree round sampled, mean over the rounds",
    "plain_tokens": "tokens a timed plain round sampled, mean over the rounds",
    "tree_steps": "generate() steps of a tree round (every call's new columns), mean over the rounds",
    "plain_steps": "generate() steps of a plain round, mean over the rounds",
    "per_step_ratio": "(tree mean seconds / tree_steps) / (plain mean seconds / plain_steps): a step's cost, "
    "apart from how long the draws ran",
}


def load_model(name: str, device: str, warmup_steps: int) -> tuple[torch.nn.Module, object, G.Config]:
    """The embedded model after its supervised warm-up (it writes the format, so rows stop at the markers), or
    a random-weight Qwen2.5-0.5B (every row runs to its budget) at the GSM8K recipe's budgets."""
    if name == "embedded":
        cfg = G.Config(device=device, warmup_steps=warmup_steps)
        run = G.start_run(cfg)
        G.supervised_warmup(run, cfg)
        return run.policy.eval(), run.tokenizer, cfg
    budgets = {key: gsm8k_qwen.GPU_DEFAULTS[key] for key in ("max_thought_tokens", "max_answer_tokens")}
    cfg = G.Config(device=device, **budgets)
    torch.manual_seed(cfg.seed)
    with torch.device(G.pick_device(cfg)):
        model, tokenizer, _ = bench.build_policy(bench.Setting(name, name, {}, "gpu"))
    return model.eval(), tokenizer, cfg


def tree_rollout(model, tokenizer, prompt_ids, k: int, cfg: G.Config, caches) -> int:
    """sample_tree at M = 1; returns the tokens it sampled."""
    tree = G.sample_tree(model, tokenizer, prompt_ids, k, 1, cfg, True, None, caches)
    rows = [tree.thought_ids[p][j] + tree.answer_ids[p][j][0] for p, j in tree.thought_slots()]
    return sum(map(len, rows))


def plain_rollout(model, tokenizer, prompt_ids, k: int, cfg: G.Config, caches) -> int:
    """One generate() of the P*K rows: the prompts' cache repeated K times, thought and answer written in one
    call until </answer> or eos; returns the tokens it sampled."""
    ids, mask, cache = G.read_prefixes(model, tokenizer, prompt_ids)
    close = len(tokenizer.encode(G.THINK_CLOSE, add_special_tokens=False))
    budget = cfg.max_thought_tokens + close + cfg.max_answer_tokens
    static = caches.get(len(prompt_ids) * k, ids.shape[1] + budget + 1) if caches else None
    rows, _ = G.sample_rows(
        model, tokenizer, (ids, mask), cache, k, budget, G.ANSWER_CLOSE, cfg, True, static
    )
    return sum(len(row) for row, _ in rows)


def timed_rounds(rollout, rounds: int, cfg: G.Config, device: torch.device) -> dict:
    """Best and mean wall seconds, mean tokens and mean generate() steps of `rounds` timed calls, after one
    untimed call (start-up, compilation)."""
    steps = []  # each generate() call's decode steps
    seconds, tokens, calls = [], [], []
    for round_ in range(rounds + 1):
        torch.manual_seed(round_)
        steps.clear()
        started = time.perf_counter()
        with G.forward_precision(cfg, device), bench.counting_decode_steps(steps):
            sampled = rollout()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if round_:  # the first call pays the start-up
            seconds.append(time.perf_counter() - started)
            tokens.append(sampled)
            calls.append(sum(steps))
    mean = sum(seconds) / rounds
    return dict(best=min(seconds), mean=mean, tokens=sum(tokens) / rounds, steps=sum(calls) / rounds)


def measure(args: argparse.Namespace) -> dict:
    """The device's block: for each decoding path, the tree and the plain rollout of the same prompts."""
    torch.set_num_threads(args.threads)
    model, tokenizer, cfg = load_model(args.model, args.device, args.warmup_steps)
    cfg = dataclasses.replace(cfg, compile_decode=args.compile_decode)
    device = G.pick_device(cfg)
    examples = G.sample_examples(random.Random(1), cfg.task, args.prompts, held_out=True)
    _, prompt_ids, _ = G.encode_prompts(tokenizer, examples)
    compiled = G.static_decode_caches(cfg, model, device) is not None
    rows = []
    for path in ("dynamic", "compiled") if compiled else ("dynamic",):
        caches = [G.StaticCaches(model.config) if path == "compiled" else None for _ in range(2)]
        tree = functools.partial(tree_rollout, model, tokenizer, prompt_ids, args.thoughts, cfg, caches[0])
        plain = functools.partial(plain_rollout, model, tokenizer, prompt_ids, args.thoughts, cfg, caches[1])
        tree, plain = (timed_rounds(rollout, args.rounds, cfg, device) for rollout in (tree, plain))
        row = dict(path=path, tree_seconds=tree["best"], plain_seconds=plain["best"])
        row |= dict(tree_over_plain=tree["best"] / plain["best"], tree_tokens=tree["tokens"])
        row |= dict(plain_tokens=plain["tokens"], tree_steps=tree["steps"], plain_steps=plain["steps"])
        per_step = (tree["mean"] / tree["steps"]) / (plain["mean"] / plain["steps"])
        rows.append(row | dict(per_step_ratio=per_step))
        print(json.dumps(rows[-1]), flush=True)
    setting = dict(model=args.model, prompts=args.prompts, thoughts=args.thoughts, rounds=args.rounds)
    setting |= dict(max_thought_tokens=cfg.max_thought_tokens, max_answer_tokens=cfg.max_answer_tokens)
    return dict(setting=setting, machine=bench.machine(args.device, args.threads), paths=rows)


def parse_args(argv=None) -> argparse.Namespace:
    parser = common.parser("python -m paper_figures.rollout_bench", __doc__, "results_dir", "threads")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="(default: %(default)s)")
    models = ("embedded", "qwen2.5-0.5b")
    parser.add_argument("--model", choices=models, default="embedded", help="(default: %(default)s)")
    parser.add_argument("--prompts", type=int, default=8, help="prompts P (default: %(default)s)")
    parser.add_argument(
        "--thoughts", type=int, default=16, help="thoughts K per prompt (default: %(default)s)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (default: %(default)s)")
    parser.add_argument("--warmup-steps", type=int, default=60, help="embedded model (default: %(default)s)")
    compile_modes = ("auto", "on", "off")
    parser.add_argument("--compile-decode", choices=compile_modes, default="auto", help="as grpo_ma's flag")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device")
    block = measure(args)
    block["command"] = shlex.join(["python", "-m", "paper_figures.rollout_bench", *(argv or sys.argv[1:])])
    path = Path(args.results_dir) / "rollout_bench.json"
    previous = json.loads(path.read_text())["devices"] if path.exists() else {}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"about": ABOUT, "devices": previous | {args.device: block}}, indent=1) + "\n")
    return block


if __name__ == "__main__":
    main()
