"""Markdown tables for the README, generated from RESULTS/training.json only.

    python -m paper_figures.tables [paper_figures/results/training.json] [paper_figures/results/tables.md]

Across seeds a cell reads `mean [min, max]`; a single seed gives the value alone.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np


def spread(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _records(results: dict, group: str, label: str) -> list[dict]:
    return [results["runs"][e["key"]] for e in results["groups"][group]["entries"] if e["label"] == label]


def _stat(recs: list[dict], key: str) -> list[float]:
    return [r["stats"][key] for r in recs]


def _seeds(results: dict, group: str) -> str:
    seeds = sorted({e["seed"] for e in results["groups"][group]["entries"]})
    return f"{len(seeds)} seed{'s' if len(seeds) > 1 else ''} ({', '.join(map(str, seeds))})"


def grad_spike_table(results: dict) -> str:
    clip = results["base_config"]["grad_clip"]
    rows = []
    for label in results["groups"]["ablation"]["labels"]:
        recs = _records(results, "ablation", label)
        pooled = np.concatenate([r["per_step"]["grad_norm"] for r in recs])
        rows.append([label, sum(_stat(recs, "gss_over_10")), spread(_stat(recs, "gss_max"), 2),
                     f"{np.percentile(pooled, 99):.3f}", f"{np.median(pooled):.3f}", f"{pooled.max():.3f}",
                     f"{(pooled > clip).mean():.2f}"])
    return markdown_table(["tree", "GSS@10 (sum over seeds)", "max GSS", "p99 ‖g‖ (pooled)", "median ‖g‖",
                           "max ‖g‖", f"share of steps clipped (‖g‖ > {clip:g})"], rows)


def _final_by_seed(results: dict, group: str, label: str) -> dict[int, float]:
    return {results["runs"][e["key"]]["seed"]: results["runs"][e["key"]]["stats"]["final_greedy_accuracy"]
            for e in results["groups"][group]["entries"] if e["label"] == label}


def ablation_table(results: dict) -> str:
    """Final accuracy per tree, its gain over the start, the paired difference to T16A1 on the same seed (same
    warm start, same held-out prompts: it removes the spread between warm starts), and the share of prompts
    whose K thought values were all equal (no thought-level signal)."""
    rows, reference = [], _final_by_seed(results, "ablation", "T16A1")
    for label in results["groups"]["ablation"]["labels"]:
        recs = _records(results, "ablation", label)
        config = recs[0]["config"]
        gain = [r["stats"]["final_greedy_accuracy"] - r["stats"]["start_greedy_accuracy"] for r in recs]
        paired = [r["stats"]["final_greedy_accuracy"] - reference[r["seed"]] for r in recs if r["seed"] in reference]
        zero = [float(np.mean(r["per_step"]["zero_std_thought_frac"])) for r in recs]
        rows.append([label, config["thoughts"] * config["answers"], spread(_stat(recs, "start_greedy_accuracy")),
                     spread(_stat(recs, "final_greedy_accuracy")), spread(gain), spread(paired),
                     spread(_stat(recs, "final_sampled_accuracy")), spread(zero, 2)])
    return markdown_table(["tree", "answers / prompt", "start (greedy)", "final (greedy)", "gain (greedy)",
                           "final − T16A1 final (same seed)", "final (sampled)", "zero-std thought groups"], rows)


def cost_table(results: dict) -> str:
    labels = results["groups"]["ablation"]["labels"]
    means = {lab: (np.mean(_stat(_records(results, "ablation", lab), "mean_tokens_per_step")),
                   np.mean(_stat(_records(results, "ablation", lab), "mean_step_seconds"))) for lab in labels}
    ref_tokens, ref_seconds = means["T16A1"]
    rows = []
    for label in labels:
        recs = _records(results, "ablation", label)
        tokens, seconds = means[label]
        rows.append([label, f"{tokens:.0f}", f"{seconds:.3f}", spread(_stat(recs, "mean_rollout_seconds")),
                     spread(_stat(recs, "mean_train_seconds")), f"{tokens / ref_tokens:.2f}",
                     f"{seconds / ref_seconds:.2f}", spread(_stat(recs, "final_greedy_accuracy"))])
    return markdown_table(["tree", "tokens / step", "seconds / step", "rollout s", "update s", "tokens vs T16A1",
                           "time vs T16A1", "final (greedy)"], rows)


def pool_table(results: dict) -> str:
    labels = results["groups"]["answer_pool"]["labels"]
    reference = _final_by_seed(results, "answer_pool", labels[0])
    rows = []
    for label in labels:
        recs = _records(results, "answer_pool", label)
        zero = [float(np.mean(r["per_step"]["zero_std_answer_frac"])) for r in recs]
        paired = [r["stats"]["final_greedy_accuracy"] - reference[r["seed"]] for r in recs if r["seed"] in reference]
        gain = [r["stats"]["final_greedy_accuracy"] - r["stats"]["start_greedy_accuracy"] for r in recs]
        rows.append([label, spread(_stat(recs, "final_greedy_accuracy")), spread(gain), spread(paired),
                     spread(_stat(recs, "final_sampled_accuracy")), spread(zero, 2)])
    return markdown_table(["answer advantage over", "final (greedy)", "gain (greedy)",
                           f"final − '{labels[0]}' final (same seed)", "final (sampled)",
                           "zero-std answer groups"], rows)


def kl_table(results: dict) -> str:
    rows = []
    for label in results["groups"]["kl"]["labels"]:
        recs = _records(results, "kl", label)
        beta = recs[0]["per_step"]["beta"]
        kl_end = [r["per_step"]["kl"][-1] for r in recs]
        gain = [r["stats"]["final_greedy_accuracy"] - r["stats"]["start_greedy_accuracy"] for r in recs]
        rows.append([label, f"{min(beta):.3f} to {max(beta):.3f}", spread(_stat(recs, "final_greedy_accuracy")),
                     spread(gain), spread(_stat(recs, "final_sampled_accuracy")),
                     spread(kl_end, 4) if None not in kl_end else "not computed (β = 0)"])
    return markdown_table(["KL weight", "β(s) range", "final (greedy)", "gain (greedy)", "final (sampled)",
                           "KL at the last step"], rows)


def rewards_table(results: dict) -> str:
    """Final accuracy per reward, and the training reward (which differs in scale between rewards) at the
    start and end of training, to show how much each added term varies."""
    labels, rows = results["groups"]["rewards"]["labels"], []
    window = max(1, min(10, len(_records(results, "rewards", labels[0])[0]["per_step"]["reward_mean"]) // 3))
    for label in labels:
        recs = _records(results, "rewards", label)
        first = [float(np.mean(r["per_step"]["reward_mean"][:window])) for r in recs]
        last = [float(np.mean(r["per_step"]["reward_mean"][-window:])) for r in recs]
        gain = [r["stats"]["final_greedy_accuracy"] - r["stats"]["start_greedy_accuracy"] for r in recs]
        rows.append([label, spread(_stat(recs, "final_greedy_accuracy")), spread(gain),
                     spread(_stat(recs, "final_sampled_accuracy")), f"{spread(first, 2)} → {spread(last, 2)}"])
    return markdown_table(["reward", "final (greedy)", "gain (greedy)", "final (sampled)",
                           f"train reward per answer, first → last {window} steps"], rows)


def methods_table(results: dict) -> str:
    group = results["groups"]["methods"]
    families = list(group["entries"][0]["eval"])
    rows = []
    for label in group["labels"]:
        found = [e["eval"] for e in group["entries"] if e["label"] == label]
        row = [label]
        for family in families:
            row += [spread([f[family]["greedy"] for f in found]), spread([f[family]["sampled"] for f in found])]
        rows.append(row)
    header = ["method"]
    for i, family in enumerate(families):
        kind = "same task" if i == 0 else "cross task"
        header += [f"{kind} {family} (greedy)", f"{kind} {family} (sampled)"]
    return markdown_table(header, rows)


def setting(results: dict) -> str:
    plan, env, base = results["plan"], results["environment"], results["base_config"]
    text = (f"Setting: `{plan['name']}`: {plan['steps']} GRPO steps of {base['prompts_per_step']} prompts from a "
            f"{base['warmup_steps']}-step supervised warm-up, lr {base['lr']:g}, held-out accuracy on "
            f"{plan['eval_size']} prompts every {plan['eval_every']} steps; seeds {list(plan['ablation_seeds'])} for "
            f"the T×A ablation and the answer pool, {list(plan['compare_seeds'])} for β, rewards and methods. "
            f"Device {env['device']}, torch {env['torch']}, transformers {env['transformers']}, "
            f"{results['seconds']['jobs']} job(s) × {results['seconds']['threads_per_job']} thread(s). "
            f"One accuracy on {plan['eval_size']} prompts carries a 95% binomial interval of up to "
            f"±{1.96 * (0.25 / plan['eval_size']) ** 0.5:.3f}: smaller differences between single runs are noise.")
    check = results.get("warm_start_check")
    if check:
        text += (f"\n\nWarm-start check (seed {check['seed']}): a plain `grpo_ma.train` warm-up and the cached warm "
                 f"start differ by at most {check['max_abs_weight_diff']:.1e} in any weight; greedy start accuracy "
                 f"{check['plain_start_greedy_accuracy']:.3f} (plain run) vs "
                 f"{check['warm_started_train_start_greedy_accuracy']:.3f} (warm-started run); sampled "
                 f"{check['plain_start_sampled_accuracy']:.3f} vs "
                 f"{check['warm_started_train_start_sampled_accuracy']:.3f} (the sampler's random stream differs).")
    return text


SECTIONS = [("ablation", "Gradient spikes", grad_spike_table), ("ablation", "T×A ablation", ablation_table),
            ("ablation", "Cost", cost_table), ("answer_pool", "Answer-advantage pool", pool_table),
            ("kl", "KL weight: constant β vs GRPO-D", kl_table),
            ("rewards", "Rewards", rewards_table),
            ("methods", "Methods (same start, same number of steps)", methods_table)]


def make_tables(results: dict) -> str:
    parts = ["<!-- generated by `python -m paper_figures` from paper_figures/results/training.json -->",
             setting(results)]
    for group, title, fn in SECTIONS:
        if group in results["groups"]:
            parts.append(f"#### {title} ({_seeds(results, group)})\n\n{fn(results)}")
    return "\n\n".join(parts) + "\n"


def write_tables(json_path, md_path) -> str:
    markdown = make_tables(json.loads(Path(json_path).read_text()))
    Path(md_path).write_text(markdown)
    return markdown


if __name__ == "__main__":
    args = sys.argv[1:] + ["paper_figures/results/training.json", "paper_figures/results/tables.md"][len(sys.argv) - 1:]
    print(write_tables(args[0], args[1]))
