"""Does the (K, M) planner of theory/budget.py predict training? A sweep of trees at nearly equal token cost.

    python -m paper_figures.planner            # about 50 min on one CPU core; cached runs are only re-read

What it does, in order (every run is cached in paper_figures/cache/, so a second call only re-reads):
1. Warm starts away from the ceiling: the embedded model's supervised warm-up, shortened to
   `warmup_steps`, for seeds 0, 1, 2, ... A seed whose warm start already scores above `max_start` held-out
   greedy accuracy is skipped (and listed), until `seeds` seeds are kept. Every tree of a seed trains from
   that seed's one warm start.
2. The planner's inputs, measured from each warm start's own rollouts (never fitted to the result):
   `measure_prompts` prompts, K = M = `measure_tree` each; per prompt the within-thought answer variance
   E[sigma^2] and the between-thought variance of the thought values sigma_theta^2 (the sample variance of
   the V_k minus its answer-noise share E[sigma^2]/M), the mean accuracy and the mean thought and answer
   lengths L_t, L_a in tokens.
3. Six trees T{K}A{M} with K (L_t/L_a + M) equal, so K L_t + K M L_a tokens per prompt is nearly the same
   (L_t/L_a is about 4 on this task; the measured cost of each tree is in the results), each trained
   `steps` steps of 8 prompts from every kept warm start; held-out greedy and sampled accuracy at the start
   and the end on `eval_size` prompts.
4. The planner's prediction for each tree at the measured inputs, for the gradient objective
   (`theory.gradient.gradient_snr`) and for the variance-only one
   (`theory.budget.mean_thought_variance`), and the Spearman rank correlation of each prediction with the
   measured mean gain.

Writes RESULTS/planner.json and planner.md, and OUT/planner.png (.pdf).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import grpo_ma
from grpo_ma_run import RunConfig as Config
from paper_figures import common, runs


@dataclass(frozen=True)
class Plan:
    """How much the sweep runs. `base` holds extra Config changes for every run (tests shrink the model's
    work with it)."""

    name: str
    trees: tuple[tuple[int, int], ...]
    seeds: int  # warm starts kept
    steps: int
    warmup_steps: int
    max_start: float  # a warm start above this held-out greedy accuracy is too near the ceiling
    eval_size: int
    measure_prompts: int
    measure_tree: int  # K = M of the rollouts that measure the planner's inputs
    max_seed: int = 40  # seeds tried at most
    base: tuple[tuple[str, object], ...] = ()


# K (4 + M) = 80: equal tokens per prompt when a thought is 4 answers long (measured: 3.6-4.1)
TREES = ((16, 1), (10, 4), (8, 6), (5, 12), (4, 16), (2, 36))
FULL = Plan(
    "full",
    trees=TREES,
    seeds=6,
    steps=100,
    warmup_steps=250,
    max_start=0.7,
    eval_size=400,
    measure_prompts=64,
    measure_tree=8,
)


def tree_name(thoughts: int, answers: int) -> str:
    return f"T{thoughts}A{answers}"


def base_config(plan: Plan, seed: int) -> Config:
    """The embedded default with the plan's warm-up, length and evaluation (start and end only)."""
    return dataclasses.replace(
        Config(),
        **dict(plan.base),
        seed=seed,
        warmup_steps=plan.warmup_steps,
        steps=plan.steps,
        eval_every=max(plan.steps, 1),
        eval_size=plan.eval_size,
    )


def run_config(plan: Plan, seed: int, thoughts: int, answers: int, folder: Path) -> Config:
    return dataclasses.replace(
        base_config(plan, seed), model=str(folder), warmup_steps=0, thoughts=thoughts, answers=answers
    )


# ------------------------------------------------------------------------------------------------
# warm starts and the planner's inputs, measured from their rollouts
# ------------------------------------------------------------------------------------------------
def warm_start(plan: Plan, seed: int, cache_dir: Path) -> tuple[Path, dict]:
    """The seed's warm start (cached) and its held-out accuracy (cached beside it)."""
    base = base_config(plan, seed)
    folder = runs.warm_start(seed, cache_dir, base)
    cfg = dataclasses.replace(base, model=str(folder), warmup_steps=0)
    store = folder / f"eval_{cfg.task}_{runs.cache_key(cfg, 'eval')}.json"
    return folder, runs.eval_policy(cfg, cfg.task, store)


def variance_components(rewards: np.ndarray) -> dict:
    """The two-level decomposition of rewards (P, K, M) of P prompts, K thoughts, M answers each:

        E[sigma^2]     = mean over prompts and thoughts of the unbiased variance of the M answers
        sigma_theta^2  = mean over prompts of ( Var_k(V_k) - mean_k sigma_k^2 / M ),  V_k = mean_m R[k, m]

    (the sample variance of the thought values holds the answer noise sigma_k^2/M too, hence the
    subtraction; both are unbiased), and ratio = E[sigma^2] / sigma_theta^2."""
    answers = rewards.shape[-1]
    within = rewards.var(-1, ddof=1)  # (P, K)
    values = rewards.mean(-1)
    between = values.var(-1, ddof=1) - within.mean(-1) / answers  # (P,)
    mean_within = float(within.mean())
    mean_between = float(between.mean())
    return {
        "mean_within_var": mean_within,
        "between_var": mean_between,
        "ratio": mean_within / mean_between if mean_between > 0 else float("inf"),
    }


def repeat_shares(tree, rewards: np.ndarray) -> dict:
    """How often two sequences are the same text (`theory.gradient.Repeats`): two thoughts of one prompt;
    two right answers of one thought; two wrong answers of one thought. rewards: (P, K, M) of 0/1."""
    pairs = {"thought": [], "right_answer": [], "wrong_answer": []}
    for p, by_prompt in enumerate(tree.thoughts):
        pairs["thought"] += [a == b for a, b in itertools.combinations(by_prompt, 2)]
        for k, answers in enumerate(tree.answers[p]):
            for i, j in itertools.combinations(range(len(answers)), 2):
                if rewards[p, k, i] == rewards[p, k, j]:
                    side = "right_answer" if rewards[p, k, i] == 1 else "wrong_answer"
                    pairs[side].append(answers[i] == answers[j])
    return {name: float(np.mean(same)) if same else 0.0 for name, same in pairs.items()}


def measure_inputs(plan: Plan, seed: int, folder: Path) -> dict:
    """The planner's inputs from the warm start's own rollouts (cached in the warm start's folder): accuracy
    (the Bernoulli reward the planner models) and its variance components, lengths, and the same for the
    total reward the trainer uses (accuracy + format), and how often sequences repeat."""
    store = folder / f"planner_inputs_v2_{plan.measure_prompts}x{plan.measure_tree}.json"
    if store.exists():
        return json.loads(store.read_text())
    cfg = dataclasses.replace(base_config(plan, seed), model=str(folder), warmup_steps=0)
    run = runs._quietly(lambda: grpo_ma.start_run(cfg), True)
    torch.manual_seed(20_000 + seed)
    examples = grpo_ma.sample_examples(random.Random(20_000 + seed), cfg.task, plan.measure_prompts, False)
    prompts, prompt_ids, _ = grpo_ma.encode_prompts(run.tokenizer, examples)
    size = plan.measure_tree
    with torch.no_grad():
        tree = grpo_ma.sample_tree(run.policy, run.tokenizer, prompt_ids, size, size, cfg)
    scores = grpo_ma.score_answers(run.reward_fns, tree, examples, prompts)
    correct = scores["reward/accuracy"].double().numpy()
    thought_lengths = [len(tree.thought_ids[p][k]) for p, k in tree.thought_slots()]
    answer_lengths = [len(tree.answer_ids[p][k][m]) for p, k, m in tree.answer_slots()]
    inputs = {
        "prompts": plan.measure_prompts,
        "thoughts": size,
        "answers": size,
        "mean_accuracy": float(correct.mean()),
        **variance_components(correct),
        "total_reward": variance_components(scores["total"].double().numpy()),
        "thought_len": float(np.mean(thought_lengths)),
        "answer_len": float(np.mean(answer_lengths)),
        "repeats": repeat_shares(tree, correct),
        "all_correct_prompts": float((correct.min((1, 2)) == 1).mean()),
        "all_wrong_prompts": float((correct.max((1, 2)) == 0).mean()),
    }
    store.write_text(json.dumps(inputs, indent=1))
    return inputs


def pooled_inputs(per_seed: dict[int, dict]) -> dict:
    """The inputs the planner ranks with: the mean over the kept seeds' warm starts. The planner's ratio is
    E[sigma^2] / sigma_theta^2 of the Beta its thought values are drawn from; repeated thoughts share a
    value, so the spread measured within a prompt is (1 - c_T) sigma_theta^2, hence
    ratio = E[sigma^2] (1 - c_T) / measured spread."""
    keys = ("mean_accuracy", "mean_within_var", "between_var", "thought_len", "answer_len")
    pooled = {key: float(np.mean([inputs[key] for inputs in per_seed.values()])) for key in keys}
    pooled["repeats"] = {
        name: float(np.mean([inputs["repeats"][name] for inputs in per_seed.values()]))
        for name in ("thought", "right_answer", "wrong_answer")
    }
    pooled["ratio"] = pooled["mean_within_var"] * (1 - pooled["repeats"]["thought"]) / pooled["between_var"]
    return pooled


def choose_seeds(plan: Plan, cache_dir: Path, say=print) -> tuple[list[int], dict[int, float]]:
    """Seeds 0, 1, ... whose warm start lies at or below max_start, until plan.seeds are kept. Returns the
    kept seeds and every tried seed's start greedy accuracy."""
    kept = []
    tried = {}
    for seed in range(plan.max_seed):
        if len(kept) == plan.seeds:
            break
        _, start = warm_start(plan, seed, cache_dir)
        tried[seed] = start["greedy"]
        verdict = "kept" if start["greedy"] <= plan.max_start else "skipped, near the ceiling"
        say(f"  warm start seed {seed}: held-out greedy {start['greedy']:.3f} ({verdict})")
        if start["greedy"] <= plan.max_start:
            kept.append(seed)
    return kept, tried


# ------------------------------------------------------------------------------------------------
# training and collecting
# ------------------------------------------------------------------------------------------------
def train_tree(plan: Plan, seed: int, thoughts: int, answers: int, cache_dir: Path) -> dict:
    """One run from the seed's warm start (cached), as the numbers the results keep."""
    folder = runs.warm_start_folder(seed, cache_dir, base_config(plan, seed))
    run = runs.run_grpo(run_config(plan, seed, thoughts, answers, folder), cache_dir)
    summary = run["summary"]
    steps = [m for m in run["metrics"] if m["step"] > 0]

    def mean_of(key: str) -> float:
        return float(np.mean([m[key] for m in steps]))

    return {
        "tree": tree_name(thoughts, answers),
        "seed": seed,
        "key": run["key"],
        "start_greedy": summary["start_greedy_accuracy"],
        "final_greedy": summary["final_greedy_accuracy"],
        "start_sampled": summary["start_sampled_accuracy"],
        "final_sampled": summary["final_sampled_accuracy"],
        "gain_greedy": summary["final_greedy_accuracy"] - summary["start_greedy_accuracy"],
        "gain_sampled": summary["final_sampled_accuracy"] - summary["start_sampled_accuracy"],
        "tokens_per_step": mean_of("tokens_generated"),
        "zero_std_thought_frac": mean_of("zero_std_thought_frac"),
        "zero_std_answer_frac": mean_of("zero_std_answer_frac"),
        "thought_len": mean_of("thought_len"),
        "answer_len": mean_of("answer_len"),
        "step_seconds": float(np.mean([m["rollout_seconds"] + m["train_seconds"] for m in steps])),
    }


def spread(values: list[float]) -> dict:
    """Mean, sample std over seeds and the standard error of the mean."""
    array = np.asarray(values, dtype=float)
    std = float(array.std(ddof=1)) if len(array) > 1 else float("nan")
    return {"mean": float(array.mean()), "std": std, "sem": std / np.sqrt(len(array)), "n": len(array)}


def predictions(inputs: dict, trees) -> dict[str, dict]:
    """Each tree's score under both objectives at the measured inputs (higher = predicted better): the
    gradient signal-to-noise per token (with the measured repeats, and for reference without them), and
    minus the thought-averaged advantage variance."""
    from theory import budget
    from theory.gradient import Repeats, gradient_snr

    out = {}
    for thoughts, answers in trees:
        shape = (thoughts, answers, inputs["thought_len"], inputs["answer_len"], inputs["ratio"])
        gradient = gradient_snr(*shape, mean=inputs["mean_accuracy"], repeats=Repeats(**inputs["repeats"]))
        distinct = gradient_snr(*shape, mean=inputs["mean_accuracy"])
        variance = budget.mean_thought_variance(
            thoughts, answers, inputs["ratio"], mean=inputs["mean_accuracy"]
        )
        out[tree_name(thoughts, answers)] = {
            "gradient_snr_per_token": gradient.per_token,
            "gradient_snr_per_token_distinct": distinct.per_token,
            "thought_share": gradient.thought_share,
            "zero_signal_thought": gradient.zero_signal_thought,
            "minus_thought_variance": -float(variance),
            "tokens": budget.token_cost(thoughts, answers, inputs["thought_len"], inputs["answer_len"]),
        }
    return out


def separation(gains: dict[str, list[float]]) -> dict:
    """Do the trees' gains separate beyond the seed spread? The Friedman test ranks the trees within each
    seed (a seed's warm start and held-out set are shared by its trees), and the largest gap between two
    tree means is compared with the seed spread of a paired difference."""
    from scipy import stats

    names = list(gains)
    table = np.array([gains[name] for name in names])  # (trees, seeds)
    friedman = stats.friedmanchisquare(*table) if table.shape[1] > 1 else None
    means = table.mean(1)
    best = int(np.argmax(means))
    worst = int(np.argmin(means))
    paired = table[best] - table[worst]
    return {
        "friedman_statistic": None if friedman is None else float(friedman.statistic),
        "friedman_p": None if friedman is None else float(friedman.pvalue),
        "best": names[best],
        "worst": names[worst],
        "best_minus_worst": spread(list(paired)),
    }


# the gradient objective (with measured repeats) is the planner's; the other two are reported beside it
OBJECTIVES = ("gradient_snr_per_token", "minus_thought_variance", "gradient_snr_per_token_distinct")


def rank_correlations(predicted: dict[str, dict], gains: dict[str, dict], key: str) -> dict:
    """Spearman's rho between each objective's score and the measured mean gain, over the trees."""
    from scipy import stats

    names = list(gains)
    measured = [gains[name]["mean"] for name in names]
    out = {}
    for objective in OBJECTIVES:
        scores = [predicted[name][objective] for name in names]
        rho = stats.spearmanr(scores, measured)
        out[objective] = {"rho": float(rho.statistic), "p": float(rho.pvalue), "gain": key}
    return out


def collect(plan: Plan, seeds: list[int], tried: dict[int, float], cache_dir: Path) -> dict:
    """Every number of the sweep from the cache: runs, inputs, predictions, correlations."""
    records = [
        train_tree(plan, seed, thoughts, answers, cache_dir)
        for seed in seeds
        for thoughts, answers in plan.trees
    ]
    per_seed_inputs = {
        seed: measure_inputs(plan, seed, runs.warm_start_folder(seed, cache_dir, base_config(plan, seed)))
        for seed in seeds
    }
    inputs = pooled_inputs(per_seed_inputs)
    names = [tree_name(k, m) for k, m in plan.trees]
    gains = {key: {} for key in ("gain_greedy", "gain_sampled")}
    for key, by_tree in gains.items():
        for name in names:
            by_tree[name] = [r[key] for r in records if r["tree"] == name]
    predicted = predictions(inputs, plan.trees)
    summary = {
        key: {name: spread(values) for name, values in by_tree.items()} for key, by_tree in gains.items()
    }
    return {
        "plan": dataclasses.asdict(plan),
        "environment": runs.environment(),
        "seeds": seeds,
        "tried_seeds_start_greedy": {str(seed): accuracy for seed, accuracy in tried.items()},
        "inputs_per_seed": {str(seed): inputs for seed, inputs in per_seed_inputs.items()},
        "inputs": inputs,
        "predictions": predicted,
        "gains": summary,
        "separation": {key: separation(by_tree) for key, by_tree in gains.items()},
        "spearman": {key: rank_correlations(predicted, summary[key], key) for key in gains},
        "runs": records,
    }


# ------------------------------------------------------------------------------------------------
# the table and the figure
# ------------------------------------------------------------------------------------------------
def markdown(results: dict) -> str:
    """results/planner.md: one row per tree, then the correlations and whether the trees separate."""
    inputs = results["inputs"]
    plan = results["plan"]
    lines = [
        f"Planner vs training: {len(plan['trees'])} trees x seeds {results['seeds']}, {plan['steps']} "
        f"steps of 8 prompts from each seed's warm start ({plan['warmup_steps']} warm-up steps, kept when "
        f"held-out greedy <= {plan['max_start']}), held-out accuracy on {plan['eval_size']} prompts.",
        "",
        f"Inputs measured from the warm starts' rollouts: mean accuracy {inputs['mean_accuracy']:.3f}, "
        f"sigma_theta^2 {inputs['between_var']:.4f}, E[sigma^2] {inputs['mean_within_var']:.4f} "
        f"(Beta ratio {inputs['ratio']:.2f}), L_t {inputs['thought_len']:.1f}, "
        f"L_a {inputs['answer_len']:.2f} tokens; repeated texts: thoughts "
        f"{inputs['repeats']['thought']:.2f}, right answers "
        f"{inputs['repeats']['right_answer']:.2f}, wrong answers {inputs['repeats']['wrong_answer']:.2f}.",
        "",
        "| tree | tokens/prompt (model) | tokens/step (measured) | gradient SNR/token | thought share | "
        "-mean Var[A_k] | gain greedy (mean ± std) | gain sampled (mean ± std) | zero-std thought groups |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, predicted in results["predictions"].items():
        greedy = results["gains"]["gain_greedy"][name]
        sampled = results["gains"]["gain_sampled"][name]
        rows = [r for r in results["runs"] if r["tree"] == name]
        tokens = np.mean([r["tokens_per_step"] for r in rows])
        zero = np.mean([r["zero_std_thought_frac"] for r in rows])
        lines.append(
            f"| {name} | {predicted['tokens']:.0f} | {tokens:.0f} | "
            f"{predicted['gradient_snr_per_token']:.3g} | "
            f"{predicted['thought_share']:.2f} | {predicted['minus_thought_variance']:.3g} | "
            f"{greedy['mean']:+.3f} ± {greedy['std']:.3f} | {sampled['mean']:+.3f} ± {sampled['std']:.3f} | "
            f"{zero:.2f} |"
        )
    lines.append("")
    labels = {
        "gradient_snr_per_token": "gradient SNR/token (the planner's objective, measured repeats)",
        "minus_thought_variance": "thought-advantage variance (the old objective)",
        "gradient_snr_per_token_distinct": "gradient SNR/token with repeats left out",
    }
    lines.append(f"Spearman rank correlation with the mean gain over seeds {results['seeds']} (6 trees):")
    lines.append("")
    lines.append("| objective | greedy gain: rho (p) | sampled gain: rho (p) |")
    lines.append("|---|---|---|")
    for objective, label in labels.items():
        greedy = results["spearman"]["gain_greedy"][objective]
        sampled = results["spearman"]["gain_sampled"][objective]
        lines.append(
            f"| {label} | {greedy['rho']:+.2f} ({greedy['p']:.2f}) | "
            f"{sampled['rho']:+.2f} ({sampled['p']:.2f}) |"
        )
    lines.append("")
    for key, label in (("gain_greedy", "greedy"), ("gain_sampled", "sampled")):
        sep = results["separation"][key]
        gap = sep["best_minus_worst"]
        lines.append(
            f"- {label} gain: Friedman test over trees within seeds p = {sep['friedman_p']:.2f}; best tree "
            f"{sep['best']} minus worst {sep['worst']} on the same seed {gap['mean']:+.3f} ± "
            f"{gap['std']:.3f} (mean ± std over seeds)"
        )
    return "\n".join(lines) + "\n"


def figure(results: dict, out_dir: Path) -> Path:
    """Left: measured greedy gain per tree (dots: seeds; bar: mean ± std over seeds). Right: the gain
    against each objective's rank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["predictions"])
    greedy = results["gains"]["gain_greedy"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(names))
    for i, name in enumerate(names):
        values = [r["gain_greedy"] for r in results["runs"] if r["tree"] == name]
        left.scatter(np.full(len(values), i) + np.linspace(-0.12, 0.12, len(values)), values, s=12, c="C7")
    means = [greedy[name]["mean"] for name in names]
    stds = [greedy[name]["std"] for name in names]
    left.errorbar(x, means, yerr=stds, fmt="o", color="C0", capsize=4, label="mean ± std over seeds")
    left.axhline(0, color="k", lw=0.5)
    left.set_xticks(x, names)
    left.set_ylabel("held-out greedy gain")
    left.set_title(f"trees at ~equal tokens per step, seeds {results['seeds']}")
    left.legend(fontsize=8)
    for objective, color, label in (
        ("gradient_snr_per_token", "C2", "gradient SNR per token"),
        ("minus_thought_variance", "C3", "thought-advantage variance (old)"),
    ):
        order = np.argsort(np.argsort([results["predictions"][n][objective] for n in names]))
        rho = results["spearman"]["gain_greedy"][objective]["rho"]
        right.errorbar(
            order + (0.08 if color == "C2" else -0.08),
            means,
            yerr=stds,
            fmt="o",
            color=color,
            capsize=3,
            label=f"{label}: Spearman {rho:+.2f}",
        )
        for rank, mean, name in zip(order, means, names):
            right.annotate(name, (rank, mean), fontsize=7, xytext=(4, 2), textcoords="offset points")
    right.set_xlabel("predicted rank (0 = predicted worst)")
    right.set_ylabel("held-out greedy gain")
    right.set_title("measured gain against the planner's ranking")
    right.legend(fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "planner.png"
    fig.savefig(path, dpi=130)
    fig.savefig(out_dir / "planner.pdf")
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------
# the command
# ------------------------------------------------------------------------------------------------
def run_sweep(plan: Plan, cache_dir: Path, threads: int = 1, say=print) -> dict:
    """Warm starts and seed choice, then every run, seed by seed (so a cut-short sweep has whole seeds)."""
    torch.set_num_threads(threads)
    started = time.time()
    seeds, tried = choose_seeds(plan, cache_dir, say)
    for seed in seeds:
        measure_inputs(plan, seed, runs.warm_start_folder(seed, cache_dir, base_config(plan, seed)))
        for thoughts, answers in plan.trees:
            record = train_tree(plan, seed, thoughts, answers, cache_dir)
            say(
                f"  seed {seed} {record['tree']}: greedy {record['start_greedy']:.3f} -> "
                f"{record['final_greedy']:.3f} ({time.time() - started:.0f} s)"
            )
    results = collect(plan, seeds, tried, cache_dir)
    results["seconds_this_call"] = round(time.time() - started, 1)
    return results


def main(argv=None) -> dict:
    parser = common.parser(
        "python -m paper_figures.planner", __doc__, "out_dir", "results_dir", "cache_dir", "threads"
    )
    parser.add_argument(
        "--warm-starts",
        type=int,
        default=FULL.seeds,
        help="warm starts kept, one per seed (default: %(default)s)",
    )
    parser.add_argument(
        "--steps", type=int, default=FULL.steps, help="RL steps per run (default: %(default)s)"
    )
    args = parser.parse_args(argv)
    plan = dataclasses.replace(FULL, seeds=args.warm_starts, steps=args.steps)
    results = run_sweep(plan, Path(args.cache_dir), args.threads)
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "planner.json").write_text(json.dumps(results, indent=1))
    table = markdown(results)
    (results_dir / "planner.md").write_text(table)
    path = figure(results, Path(args.out_dir))
    print(table)
    print(f"-> {results_dir / 'planner.json'}, {results_dir / 'planner.md'}, {path} (.pdf)")
    return results


if __name__ == "__main__":
    main()
