"""`python -m paper_figures [--fast]`: regenerate every figure and table (paper_figures/README.md lists them).

1. the variance figures (paper_figures/variance.py: the thought-advantage variance of theory/ against Monte
   Carlo), when that module is present;
2. the training evidence (paper_figures/training.py): gradient spikes, T×A ablation, cost, answer pool,
   constant β vs GRPO-D, StepGRPO rewards, SFT vs GRPO vs GRPO-MA;
3. with the default --results-dir, the generated blocks of paper_figures/README.md (paper_figures/tables.py).

Runs are cached in paper_figures/cache/ (git-ignored), so a second call only draws. --fast is the CPU
setting (short runs, fewer seeds); the default is the full setting, meant for a GPU machine. The time each
part took is in paper_figures/README.md.
"""

from __future__ import annotations

import time
from pathlib import Path

from paper_figures import common


def parse_args(argv=None):
    parser = common.parser(
        "python -m paper_figures", __doc__, "fast", "out_dir", "results_dir", "cache_dir", "jobs", "threads"
    )
    parser.add_argument("--only", choices=("variance", "training"), help="make only one half")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.time()
    if args.only in (None, "variance"):
        try:
            from paper_figures import variance
        except ImportError as error:
            print(f"variance figures skipped: {error}")
        else:
            variance.main(fast=args.fast, out_dir=args.out_dir, results_dir=args.results_dir)
    if args.only in (None, "training"):
        from paper_figures import training

        training.main(
            fast=args.fast,
            out_dir=args.out_dir,
            results_dir=args.results_dir,
            cache_dir=args.cache_dir,
            jobs=args.jobs,
            threads=args.threads,
        )
    if Path(args.results_dir).resolve() == (common.PACKAGE_DIR / "results").resolve():
        from paper_figures import tables

        rewritten = tables.update(args.results_dir, common.README)
        print("rewrote from the results: " + (", ".join(rewritten) or "nothing, already up to date"))
    print(f"paper figures done in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
