"""Training curves of grpo_ma runs, drawn from each run folder's metrics.jsonl.

    python -m paper_figures.plot_run OUT [OUT2 ...] [--output FILE.png]

OUT is a folder that `python grpo_ma.py --out OUT` wrote (or its metrics.jsonl itself). Six panels against
the step: reward (mean with a ±std band, and each `reward/<name>` mean when present), train and held-out
accuracy (greedy and sampled; step 0 is the start evaluation), KL and β, gradient norm and GSS, loss and the
clipped token shares (`clip_frac`: ratio outside the clip range; `clip_ratio`, when present: the clip
binds), thought and answer lengths with the truncated share. A null value (not measured at that step) is
left out. Several runs are overlaid, one colour per run, labelled by folder name. Default output:
OUT/curves.png for one run, ./runs_curves.png for several.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from paper_figures import common  # noqa: E402

REWARD_PREFIX = "reward/"


class MetricsError(ValueError):
    """A run folder or metrics.jsonl that cannot be plotted; the message is one line for the user."""


@dataclass(frozen=True)
class Series:
    key: str
    label: str
    style: str = "-"  # matplotlib line style
    marker: str | None = None
    right: bool = False  # on the panel's second y axis


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    series: tuple[Series, ...]
    right_label: str = ""
    reward_functions: bool = False  # also every reward/<name> key of the file
    ylim: tuple[float, float] | None = None


PANELS = (
    Panel(
        "Reward",
        "reward per answer",
        (Series("reward_mean", "mean reward (band: ± std)"),),
        reward_functions=True,
    ),
    Panel(
        "Accuracy",
        "accuracy",
        (
            Series("train_accuracy", "train (sampled rollouts)"),
            Series("eval_greedy_accuracy", "held-out, greedy", "-", "o"),
            Series("eval_sampled_accuracy", "held-out, sampled", "--", "s"),
        ),
        ylim=(0.0, 1.02),
    ),
    Panel(
        "KL and β", "KL to the start policy", (Series("kl", "KL"), Series("beta", "β", "--", right=True)), "β"
    ),
    Panel(
        "Gradient",
        "‖g‖ before clipping",
        (Series("grad_norm", "grad norm"), Series("gss", "GSS", "--", right=True)),
        "GSS (‖g_t‖ / mean of previous)",
    ),
    Panel(
        "Loss and clipping",
        "loss",
        (
            Series("loss", "loss"),
            Series("clip_frac", "clip_frac: ratio outside the clip range", "--", right=True),
            Series("clip_ratio", "clip_ratio: the clip binds", ":", right=True),
        ),
        "share of tokens",
    ),
    Panel(
        "Lengths",
        "tokens",
        (
            Series("thought_len", "thought length"),
            Series("answer_len", "answer length", "--"),
            Series("truncated_frac", "truncated share", ":", right=True),
        ),
        "share",
    ),
)
FIXED_KEYS = frozenset(s.key for panel in PANELS for s in panel.series)
REWARD_STYLES = ("--", ":", "-.")


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------
def is_plotted(key: str) -> bool:
    return key in FIXED_KEYS or key.startswith(REWARD_PREFIX)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def read_metrics(path: Path) -> list[dict]:
    """The lines of a metrics.jsonl as dicts; blank lines are skipped. Every line must be a JSON object with
    an integer `step`, and every plotted value a number or null: otherwise a MetricsError names the line."""
    rows = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise MetricsError(f"{path}: not UTF-8 text (byte {error.start})") from None
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise MetricsError(f"{where}: not valid JSON ({error.msg}, column {error.colno})") from None
        if not isinstance(row, dict):
            raise MetricsError(f"{where}: expected a JSON object, found {type(row).__name__}")
        step = row.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            raise MetricsError(f"{where}: 'step' must be an integer, found {step!r}")
        for key, value in row.items():
            if is_plotted(key) and value is not None and not is_number(value):
                raise MetricsError(f"{where}: {key!r} must be a number or null, found {value!r}")
        rows.append(row)
    if not rows:
        raise MetricsError(f"{path}: no metrics lines")
    return rows


def metrics_file(target: str | Path) -> Path:
    """The metrics.jsonl of a run folder (or the file itself)."""
    target = Path(target)
    if target.is_file():
        return target
    if not target.is_dir():
        raise MetricsError(f"{target}: no such run folder")
    path = target / "metrics.jsonl"
    if not path.is_file():
        raise MetricsError(f"{target}: no metrics.jsonl in this folder (is it a grpo_ma --out folder?)")
    return path


def run_label(path: Path) -> str:
    return path.resolve().parent.name


def load_runs(targets: list[str | Path]) -> dict[str, list[dict]]:
    """{label: rows} in the order given; a label is the run's folder name, or its path when names repeat."""
    paths = [metrics_file(t) for t in targets]
    names = [run_label(p) for p in paths]
    runs = {}
    for path, name in zip(paths, names):
        label = name if names.count(name) == 1 else str(path.parent)
        runs[label] = read_metrics(path)
    return runs


def points(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one key, leaving out the lines where it is null or absent."""
    kept = [(row["step"], float(row[key])) for row in rows if row.get(key) is not None]
    return [s for s, _ in kept], [v for _, v in kept]


def run_description(path: Path) -> str:
    """'T4A4, seed 0, 150 steps' from the run's config.json, or '' when it has none."""
    try:
        config = json.loads((path.parent / "config.json").read_text())
        return f"T{config['thoughts']}A{config['answers']}, seed {config['seed']}, {config['steps']} steps"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


# ------------------------------------------------------------------------------------------------
# drawing
# ------------------------------------------------------------------------------------------------
def reward_keys(runs: dict[str, list[dict]]) -> list[str]:
    keys = {key for rows in runs.values() for row in rows for key in row if key.startswith(REWARD_PREFIX)}
    return sorted(keys)


def panel_series(panel: Panel, runs: dict[str, list[dict]]) -> list[Series]:
    """The panel's series that hold at least one value in some run."""
    candidates = list(panel.series)
    if panel.reward_functions:
        for i, key in enumerate(reward_keys(runs)):
            name = key[len(REWARD_PREFIX) :]
            candidates.append(Series(key, f"{name} (mean)", REWARD_STYLES[i % len(REWARD_STYLES)]))
    return [s for s in candidates if any(points(rows, s.key)[0] for rows in runs.values())]


def draw_panel(ax, panel: Panel, runs: dict[str, list[dict]]) -> None:
    shown = panel_series(panel, runs)
    several = len(runs) > 1
    right = ax.twinx() if any(s.right for s in shown) else None
    handles = []
    for index, series in enumerate(shown):
        target = right if series.right else ax
        for run_index, rows in enumerate(runs.values()):
            color = f"C{run_index}" if several else f"C{index}"
            steps, values = points(rows, series.key)
            target.plot(steps, values, series.style, color=color, marker=series.marker, ms=3, lw=1.2)
            if series.key == "reward_mean":
                spread = {row["step"]: row["reward_std"] for row in rows if row.get("reward_std") is not None}
                low = [v - spread.get(s, math.nan) for s, v in zip(steps, values)]
                high = [v + spread.get(s, math.nan) for s, v in zip(steps, values)]
                target.fill_between(steps, low, high, color=color, alpha=0.12, lw=0)
        handles.append(
            Line2D([], [], ls=series.style, marker=series.marker, ms=3, color="k" if several else f"C{index}")
        )
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(alpha=0.3)
    if panel.ylim:
        ax.set_ylim(*panel.ylim)
    if right is not None:
        right.set_ylabel(panel.right_label)
    if not shown:
        ax.text(
            0.5, 0.5, "not in metrics.jsonl", ha="center", va="center", transform=ax.transAxes, color="0.5"
        )
        return
    labels = [s.label + (" (right axis)" if s.right else "") for s in shown]
    top = (
        right if right is not None else ax
    )  # the second axis is drawn over the first: its legend stays on top
    top.legend(handles, labels, fontsize=7, loc="best", framealpha=0.85)


def plot_runs(runs: dict[str, list[dict]], output: Path, title: str = "") -> Path:
    """Every panel of every run into one PNG at `output`; returns it."""
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    for ax, panel in zip(axes.flat, PANELS):
        draw_panel(ax, panel, runs)
    if len(runs) > 1:
        handles = [Line2D([], [], color=f"C{i}", lw=2) for i in range(len(runs))]
        fig.legend(handles, list(runs), loc="lower center", ncol=min(len(runs), 6), fontsize=8, frameon=False)
    fig.suptitle(title or "Training curves: " + ", ".join(runs), fontsize=11)
    fig.tight_layout(rect=(0, 0.04 if len(runs) > 1 else 0, 1, 1))
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=120)
    plt.close(fig)
    return output


def default_output(targets: list[str]) -> Path:
    if len(targets) == 1:
        return metrics_file(targets[0]).parent / "curves.png"
    return Path("runs_curves.png")


def main(argv=None) -> int:
    parser = common.parser(
        "python -m paper_figures.plot_run",
        __doc__,
        "quiet",
        helps={"quiet": "print nothing when it succeeds"},
    )
    parser.add_argument("runs", nargs="+", metavar="OUT", help="run folders (or their metrics.jsonl files)")
    parser.add_argument("--output", help="the PNG to write (default: OUT/curves.png, or ./runs_curves.png)")
    args = parser.parse_args(argv)
    try:
        runs = load_runs(args.runs)
        output = Path(args.output) if args.output else default_output(args.runs)
        title = ""
        if len(runs) == 1:
            label = next(iter(runs))
            description = run_description(metrics_file(args.runs[0]))
            title = f"Training curves: {label}" + (f" ({description})" if description else "")
        plot_runs(runs, output, title)
    except (MetricsError, OSError) as error:
        print(f"plot_run: error: {error}", file=sys.stderr)
        return 1
    if not args.quiet:
        print(f"curves of {', '.join(runs)} -> {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
