"""Figures of the thought-advantage variance of theory/: `python -m paper_figures.variance [--fast]`.

Writes to out_dir (PNG and PDF):
    variance_vs_m      Var[A_k] against M for several K: Monte Carlo (99.9% intervals), leading order,
                       finite-M
    variance_vs_k      Var[A_k] against K for several M, with the two floors (claims 4 and 5 in
                       theory/README.md)
    budget_heatmap     finite-M Var[A_k] over (K, M), with iso-token-cost lines and the best tree per budget
and every plotted number to results_dir/variance.json.

Setting: thought values at Beta quantiles (ratio E[sigma^2]/sigma_theta^2 = 2 for the first two figures),
Bernoulli answers, ddof = 1, eps = 1e-4; Monte Carlo runs through `grpo_ma.ma_advantages`. Every variance is
the mean over the K thoughts of Var[A_k | mu].
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from paper_figures import common  # noqa: E402
from paper_figures.plots import save_figure as save  # noqa: E402
from theory import budget as bd  # noqa: E402
from theory import closed_form as cf  # noqa: E402
from theory.monte_carlo import monte_carlo_variance  # noqa: E402

RATIO = 2.0  # E[sigma^2] / sigma_theta^2 of the thought values
MEAN = 0.5  # mean thought value
DDOF = 1
EPS = 1e-4
LEVEL = 0.999  # Monte Carlo interval level


def formulas(thoughts: int, answers, ratio: float = RATIO) -> dict[str, np.ndarray]:
    """Thought-averaged leading-order and finite-M variance for each M in `answers` (floats allowed)."""
    mu = cf.beta_thought_values(thoughts, ratio, MEAN)
    sigma2 = cf.bernoulli_variance(mu)
    answers = np.atleast_1d(np.asarray(answers, dtype=float))
    lead = [cf.leading_order_variance(mu, sigma2, m, ddof=DDOF, eps=EPS).mean() for m in answers]
    fin = [cf.finite_m_variance(mu, sigma2, m, ddof=DDOF, eps=EPS).mean() for m in answers]
    return {"leading": np.array(lead), "finite": np.array(fin)}


def simulate(thoughts: int, answers: int, samples: int) -> dict[str, float]:
    mu = cf.beta_thought_values(thoughts, RATIO, MEAN)
    est = monte_carlo_variance(
        mu,
        answers,
        max(samples // thoughts, 50),
        seed=1000 * thoughts + answers,
        ddof=DDOF,
        eps=EPS,
        level=LEVEL,
    )
    return {"K": thoughts, "M": answers, "mc": est.mean, "half_width": est.mean_half_width, "sims": est.sims}


def figure_vs_m(out_dir: Path, samples: int, fast: bool) -> dict:
    thoughts_list = (4, 16, 64)
    answers_list = (1, 2, 4, 8, 16, 64) if fast else (1, 2, 4, 8, 16, 32, 64)
    dense = np.geomspace(1, 64, 60)
    fig, ax = plt.subplots(figsize=(6.2, 4.4))
    results = {"points": [], "curves": {}}
    for color, thoughts in zip(("C0", "C1", "C2"), thoughts_list):
        curves = formulas(thoughts, dense)
        results["curves"][thoughts] = {"M": dense.tolist(), **{k: v.tolist() for k, v in curves.items()}}
        points = [simulate(thoughts, m, samples) for m in answers_list]
        results["points"] += points
        ax.plot(dense, curves["leading"], "--", color=color, lw=1)
        ax.plot(dense, curves["finite"], "-", color=color, lw=1.5, label=f"K={thoughts}")
        ax.errorbar(
            [p["M"] for p in points],
            [p["mc"] for p in points],
            yerr=[p["half_width"] for p in points],
            fmt="o",
            color=color,
            ms=4,
            capsize=2,
        )
    ax.plot([], [], "k--", lw=1, label="leading order (∝ 1/M)")
    ax.plot([], [], "k-", lw=1.5, label="finite-M (Padé, 2nd order)")
    ax.errorbar([], [], yerr=[], fmt="o", color="k", ms=4, label=f"Monte Carlo, {LEVEL:.1%} CI")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="answers per thought M",
        ylabel="mean$_k$ Var[$A_k$]",
        title=f"Thought-advantage variance vs M (E[σ²]/σ$_θ^2$ = {RATIO:g})",
    )
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    save(fig, out_dir, "variance_vs_m")
    return results


def figure_vs_k(out_dir: Path, samples: int, fast: bool) -> dict:
    answers_list = (1, 4, 16)
    thoughts_mc = (4, 16, 64, 256) if fast else (4, 8, 16, 64, 256, 1024)
    thoughts_dense = np.unique(np.geomspace(3, 2048, 40).astype(int))
    between, within = cf.beta_moments(RATIO, MEAN)
    fig, ax = plt.subplots(figsize=(6.2, 4.4))
    results = {"points": [], "curves": {}, "floors": {}}
    for color, answers in zip(("C0", "C1", "C2"), answers_list):
        curves = [formulas(k, answers) for k in thoughts_dense]
        lead = [c["leading"][0] for c in curves]
        fin = [c["finite"][0] for c in curves]
        floors = {"leading": within / (answers * between), "finite": within / (answers * between + within)}
        results["curves"][answers] = {"K": thoughts_dense.tolist(), "leading": lead, "finite": fin}
        results["floors"][answers] = floors
        points = [simulate(k, answers, samples) for k in thoughts_mc]
        results["points"] += points
        ax.plot(thoughts_dense, lead, "--", color=color, lw=1)
        ax.plot(thoughts_dense, fin, "-", color=color, lw=1.5, label=f"M={answers}")
        ax.axhline(floors["leading"], color=color, ls=":", lw=1)
        ax.axhline(floors["finite"], color=color, ls="-.", lw=0.8)
        ax.errorbar(
            [p["K"] for p in points],
            [p["mc"] for p in points],
            yerr=[p["half_width"] for p in points],
            fmt="o",
            color=color,
            ms=4,
            capsize=2,
        )
    ax.plot([], [], "k--", lw=1, label="leading order")
    ax.plot([], [], "k-", lw=1.5, label="finite-M (Padé)")
    ax.plot([], [], "k:", lw=1, label="floor E[σ²]/(Mσ$_θ^2$) (claim 4)")
    ax.plot([], [], "k-.", lw=0.8, label="floor E[σ²]/(Mσ$_θ^2$+E[σ²]) (claim 5)")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="thoughts K",
        ylabel="mean$_k$ Var[$A_k$]",
        title="More thoughts do not remove the noise: the floor in K",
    )
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    ax.grid(alpha=0.3, which="both")
    save(fig, out_dir, "variance_vs_k")
    return results


def figure_budget(
    out_dir: Path, fast: bool, ratio: float = 1.0, thought_len: float = 200, answer_len: float = 50
) -> dict:
    thoughts_list = [3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    answers_list = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    variance = np.array(
        [
            [bd.mean_thought_variance(k, m, ratio, mean=MEAN, ddof=DDOF) for m in answers_list]
            for k in thoughts_list
        ]
    )
    cost = np.array(
        [[bd.token_cost(k, m, thought_len, answer_len) for m in answers_list] for k in thoughts_list]
    )
    budgets = [2048, 8192, 32768]
    fig, ax = plt.subplots(figsize=(7, 4.8))
    image = ax.imshow(np.log10(variance), origin="lower", aspect="auto", cmap="viridis")
    fig.colorbar(image, ax=ax, label="log$_{10}$ mean$_k$ Var[$A_k$] (finite-M)")
    contours = ax.contour(np.log2(cost), levels=np.log2(budgets), colors="w", linewidths=1)
    ax.clabel(contours, fmt={np.log2(b): f"{b} tok" for b in budgets}, fontsize=7)
    best = {}
    for marker, budget in zip(("*", "P", "X"), budgets):
        feasible = np.where(cost <= budget, variance, np.inf)
        i, j = np.unravel_index(np.argmin(feasible), feasible.shape)
        exact = bd.best_allocation(
            budget, thought_len, answer_len, ratio, mean=MEAN, ddof=DDOF, objective="variance"
        )
        best[budget] = {
            "grid": bd.config_name(thoughts_list[i], answers_list[j]),
            "exact": exact.name,
            "variance": exact.variance,
        }
        ax.plot(
            j,
            i,
            marker,
            color="r",
            ms=11,
            mec="w",
            label=f"≤{budget} tokens: {best[budget]['grid']} (all K, M: {exact.name})",
        )
    ax.set_xticks(range(len(answers_list)), answers_list)
    ax.set_yticks(range(len(thoughts_list)), thoughts_list)
    ax.set(
        xlabel="answers per thought M",
        ylabel="thoughts K",
        title=f"Budget: L_t={thought_len:g}, L_a={answer_len:g}, E[σ²]/σ$_θ^2$={ratio:g}",
    )
    ax.legend(fontsize=7, loc="upper right")
    save(fig, out_dir, "budget_heatmap")
    return {
        "K": thoughts_list,
        "M": answers_list,
        "variance": variance.tolist(),
        "cost": cost.tolist(),
        "ratio": ratio,
        "thought_len": thought_len,
        "answer_len": answer_len,
        "best": best,
    }


def main(fast: bool = False, out_dir=common.OUT_DIR, results_dir=common.RESULTS_DIR) -> dict:
    """Make the three figures and write their numbers; returns the numbers. fast: fewer simulations."""
    start = time.time()
    torch.set_num_threads(1)
    out_dir = Path(out_dir)
    results_dir = Path(results_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_dir.mkdir(parents=True, exist_ok=True)
    samples = 16_000 if fast else 64_000
    results = {
        "setting": {
            "ratio": RATIO,
            "mean": MEAN,
            "ddof": DDOF,
            "eps": EPS,
            "level": LEVEL,
            "thought_samples_per_point": samples,
            "fast": fast,
        },
        "variance_vs_m": figure_vs_m(out_dir, samples, fast),
        "variance_vs_k": figure_vs_k(out_dir, samples, fast),
        "budget_heatmap": figure_budget(out_dir, fast),
    }
    results["seconds"] = round(time.time() - start, 1)
    (results_dir / "variance.json").write_text(json.dumps(results, indent=1, default=float))
    print(
        f"variance figures -> {out_dir}/variance_vs_m, variance_vs_k, budget_heatmap (.png, .pdf); "
        f"numbers -> {results_dir / 'variance.json'} ({results['seconds']} s)"
    )
    return results


def cli(argv=None) -> dict:
    """`python -m paper_figures.variance`: the shared flags of paper_figures.common."""
    args = common.parser(
        "python -m paper_figures.variance",
        __doc__,
        "fast",
        "out_dir",
        "results_dir",
        helps={"fast": "fewer simulations and points"},
    ).parse_args(argv)
    return main(fast=args.fast, out_dir=args.out_dir, results_dir=args.results_dir)


if __name__ == "__main__":
    cli()
