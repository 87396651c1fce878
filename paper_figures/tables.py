"""Markdown for the paper_figures README, generated from the result files in RESULTS/ only.

    python -m paper_figures.tables            # rewrite RESULTS/tables.md and the generated blocks of
                                              # paper_figures/README.md from RESULTS/*.json
    python -m paper_figures.tables --check    # only compare: exit 1 when a block or tables.md is stale

A generated block of the README sits between `<!-- begin generated: NAME ... -->` and
`<!-- end generated: NAME -->`; everything outside the blocks is hand-written and left alone. Across seeds a
cell reads `mean [min, max]`; a single seed gives the value alone.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

from paper_figures import common


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
        rows.append(
            [
                label,
                sum(_stat(recs, "gss_over_10")),
                spread(_stat(recs, "gss_max"), 2),
                f"{np.percentile(pooled, 99):.3f}",
                f"{np.median(pooled):.3f}",
                f"{pooled.max():.3f}",
                f"{(pooled > clip).mean():.2f}",
            ]
        )
    return markdown_table(
        [
            "tree",
            "GSS@10 (sum over seeds)",
            "max GSS",
            "p99 ‖g‖ (pooled)",
            "median ‖g‖",
            "max ‖g‖",
            f"share of steps clipped (‖g‖ > {clip:g})",
        ],
        rows,
    )


def _final_by_seed(results: dict, group: str, label: str) -> dict[int, float]:
    return {
        results["runs"][e["key"]]["seed"]: results["runs"][e["key"]]["stats"]["final_greedy_accuracy"]
        for e in results["groups"][group]["entries"]
        if e["label"] == label
    }


def ablation_table(results: dict) -> str:
    """Final accuracy per tree, its gain over the start, the paired difference to T16A1 on the same seed (same
    warm start, same held-out prompts: it removes the spread between warm starts), and the share of prompts
    whose K thought values were all equal (no thought-level signal)."""
    rows = []
    reference = _final_by_seed(results, "ablation", "T16A1")
    for label in results["groups"]["ablation"]["labels"]:
        recs = _records(results, "ablation", label)
        config = recs[0]["config"]
        gain = [r["stats"]["final_greedy_accuracy"] - r["stats"]["start_greedy_accuracy"] for r in recs]
        paired = [
            r["stats"]["final_greedy_accuracy"] - reference[r["seed"]] for r in recs if r["seed"] in reference
        ]
        zero = [float(np.mean(r["per_step"]["zero_std_thought_frac"])) for r in recs]
        rows.append(
            [
                label,
                config["thoughts"] * config["answers"],
                spread(_stat(recs, "start_greedy_accuracy")),
                spread(_stat(recs, "final_greedy_accuracy")),
                spread(gain),
                spread(paired),
                spread(_stat(recs, "final_sampled_accuracy")),
                spread(zero, 2),
            ]
        )
    return markdown_table(
        [
            "tree",
            "answers / prompt",
            "start (greedy)",
            "final (greedy)",
            "gain (greedy)",
            "final − T16A1 final (same seed)",
            "final (sampled)",
            "zero-std thought groups",
        ],
        rows,
    )


def cost_table(results: dict) -> str:
    labels = results["groups"]["ablation"]["labels"]
    means = {
        lab: (
            np.mean(_stat(_records(results, "ablation", lab), "mean_tokens_per_step")),
            np.mean(_stat(_records(results, "ablation", lab), "mean_step_seconds")),
        )
        for lab in labels
    }
    ref_tokens, ref_seconds = means["T16A1"]
    rows = []
    for label in labels:
        recs = _records(results, "ablation", label)
        tokens, seconds = means[label]
        rows.append(
            [
                label,
                f"{tokens:.0f}",
                f"{seconds:.3f}",
                spread(_stat(recs, "mean_rollout_seconds")),
                spread(_stat(recs, "mean_train_seconds")),
                f"{tokens / ref_tokens:.2f}",
                f"{seconds / ref_seconds:.2f}",
                spread(_stat(recs, "final_greedy_accuracy")),
            ]
        )
    return markdown_table(
        [
            "tree",
            "tokens / step",
            "seconds / step",
            "rollout s",
            "update s",
            "tokens vs T16A1",
            "time vs T16A1",
            "final (greedy)",
        ],
        rows,
    )


def pool_table(results: dict) -> str:
    labels = results["groups"]["answer_pool"]["labels"]
    reference = _final_by_seed(results, "answer_pool", labels[0])
    rows = []
    for label in labels:
        recs = _records(results, "answer_pool", label)
        zero = [float(np.mean(r["per_step"]["zero_std_answer_frac"])) for r in recs]
        paired = [
            r["stats"]["final_greedy_accuracy"] - reference[r["seed"]] for r in recs if r["seed"] in reference
        ]
        gain = [r["stats"]["final_greedy_accuracy"] - r["stats"]["start_greedy_accuracy"] for r in recs]
        rows.append(
            [
                label,
                spread(_stat(recs, "final_greedy_accuracy")),
                spread(gain),
                spread(paired),
                spread(_stat(recs, "final_sampled_accuracy")),
                spread(zero, 2),
            ]
        )
    return markdown_table(
        [
            "answer advantage over",
            "final (greedy)",
            "gain (greedy)",
            f"final − '{labels[0]}' final (same seed)",
            "final (sampled)",
            "zero-std answer groups",
        ],
        rows,
    )


def kl_table(results: dict) -> str:
    rows = []
    for label in results["groups"]["kl"]["labels"]:
        recs = _records(results, "kl", label)
        beta = recs[0]["per_step"]["beta"]
        kl_end = [r["per_step"]["kl"][-1] for r in recs]
        gain = [r["stats"]["final_greedy_accuracy"] - r["stats"]["start_greedy_accuracy"] for r in recs]
        rows.append(
            [
                label,
                f"{min(beta):.3f} to {max(beta):.3f}",
                spread(_stat(recs, "final_greedy_accuracy")),
                spread(gain),
                spread(_stat(recs, "final_sampled_accuracy")),
                spread(kl_end, 4) if None not in kl_end else "not computed (β = 0)",
            ]
        )
    return markdown_table(
        [
            "KL weight",
            "β(s) range",
            "final (greedy)",
            "gain (greedy)",
            "final (sampled)",
            "KL at the last step",
        ],
        rows,
    )


def rewards_table(results: dict) -> str:
    """Final accuracy per reward, and the training reward (which differs in scale between rewards) at the
    start and end of training, to show how much each added term varies."""
    labels = results["groups"]["rewards"]["labels"]
    rows = []
    window = max(1, min(10, len(_records(results, "rewards", labels[0])[0]["per_step"]["reward_mean"]) // 3))
    for label in labels:
        recs = _records(results, "rewards", label)
        first = [float(np.mean(r["per_step"]["reward_mean"][:window])) for r in recs]
        last = [float(np.mean(r["per_step"]["reward_mean"][-window:])) for r in recs]
        gain = [r["stats"]["final_greedy_accuracy"] - r["stats"]["start_greedy_accuracy"] for r in recs]
        rows.append(
            [
                label,
                spread(_stat(recs, "final_greedy_accuracy")),
                spread(gain),
                spread(_stat(recs, "final_sampled_accuracy")),
                f"{spread(first, 2)} → {spread(last, 2)}",
            ]
        )
    return markdown_table(
        [
            "reward",
            "final (greedy)",
            "gain (greedy)",
            "final (sampled)",
            f"train reward per answer, first → last {window} steps",
        ],
        rows,
    )


def methods_table(results: dict) -> str:
    group = results["groups"]["methods"]
    families = list(group["entries"][0]["eval"])
    rows = []
    for label in group["labels"]:
        found = [e["eval"] for e in group["entries"] if e["label"] == label]
        row = [label]
        for family in families:
            row += [
                spread([f[family]["greedy"] for f in found]),
                spread([f[family]["sampled"] for f in found]),
            ]
        rows.append(row)
    header = ["method"]
    for i, family in enumerate(families):
        kind = "same task" if i == 0 else "cross task"
        header += [f"{kind} {family} (greedy)", f"{kind} {family} (sampled)"]
    return markdown_table(header, rows)


def setting(results: dict) -> str:
    plan = results["plan"]
    env = results["environment"]
    base = results["base_config"]
    text = (
        f"Setting: `{plan['name']}`: {plan['steps']} GRPO steps of {base['prompts_per_step']} prompts from a "
        f"{base['warmup_steps']}-step supervised warm-up, lr {base['lr']:g}, held-out accuracy on "
        f"{plan['eval_size']} prompts every {plan['eval_every']} steps; seeds {list(plan['ablation_seeds'])} "
        f"for the T×A ablation and the answer pool, {list(plan['compare_seeds'])} for β, rewards and "
        "methods. "
        f"Device {env['device']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"{results['seconds']['jobs']} job(s) × {results['seconds']['threads_per_job']} thread(s). "
        f"One accuracy on {plan['eval_size']} prompts carries a 95% binomial interval of up to "
        f"±{1.96 * (0.25 / plan['eval_size']) ** 0.5:.3f}: smaller differences between single runs are noise."
    )
    check = results.get("warm_start_check")
    if check:
        text += (
            f"\n\nWarm-start check (seed {check['seed']}): a plain `grpo_ma.train` warm-up and the cached "
            f"warm start differ by at most {check['max_abs_weight_diff']:.1e} in any weight; greedy start "
            f"accuracy {check['plain_start_greedy_accuracy']:.3f} (plain run) vs "
            f"{check['warm_started_train_start_greedy_accuracy']:.3f} (warm-started run); sampled "
            f"{check['plain_start_sampled_accuracy']:.3f} vs "
            f"{check['warm_started_train_start_sampled_accuracy']:.3f} (the sampler's random stream differs)."
        )
    return text


SECTIONS = [
    ("ablation", "Gradient spikes", grad_spike_table),
    ("ablation", "T×A ablation", ablation_table),
    ("ablation", "Cost", cost_table),
    ("answer_pool", "Answer-advantage pool", pool_table),
    ("kl", "KL weight: constant β vs GRPO-D", kl_table),
    ("rewards", "Rewards", rewards_table),
    ("methods", "Methods (same start, same number of steps)", methods_table),
]


def make_tables(results: dict) -> str:
    parts = [
        "<!-- generated by `python -m paper_figures` from paper_figures/results/training.json -->",
        setting(results),
    ]
    for group, title, fn in SECTIONS:
        if group in results["groups"]:
            parts.append(f"#### {title} ({_seeds(results, group)})\n\n{fn(results)}")
    return "\n\n".join(parts) + "\n"


def write_tables(json_path, md_path) -> str:
    markdown = make_tables(json.loads(Path(json_path).read_text()))
    Path(md_path).write_text(markdown)
    return markdown


# ------------------------------------------------------------------------------------------------
# the numbers behind each figure, in words: every number and every "within noise" below is computed
# ------------------------------------------------------------------------------------------------
def half_width(results: dict) -> float:
    """The widest 95% binomial interval (p = 0.5) of one accuracy measured on the plan's eval_size prompts."""
    return 1.96 * (0.25 / results["plan"]["eval_size"]) ** 0.5


def noise_verdict(difference: float, width: float) -> str:
    if abs(difference) < width:
        return f"inside the ±{width:.3f} interval of a single run on these prompts: noise, read it as a tie"
    return f"larger than the ±{width:.3f} interval of a single run on these prompts"


def _gains(recs: list[dict]) -> list[float]:
    return [r["stats"]["final_greedy_accuracy"] - r["stats"]["start_greedy_accuracy"] for r in recs]


def _mean(values) -> float:
    return float(np.mean(values))


def _listing(values: dict[str, float], digits: int = 3) -> str:
    return ", ".join(f"{label} {value:.{digits}f}" for label, value in values.items())


def _trend(values: list[float]) -> str:
    steps = np.diff(values)
    if (steps > 0).all():
        return "rises with every step in M"
    if (steps < 0).all():
        return "falls with every step in M"
    return "is not monotone in M"


def _one_thought_trees(results: dict) -> list[str]:
    """The ablation's K = 4 trees in order of M (the M axis of the ablation)."""
    labels = results["groups"]["ablation"]["labels"]
    return [lab for lab in labels if _records(results, "ablation", lab)[0]["config"]["thoughts"] == 4]


def _pooled_grad_norms(results: dict, label: str) -> np.ndarray:
    """‖g‖ before clipping of every step of every seed of one ablation tree."""
    return np.concatenate([r["per_step"]["grad_norm"] for r in _records(results, "ablation", label)])


def grad_spike_findings(results: dict) -> str:
    labels = results["groups"]["ablation"]["labels"]
    seeds = len({e["seed"] for e in results["groups"]["ablation"]["entries"]})
    clip = results["base_config"]["grad_clip"]
    spikes = {lab: sum(_stat(_records(results, "ablation", lab), "gss_over_10")) for lab in labels}
    median = {lab: float(np.median(_pooled_grad_norms(results, lab))) for lab in labels}
    p99 = {lab: float(np.percentile(_pooled_grad_norms(results, lab), 99)) for lab in labels}
    clipped = {lab: float(np.mean(_pooled_grad_norms(results, lab) > clip)) for lab in labels}
    gss_max = {lab: spread(_stat(_records(results, "ablation", lab), "gss_max"), 2) for lab in labels}
    if sum(spikes.values()) == 0:
        text = (
            "No step of any tree had a gradient spike: GSS@10 (steps with GSS > 10) is 0 for all "
            f"{len(labels)} trees over {seeds} seeds × {results['plan']['steps']} steps."
        )
    else:
        text = f"Steps with GSS > 10, summed over seeds: {_listing(spikes, 0)}."
    along_m = [median[lab] for lab in _one_thought_trees(results)]
    text += (
        f" Largest spike score (max GSS, mean [min, max] over seeds): T4A4 {gss_max['T4A4']}, "
        f"T16A1 {gss_max['T16A1']}. Median ‖g‖ before clipping: {_listing(median)}; along M it "
        f"{_trend(along_m)}. 99th percentile: T16A1 {p99['T16A1']:.3f}, T4A4 {p99['T4A4']:.3f}. "
        f"Share of steps clipped at ‖g‖ > {clip:g}: {_listing(clipped, 2)}."
    )
    flat = []
    for lab in labels:
        for r in _records(results, "ablation", lab):
            ps = r["per_step"]
            rows = zip(ps["grad_norm"], ps["zero_std_thought_frac"], ps["zero_std_answer_frac"])
            flat += [(lab, norm) for norm, thought, answer in rows if thought == 1 and answer == 1]
    if flat:
        trees = sorted({lab for lab, _ in flat}, key=labels.index)
        text += (
            f" {len(flat)} steps ({', '.join(trees)}) had equal rewards in every group, so only the KL term "
            f"gave a gradient: their ‖g‖ is at most {max(norm for _, norm in flat):.4f}."
        )
    return text


def ablation_findings(results: dict) -> str:
    labels = results["groups"]["ablation"]["labels"]
    gains = {lab: _gains(_records(results, "ablation", lab)) for lab in labels}
    means = {lab: _mean(v) for lab, v in gains.items()}
    best = max(means, key=means.get)
    reference = _final_by_seed(results, "ablation", "T16A1")
    paired = [
        r["stats"]["final_greedy_accuracy"] - reference[r["seed"]]
        for r in _records(results, "ablation", "T4A4")
        if r["seed"] in reference
    ]
    seeds = len(next(iter(gains.values())))
    if all(g > 0 for v in gains.values() for g in v):
        text = "Every tree raised held-out greedy accuracy on every seed"
    else:
        text = "Not every tree raised held-out greedy accuracy on every seed"
    text += (
        f": mean gain {_listing(means)} ({seeds} seeds). Largest mean gain: {best}, {spread(gains[best])}. "
        f"T4A4 minus T16A1 on the same seed: {spread(paired)}."
    )
    along_m = _one_thought_trees(results)
    text += f" Along M ({', '.join(along_m)}) the mean gain {_trend([means[lab] for lab in along_m])}."
    largest = max(means.values()) - min(means.values())
    seed_spread = min(max(v) - min(v) for v in gains.values())
    relation = "smaller" if largest < seed_spread else "larger"
    text += (
        f" The largest difference between two trees' mean gains, {largest:.3f}, is {relation} than the "
        f"smallest spread of one tree's gain between seeds ({seed_spread:.3f}), and "
        f"{noise_verdict(largest, half_width(results))}."
    )
    zero = {}
    for lab in along_m:
        recs = _records(results, "ablation", lab)
        zero[lab] = _mean([np.mean(r["per_step"]["zero_std_thought_frac"]) for r in recs])
    text += (
        " The mean share of prompts whose K thought values were all equal (no thought-level signal) "
        f"{_trend(list(zero.values()))}: {_listing(zero, 2)}."
    )
    starts = {r["seed"]: r["stats"]["start_greedy_accuracy"] for r in _records(results, "ablation", "T16A1")}
    listed = ", ".join(f"{value:.3f} (seed {seed})" for seed, value in sorted(starts.items()))
    return text + f" Start accuracy of each seed's warm start: {listed}."


COST_KEYS = ("mean_tokens_per_step", "mean_step_seconds", "mean_rollout_seconds", "mean_train_seconds")


def cost_findings(results: dict) -> str:
    per_step = {}
    for lab in results["groups"]["ablation"]["labels"]:
        recs = _records(results, "ablation", lab)
        config = recs[0]["config"]
        per_step[lab] = {key: _mean(_stat(recs, key)) for key in COST_KEYS}
        per_step[lab]["rows"] = config["prompts_per_step"] * config["thoughts"] * config["answers"]
        per_step[lab]["gain"] = _mean(_gains(recs))
    ma = per_step["T4A4"]
    grpo = per_step["T16A1"]
    tokens = ma["mean_tokens_per_step"] / grpo["mean_tokens_per_step"]
    seconds = ma["mean_step_seconds"] / grpo["mean_step_seconds"]
    text = (
        f"Per step, T4A4 generates {tokens:.2f}× the tokens of T16A1 ({ma['mean_tokens_per_step']:.0f} vs "
        f"{grpo['mean_tokens_per_step']:.0f}) and takes {seconds:.2f}× the time "
        f"({ma['mean_step_seconds']:.3f} vs {grpo['mean_step_seconds']:.3f} s). Rollout: "
        f"{ma['mean_rollout_seconds']:.3f} vs {grpo['mean_rollout_seconds']:.3f} s; update: "
        f"{ma['mean_train_seconds']:.3f} vs {grpo['mean_train_seconds']:.3f} s, on {ma['rows']} vs "
        f"{grpo['rows']} training rows (one row per answer: prompts × K × M). Mean final gain: T4A4 "
        f"{ma['gain']:.3f}, T16A1 {grpo['gain']:.3f}."
    )
    if "T4A8" in per_step:
        wide = per_step["T4A8"]
        text += (
            f" T4A8 takes {wide['mean_step_seconds'] / grpo['mean_step_seconds']:.2f}× the time of T16A1 per "
            f"step ({wide['rows']} rows per update)."
        )
    return text + (
        f" Times are from `{results['environment']['device']}` with {results['seconds']['jobs']} run(s) side "
        "by side; the token counts do not depend on the machine."
    )


def pool_findings(results: dict) -> str:
    labels = results["groups"]["answer_pool"]["labels"]
    reference = _final_by_seed(results, "answer_pool", labels[0])
    other = _records(results, "answer_pool", labels[1])
    paired = [
        r["stats"]["final_greedy_accuracy"] - reference[r["seed"]] for r in other if r["seed"] in reference
    ]
    zero = {}
    for lab in labels:
        recs = _records(results, "answer_pool", lab)
        zero[lab] = _mean([np.mean(r["per_step"]["zero_std_answer_frac"]) for r in recs])
    if all(p < 0 for p in paired):
        sign = f"lower than '{labels[0]}' on each of the {len(paired)} seeds"
    elif all(p > 0 for p in paired):
        sign = f"higher than '{labels[0]}' on each of the {len(paired)} seeds"
    else:
        sign = f"neither lower nor higher than '{labels[0]}' on every seed"
    return (
        f"'{labels[1]}' ends {sign}: final minus '{labels[0]}' final on the same seed {spread(paired)}. "
        f"The mean difference is {noise_verdict(_mean(paired), half_width(results))}. Mean share of answer "
        f"groups with equal rewards (no answer-level advantage): {_listing(zero, 2)}."
    )


def kl_findings(results: dict) -> str:
    labels = results["groups"]["kl"]["labels"]
    finals = {lab: _mean(_stat(_records(results, "kl", lab), "final_greedy_accuracy")) for lab in labels}
    gains = [g for lab in labels for g in _gains(_records(results, "kl", lab))]
    last = [r["per_step"]["kl"][-1] for lab in labels for r in _records(results, "kl", lab)]
    top = max(finals, key=finals.get)
    bottom = min(finals, key=finals.get)
    width = finals[top] - finals[bottom]
    text = (
        f"Every setting's gain lies in {min(gains):.3f} to {max(gains):.3f}. "
        f"Highest final accuracy: {top} ({finals[top]:.3f}); lowest: {bottom} ({finals[bottom]:.3f}). "
        f"That spread of {width:.3f} is {noise_verdict(width, half_width(results))}."
    )
    measured = [kl for kl in last if kl is not None]
    if measured:
        text += f" KL to the start policy at the last step: {min(measured):.3f} to {max(measured):.3f}."
    return text


def rewards_findings(results: dict) -> str:
    labels = results["groups"]["rewards"]["labels"]
    finals = {lab: _mean(_stat(_records(results, "rewards", lab), "final_greedy_accuracy")) for lab in labels}
    gains = [g for lab in labels for g in _gains(_records(results, "rewards", lab))]
    width = max(finals.values()) - min(finals.values())
    text = (
        f"All {len(labels)} reward sets end at {min(finals.values()):.3f} to "
        f"{max(finals.values()):.3f} (gain {min(gains):.3f} to {max(gains):.3f}); the spread of {width:.3f} "
        f"is {noise_verdict(width, half_width(results))}."
    )
    window = max(1, min(10, len(_records(results, "rewards", labels[0])[0]["per_step"]["reward_mean"]) // 3))
    first = {}
    for lab in labels:
        recs = _records(results, "rewards", lab)
        first[lab] = _mean([np.mean(r["per_step"]["reward_mean"][:window]) for r in recs])
    with_rvr = [lab for lab in labels if "StepRVR" in lab and "StepRAR" not in lab]
    if with_rvr:
        rvr = with_rvr[0]
        text += (
            f" Over the first {window} steps, '{rvr}' has a mean training reward per answer "
            f"{first[rvr] - first[labels[0]]:.2f} higher than '{labels[0]}' ({first[rvr]:.2f} vs "
            f"{first[labels[0]]:.2f}); StepRVR pays 0 or 1 per answer."
        )
    alpha = results["base_config"].get("step_alpha")
    if alpha is not None:
        text += f" StepRAR's key-step weight α is {alpha:g}."
    return text


def methods_findings(results: dict) -> str:
    group = results["groups"]["methods"]
    families = list(group["entries"][0]["eval"])
    kinds = {e["label"]: results["runs"][e["key"]]["kind"] for e in group["entries"]}

    def greedy(label: str, family: str) -> float:
        return _mean([e["eval"][family]["greedy"] for e in group["entries"] if e["label"] == label])

    parts = [f"Every method starts from the same warm start and trains {results['plan']['steps']} steps."]
    gaps = []
    for index, family in enumerate(families):
        scores = {lab: greedy(lab, family) for lab in group["labels"]}
        rl = [scores[lab] for lab in group["labels"] if kinds[lab] == "grpo"]
        sft = {lab: scores[lab] for lab in group["labels"] if kinds[lab] == "sft"}
        start = [scores[lab] for lab in group["labels"] if kinds[lab] == "start"]
        best = max(scores, key=scores.get)
        kind = "Same task" if index == 0 else "Cross task"
        parts.append(
            f"{kind} ({family}, greedy): best {best} ({scores[best]:.3f}); start {start[0]:.3f}; RL variants "
            f"{min(rl):.3f} to {max(rl):.3f}; {_listing(sft)}."
        )
        for variant in ("GRPO-D (T16A1)", "GRPO-MA (T4A4)"):
            if variant in scores and "GRPO (T16A1)" in scores:
                gaps.append(abs(scores[variant] - scores["GRPO (T16A1)"]))
    if gaps:
        parts.append(
            f"GRPO-D vs GRPO and GRPO-MA vs GRPO differ by at most {max(gaps):.3f} in either family: "
            f"{noise_verdict(max(gaps), half_width(results))}."
        )
    return " ".join(parts)


# ------------------------------------------------------------------------------------------------
# the default runs (RESULTS/default_runs.json), the variance figures (RESULTS/variance.json), and times
# ------------------------------------------------------------------------------------------------
def wall_seconds(summary: dict) -> float:
    """A grpo_ma run's wall-clock seconds from its summary.json: `wall_seconds` (every part of a resumed run),
    or `wall_seconds_this_run` in summaries written by earlier versions of grpo_ma.py."""
    if "wall_seconds" in summary:
        return summary["wall_seconds"]
    return summary["wall_seconds_this_run"]


def runs_table(rows: list[dict]) -> str:
    """One row per seed of `python grpo_ma.py --seed S` (paper_figures/default_runs.py)."""
    header = [
        "seed",
        "held-out greedy: start → after",
        "held-out sampled (T=1): start → after",
        "gain (greedy)",
        "wall time",
    ]
    return (
        markdown_table(
            header,
            [
                [
                    r["seed"],
                    f"{r['start_greedy_accuracy']:.3f} → {r['final_greedy_accuracy']:.3f}",
                    f"{r['start_sampled_accuracy']:.3f} → {r['final_sampled_accuracy']:.3f}",
                    f"{100 * (r['final_greedy_accuracy'] - r['start_greedy_accuracy']):+.1f} pts",
                    f"{wall_seconds(r) / 60:.1f} min",
                ]
                for r in rows
            ],
        )
        + "\n"
    )


def default_runs_block(default_runs: dict) -> str:
    rows = default_runs["runs"]
    meta = default_runs["meta"]
    trees = ", ".join(sorted({r["config"] for r in rows}))
    steps = ", ".join(str(s) for s in sorted({r["steps"] for r in rows}))
    return runs_table(rows) + (
        f"\n`{meta['command']}` ({trees}, {steps} steps) on {rows[0]['device']} ({meta['machine']}, "
        f"{meta['cpu_threads']} torch threads), torch {meta['torch']}, transformers {meta['transformers']}."
    )


def counting_vlm_block(counting: dict) -> str:
    """One row per run of `python -m demos.counting_vlm` (RESULTS/counting_vlm.json)."""
    header = ["seed", "LoRA rank", "held-out greedy: start → after", "sampled (T=1): start → after"]
    header += ["gain (greedy)", "wall time"]
    rows = [
        [
            r["seed"],
            r["lora_rank"] or "— (full)",
            f"{r['start_greedy_accuracy']:.3f} → {r['final_greedy_accuracy']:.3f}",
            f"{r['start_sampled_accuracy']:.3f} → {r['final_sampled_accuracy']:.3f}",
            f"{100 * (r['final_greedy_accuracy'] - r['start_greedy_accuracy']):+.1f} pts",
            f"{r['wall_seconds'] / 60:.1f} min",
        ]
        for r in counting["runs"]
    ]
    meta = counting["meta"]
    return markdown_table(header, rows) + (
        f"\n\n`{meta['command']}` on the CPU ({meta['machine']}, {meta['cpu_threads']} torch threads), "
        f"torch {meta['torch']}, transformers {meta['transformers']}."
    )


def variance_block(variance: dict) -> str:
    setting_ = variance["setting"]
    budget = variance["budget_heatmap"]
    floors = variance["variance_vs_k"]["floors"]
    floor_rows = [[m, f"{f['leading']:.3f}", f"{f['finite']:.3f}"] for m, f in floors.items()]
    floor_table = markdown_table(["M", "floor in K, leading order", "floor in K, finite M"], floor_rows)
    best_rows = [
        [f"≤ {b} tokens", best["grid"], best["exact"], f"{best['variance']:.4f}"]
        for b, best in budget["best"].items()
    ]
    best_table = markdown_table(
        ["budget", "best tree on the grid", "best tree, all K and M", "mean Var[A_k]"], best_rows
    )
    mode = "fast" if setting_["fast"] else "full"
    return (
        f"Setting: E[σ²]/σ_θ² = {setting_['ratio']:g} (heatmap: {budget['ratio']:g}), ddof "
        f"{setting_['ddof']}, eps {setting_['eps']:g}, {setting_['thought_samples_per_point']} "
        f"thought samples per Monte Carlo point ({mode} setting); heatmap costs "
        f"L_t = {budget['thought_len']:g}, L_a = {budget['answer_len']:g} tokens."
        f"\n\n{floor_table}\n\n{best_table}"
    )


def times_block(training: dict | None, variance: dict | None, default_runs: dict | None) -> str:
    rows = []
    if variance is not None:
        mode = "--fast" if variance["setting"]["fast"] else "default (full)"
        rows.append(["`python -m paper_figures.variance`", mode, f"{variance['seconds']:g} s"])
    if training is not None:
        seconds = training["seconds"]
        jobs = seconds["jobs"]
        runs_min = seconds["runs_when_computed"] / 60
        rows.append(
            [
                "`python -m paper_figures.training`",
                f"--fast --jobs {jobs}" if training["plan"]["name"] == "fast" else f"--jobs {jobs}",
                f"{runs_min:.1f} min of runs in all (about {runs_min / jobs:.1f} min on {jobs} jobs), "
                f"{training['environment']['device']}",
            ]
        )
    if default_runs is not None:
        total = sum(wall_seconds(r) for r in default_runs["runs"]) / 60
        rows.append(
            [
                "`python -m paper_figures.default_runs --rerun`",
                f"seeds {', '.join(str(r['seed']) for r in default_runs['runs'])}",
                f"{total:.1f} min, {default_runs['runs'][0]['device']}",
            ]
        )
    return markdown_table(["command", "setting", "time the committed results took"], rows)


# ------------------------------------------------------------------------------------------------
# the README's generated blocks
# ------------------------------------------------------------------------------------------------
BEGIN = "<!-- begin generated: {name} (python -m paper_figures.tables; do not edit by hand) -->"
END = "<!-- end generated: {name} -->"
BLOCK = re.compile(
    r"<!-- begin generated: (?P<name>[\w-]+) [^\n]*-->\n.*?<!-- end generated: (?P=name) -->", re.S
)

TRAINING_BLOCKS = {
    "grad_spikes": ("ablation", grad_spike_table, grad_spike_findings),
    "ta_ablation": ("ablation", ablation_table, ablation_findings),
    "cost": ("ablation", cost_table, cost_findings),
    "answer_pool": ("answer_pool", pool_table, pool_findings),
    "kl_schedule": ("kl", kl_table, kl_findings),
    "rewards": ("rewards", rewards_table, rewards_findings),
    "methods": ("methods", methods_table, methods_findings),
}


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def readme_blocks(results_dir) -> dict[str, str]:
    """Every generated block, by name, from the result files in results_dir (a missing file: no blocks)."""
    results_dir = Path(results_dir)
    training = _load(results_dir / "training.json")
    variance = _load(results_dir / "variance.json")
    default_runs = _load(results_dir / "default_runs.json")
    blocks = {"times": times_block(training, variance, default_runs)}
    if default_runs is not None:
        blocks["default_runs"] = default_runs_block(default_runs)
    for path in sorted(results_dir.glob("default_runs_lora*.json")):  # python -m paper_figures.default_runs
        blocks[path.stem] = default_runs_block(json.loads(path.read_text()))
    counting = _load(results_dir / "counting_vlm.json")
    if counting is not None:
        blocks["counting_vlm"] = counting_vlm_block(counting)
    if variance is not None:
        blocks["variance"] = variance_block(variance)
    if training is not None:
        blocks["setting"] = setting(training)
        for name, (group, table, findings) in TRAINING_BLOCKS.items():
            if group in training["groups"]:
                blocks[name] = (
                    f"{table(training)}\n\n_{_seeds(training, group)}; generated from "
                    f"`results/training.json`._\n\n{findings(training)}"
                )
    return blocks


def fill_readme(text: str, blocks: dict[str, str]) -> str:
    """`text` with every generated block's body replaced; a block the README names but the results cannot
    make is an error (a stale block must not stay behind)."""

    def replace(match: re.Match) -> str:
        name = match["name"]
        if name not in blocks:
            raise KeyError(f"the README has a generated block {name!r} that the result files cannot make")
        return f"{BEGIN.format(name=name)}\n{blocks[name].rstrip()}\n{END.format(name=name)}"

    return BLOCK.sub(replace, text)


def blocks_of(text: str) -> dict[str, str]:
    """The generated blocks of a README, markers included, by name."""
    return {m["name"]: m[0] for m in BLOCK.finditer(text)}


def update(results_dir=common.RESULTS_DIR, readme=common.README, check: bool = False) -> list[str]:
    """Rewrite results_dir/tables.md and the README's generated blocks from the result files; with `check`,
    write nothing. Returns the names of what was stale (what was rewritten, or with check what would be)."""
    results_dir = Path(results_dir)
    readme = Path(readme)
    stale = []
    training_json = results_dir / "training.json"
    if training_json.exists():
        markdown = make_tables(json.loads(training_json.read_text()))
        tables_md = results_dir / "tables.md"
        if not tables_md.exists() or tables_md.read_text() != markdown:
            stale.append(str(tables_md))
            if not check:
                tables_md.write_text(markdown)
    text = readme.read_text()
    filled = fill_readme(text, readme_blocks(results_dir))
    if filled != text:
        old = blocks_of(text)
        new = blocks_of(filled)
        stale += [f"{readme}: {name}" for name in new if old.get(name) != new[name]]
        if not check:
            readme.write_text(filled)
    return stale


def main(argv=None) -> int:
    args = common.parser("python -m paper_figures.tables", __doc__, "results_dir")
    args.add_argument(
        "--readme", default=str(common.README), help="the README to fill (default: %(default)s)"
    )
    args.add_argument("--check", action="store_true", help="write nothing; exit 1 when something is stale")
    parsed = args.parse_args(argv)
    try:
        stale = update(parsed.results_dir, parsed.readme, check=parsed.check)
    except (KeyError, OSError, json.JSONDecodeError) as error:
        print(f"paper_figures.tables: error: {error}", file=sys.stderr)
        return 2
    if parsed.check:
        print("stale: " + ", ".join(stale) if stale else "up to date")
        return 1 if stale else 0
    print("rewrote: " + ", ".join(stale) if stale else "already up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
