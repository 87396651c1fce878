"""The training figures, drawn from the results dict (RESULTS/training.json) only: no run happens here.
paper_figures/README.md has one section per figure.

Across seeds a line is the mean and a band the min-max spread; dots are single seeds.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

COLORS = {"T16A1": "C3", "T4A1": "C7", "T4A2": "C1", "T4A4": "C0", "T4A8": "C2"}


# ------------------------------------------------------------------------------------------------
# reading the results
# ------------------------------------------------------------------------------------------------
def entries(results: dict, group: str, label: str) -> list[dict]:
    return [e for e in results["groups"][group]["entries"] if e["label"] == label]


def records(results: dict, group: str, label: str) -> list[dict]:
    return [results["runs"][e["key"]] for e in entries(results, group, label)]


def curves(results: dict, group: str, label: str, gain: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Eval steps and a (seeds, evals) array of greedy held-out accuracy; with `gain`, minus each seed's start
    accuracy, so that seeds whose warm-ups landed far apart can share a band."""
    recs = records(results, group, label)
    ys = np.array([r["curve"]["greedy"] for r in recs], dtype=float)
    return np.array(recs[0]["curve"]["step"]), ys - ys[:, :1] if gain else ys


def final_gains(results: dict, group: str, label: str) -> list[float]:
    return [
        r["stats"]["final_greedy_accuracy"] - r["stats"]["start_greedy_accuracy"]
        for r in records(results, group, label)
    ]


def setting_line(results: dict) -> str:
    plan = results["plan"]
    env = results["environment"]
    seeds = sorted({e["seed"] for g in results["groups"].values() for e in g["entries"]})
    return (
        f"{plan['name']} setting: {plan['steps']} steps, {len(seeds)} seed(s) at most, held-out accuracy on "
        f"{plan['eval_size']} prompts; {env['device']}, torch {env['torch']}"
    )


# ------------------------------------------------------------------------------------------------
# drawing helpers
# ------------------------------------------------------------------------------------------------
def band(ax, x, ys: np.ndarray, color, label: str, **line) -> None:
    """Mean line with a min-max band over seeds (rows of ys)."""
    ax.plot(x, ys.mean(0), color=color, label=label, **line)
    if len(ys) > 1:
        ax.fill_between(x, ys.min(0), ys.max(0), color=color, alpha=0.15, lw=0)


def binomial_half_width(p: float, n: int) -> float:
    """Half-width of the normal-approximation 95% interval of an accuracy p measured on n prompts."""
    return 1.96 * float(np.sqrt(max(p * (1 - p), 0.25 / n) / n))


def bars(
    ax,
    labels: list[str],
    values: list[list[float]],
    colors,
    eval_size: int,
    accuracies: list[list[float]] | None = None,
) -> None:
    """One bar per label at the seed mean with the value on top. Several seeds: min-max whiskers and a dot
    per seed. One seed: the 95% binomial interval of the accuracy behind the bar (`accuracies`, default the
    values themselves) on eval_size prompts, to show which differences are within evaluation noise."""
    means = [float(np.mean(v)) for v in values]
    x = np.arange(len(labels))
    ax.bar(x, means, color=colors, alpha=0.75, width=0.65)
    for i, v in enumerate(values):
        if len(v) > 1:
            ax.errorbar(
                i, means[i], yerr=[[means[i] - min(v)], [max(v) - means[i]]], color="k", capsize=3, lw=1
            )
            ax.scatter([i] * len(v), v, color="k", s=10, zorder=3)
        else:
            acc = (accuracies or values)[i][0]
            ax.errorbar(i, means[i], yerr=binomial_half_width(acc, eval_size), color="0.3", capsize=3, lw=1)
        ax.text(i + 0.05, means[i], f" {means[i]:.3f}", ha="left", va="bottom", fontsize=7)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)


def whisker_note(results: dict, group: str) -> str:
    """What the whiskers of a group's bars mean: the seed spread, or with one seed the evaluation noise."""
    if n_seeds(results, group) > 1:
        return "bar: mean; whiskers: min–max over seeds"
    return f"whiskers: 95% binomial interval, {results['plan']['eval_size']} prompts"


def n_seeds(results: dict, group: str) -> int:
    return len({e["seed"] for e in results["groups"][group]["entries"]})


def finals_accuracy(results: dict, group: str, label: str) -> list[float]:
    return [r["stats"]["final_greedy_accuracy"] for r in records(results, group, label)]


def start_line(results: dict, group: str) -> str:
    """'start accuracy 0.47 (seed 0), ...' for a title: what the gains are measured from."""
    starts = {}
    for e in results["groups"][group]["entries"]:
        record = results["runs"][e["key"]]
        if record["kind"] == "grpo":
            starts[e["seed"]] = record["stats"]["start_greedy_accuracy"]
    return "start accuracy " + ", ".join(f"{v:.3f} (seed {s})" for s, v in sorted(starts.items()))


def save_figure(fig, out_dir: Path, name: str) -> str:
    """PNG and PDF of `fig` into out_dir; shared by every figure script of paper_figures/."""
    for ext in ("png", "pdf"):  # no creation date in the PDF, so an unchanged figure gives an unchanged file
        fig.savefig(
            out_dir / f"{name}.{ext}",
            dpi=150,
            bbox_inches="tight",
            metadata={"CreationDate": None} if ext == "pdf" else None,
        )
    plt.close(fig)
    return name


def save(fig, out_dir: Path, name: str, results: dict) -> str:
    fig.text(0.5, -0.02, setting_line(results), ha="center", fontsize=7, color="0.35")
    return save_figure(fig, out_dir, name)


# ------------------------------------------------------------------------------------------------
# the figures
# ------------------------------------------------------------------------------------------------
GAIN_LABEL = "held-out accuracy gain over start (greedy)"


def grad_spikes(results: dict, out_dir: Path) -> str:
    """out/grad_spikes: grad norm before clipping and GSS over training, T16A1 vs T4A4."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    clip = results["base_config"]["grad_clip"]
    for label in ("T16A1", "T4A4"):
        recs = records(results, "ablation", label)
        color = COLORS[label]
        pooled = np.concatenate([r["per_step"]["grad_norm"] for r in recs])
        p99 = np.percentile(pooled, 99)
        gss10 = sum(r["stats"]["gss_over_10"] for r in recs)
        for i, r in enumerate(recs):
            name = f"{label}: p99 {p99:.2f}, GSS@10 = {gss10} ({len(recs)} seeds)" if i == 0 else None
            left.plot(
                r["per_step"]["step"], r["per_step"]["grad_norm"], color=color, lw=0.9, alpha=0.7, label=name
            )
            gss = [np.nan if g is None else g for g in r["per_step"]["gss"]]
            right.plot(
                r["per_step"]["step"], gss, color=color, lw=0.9, alpha=0.7, label=label if i == 0 else None
            )
        left.axhline(p99, color=color, ls="--", lw=1)
    left.axhline(clip, color="k", ls=":", lw=1, label=f"clip threshold {clip:g}")
    right.axhline(10, color="k", ls=":", lw=1, label="GSS = 10 (a spike)")
    left.set(
        xlabel="step", ylabel="‖g‖ before clipping", title="Gradient norm (dashed: pooled 99th percentile)"
    )
    right.set(
        xlabel="step",
        ylabel="GSS = ‖g_t‖ / mean of previous ‖g‖",
        title="Gradient spike score",
        ylim=(0, 11.5),
    )
    left.set_ylim(bottom=0)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(
        "Gradient spikes: T16A1 vs T4A4, 16 answers per prompt each, same seeds (one line per seed)",
        fontsize=11,
    )
    fig.tight_layout()
    return save(fig, out_dir, "grad_spikes", results)


def curves_panel(ax, results: dict, group: str, labels: list[str], colors: list) -> None:
    for label, color in zip(labels, colors):
        steps, ys = curves(results, group, label)
        band(ax, steps, ys, color, label, marker="o", ms=3)
    ax.axhline(0, color="k", lw=0.8)
    several = n_seeds(results, group) > 1
    ax.set(
        xlabel="step",
        ylabel=GAIN_LABEL,
        title="Held-out accuracy gain" + (" (mean; band: min–max over seeds)" if several else " (one seed)"),
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")


def gain_bars(ax, results: dict, group: str, labels: list[str], colors: list) -> None:
    bars(
        ax,
        labels,
        [final_gains(results, group, lab) for lab in labels],
        colors,
        results["plan"]["eval_size"],
        accuracies=[finals_accuracy(results, group, lab) for lab in labels],
    )
    ax.set(ylabel="final gain over start (greedy)")
    ax.set_title(f"Final gain ({whisker_note(results, group)})", fontsize=10)


def ta_ablation(results: dict, out_dir: Path) -> str:
    """out/ta_ablation: held-out accuracy gain vs step for every tree shape; final gain per seed."""
    labels = results["groups"]["ablation"]["labels"]
    colors = [COLORS.get(lab) for lab in labels]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    curves_panel(left, results, "ablation", labels, colors)
    gain_bars(right, results, "ablation", labels, colors)
    fig.suptitle(
        f"T×A ablation, K thoughts × M answers per thought ({start_line(results, 'ablation')})", fontsize=10
    )
    fig.tight_layout()
    return save(fig, out_dir, "ta_ablation", results)


def cost(results: dict, out_dir: Path) -> str:
    """out/cost: accuracy gain vs generated tokens and vs wall-clock; per-step cost ratios to T16A1."""
    labels = results["groups"]["ablation"]["labels"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    per_step = {}
    for label in labels:
        recs = records(results, "ablation", label)
        steps, ys = curves(results, "ablation", label)
        tokens = np.mean(
            [np.concatenate([[0], np.cumsum(r["per_step"]["tokens_generated"])]) for r in recs], axis=0
        )
        seconds = np.mean(
            [np.concatenate([[0], np.cumsum(r["per_step"]["step_seconds"])]) for r in recs], axis=0
        )
        band(axes[0], tokens[steps], ys, COLORS.get(label), label, marker="o", ms=3)
        band(axes[1], seconds[steps], ys, COLORS.get(label), label, marker="o", ms=3)
        per_step[label] = (
            np.mean([r["stats"]["mean_tokens_per_step"] for r in recs]),
            np.mean([r["stats"]["mean_step_seconds"] for r in recs]),
        )
    axes[0].set(
        xlabel="generated tokens (cumulative, mean over seeds)", ylabel=GAIN_LABEL, title="Gain vs tokens"
    )
    axes[1].set(
        xlabel="rollout + update seconds (cumulative, evaluation excluded)", title="Gain vs wall-clock"
    )
    ref_tokens, ref_seconds = per_step["T16A1"]
    x = np.arange(len(labels))
    for offset, index, name, color in (
        (-0.2, 0, "generated tokens / step", "0.55"),
        (0.2, 1, "seconds / step", "C0"),
    ):
        ratios = [per_step[lab][index] / per_step["T16A1"][index] for lab in labels]
        axes[2].bar(x + offset, ratios, 0.4, label=name, color=color)
        for i, ratio in enumerate(ratios):
            axes[2].text(i + offset, ratio + 0.02, f"{ratio:.2f}", ha="center", fontsize=7)
    axes[2].axhline(1, color="k", lw=0.8)
    axes[2].set_xticks(x, labels)
    axes[2].set(
        ylabel="relative to T16A1",
        title=f"Cost per step / T16A1 ({ref_tokens:.0f} tokens, {ref_seconds:.2f} s)",
    )
    axes[2].legend(fontsize=8, loc="upper left")
    for ax in axes[:2]:
        ax.axhline(0, color="k", lw=0.8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle("Cost: accuracy gain per generated token and per second of training", fontsize=11)
    fig.tight_layout()
    return save(fig, out_dir, "cost", results)


def curve_and_bars(results: dict, out_dir: Path, group: str, name: str, title: str) -> str:
    """Accuracy-gain curves (left) and final gain per setting (right) for one comparison group."""
    labels = results["groups"][group]["labels"]
    colors = [f"C{i}" for i in range(len(labels))]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 2]})
    curves_panel(left, results, group, labels, colors)
    gain_bars(right, results, group, labels, colors)
    fig.suptitle(f"{title} ({start_line(results, group)})", fontsize=10)
    fig.tight_layout()
    return save(fig, out_dir, name, results)


def kl_schedule(results: dict, out_dir: Path) -> str:
    """out/kl_schedule: beta(s) of each setting, the gain curves and the final gain (OThink-MR1 Fig. 6
    style)."""
    labels = results["groups"]["kl"]["labels"]
    colors = [f"C{i}" for i in range(len(labels))]
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(15, 4.2), gridspec_kw={"width_ratios": [2, 3, 2]})
    for label, color in zip(labels, colors):
        rec = records(results, "kl", label)[0]
        left.plot(rec["per_step"]["step"], rec["per_step"]["beta"], color=color, label=label)
    left.set(xlabel="step", ylabel="β(s)", title="KL weight schedule")
    left.grid(alpha=0.3)
    left.legend(fontsize=7)
    curves_panel(mid, results, "kl", labels, colors)
    gain_bars(right, results, "kl", labels, colors)
    fig.suptitle(
        f"Constant β vs the dynamic GRPO-D schedule, T4A4 ({start_line(results, 'kl')})", fontsize=10
    )
    fig.tight_layout()
    return save(fig, out_dir, "kl_schedule", results)


def methods(results: dict, out_dir: Path) -> str:
    """out/methods: same-task and cross-task held-out accuracy of every method, from the same start."""
    group = results["groups"]["methods"]
    labels = group["labels"]
    families = list(group["entries"][0]["eval"])
    fig, axes = plt.subplots(1, len(families), figsize=(6 * len(families), 4.4))
    axes = np.atleast_1d(axes)
    colors = ["0.6", "C5", "C8", "C3", "C1", "C0", "C2"][: len(labels)]
    for ax, family in zip(axes, families):
        values = [
            [e["eval"][family]["greedy"] for e in group["entries"] if e["label"] == lab] for lab in labels
        ]
        sampled = [
            np.mean([e["eval"][family]["sampled"] for e in group["entries"] if e["label"] == lab])
            for lab in labels
        ]
        bars(ax, labels, values, colors, results["plan"]["eval_size"])
        ax.scatter(
            range(len(labels)), sampled, marker="D", color="k", s=14, zorder=4, label="sampled (T = 1)"
        )
        ax.legend(fontsize=7, loc="upper left")
        kind = "same task" if family == families[0] else "cross task"
        ax.set(ylabel="held-out accuracy (bars: greedy)")
        ax.set_title(f"{kind}: {family} ({whisker_note(results, 'methods')})", fontsize=10)
        ax.set_ylim(0, max(0.05, max(max(v) for v in values) * 1.25))
    fig.suptitle(
        f"Methods from the same warm start, {results['plan']['steps']} steps each: "
        "SFT vs GRPO vs GRPO-D vs GRPO-MA",
        fontsize=11,
    )
    fig.tight_layout()
    return save(fig, out_dir, "methods", results)


def make_all(results: dict, out_dir) -> list[str]:
    """Every figure whose group is in the results; returns the figure names."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    groups = results["groups"]
    made = []
    if "ablation" in groups:
        made += [grad_spikes(results, out_dir), ta_ablation(results, out_dir), cost(results, out_dir)]
    if "answer_pool" in groups:
        made.append(
            curve_and_bars(
                results,
                out_dir,
                "answer_pool",
                "answer_pool",
                "Answer-advantage pool (T4A4): all K·M answers vs one thought's M answers",
            )
        )
    if "kl" in groups:
        made.append(kl_schedule(results, out_dir))
    if "rewards" in groups:
        made.append(
            curve_and_bars(
                results,
                out_dir,
                "rewards",
                "rewards",
                "Rewards (T4A4): accuracy vs StepRAR vs StepRVR (StepGRPO)",
            )
        )
    if "methods" in groups:
        made.append(methods(results, out_dir))
    return made
