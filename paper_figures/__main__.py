"""`python -m paper_figures [--fast]`: regenerate every figure and table of the README.

1. the variance figures (paper_figures/variance.py, SPEC §3), when that module is present;
2. the training evidence (paper_figures/training.py): gradient spikes, T×A ablation, cost, answer pool,
   constant β vs GRPO-D, StepGRPO rewards, SFT vs GRPO vs GRPO-MA.

Runs are cached in paper_figures/cache/ (git-ignored), so a second call only draws. --fast is the CPU
setting (short runs, fewer seeds; about 15 minutes on an idle 2-core CPU); the default is the full setting,
meant for a GPU machine.
"""
from __future__ import annotations

import argparse
import time


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m paper_figures", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="CPU setting: short runs, fewer seeds")
    parser.add_argument("--only", choices=("variance", "training"), help="make only one half")
    parser.add_argument("--jobs", type=int, default=2, help="training runs side by side, one process each")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process (1 is fastest for the 0.4M-parameter embedded model)")
    parser.add_argument("--out-dir", default="paper_figures/out", help="figures (PNG and PDF)")
    parser.add_argument("--results-dir", default="paper_figures/results", help="numbers (JSON, CSV) and tables.md")
    parser.add_argument("--cache-dir", default="paper_figures/cache", help="cached runs (git-ignored)")
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
        training.main(fast=args.fast, out_dir=args.out_dir, results_dir=args.results_dir, cache_dir=args.cache_dir,
                      jobs=args.jobs, threads=args.threads)
    print(f"paper figures done in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
