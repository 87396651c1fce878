"""`python -m theory [--fast]`: check claims 1-6 of theory/README.md (exit 1 if any check fails); --fast runs
every check on a smaller grid with fewer samples (what CI runs).
`python -m theory budget --budget 2048 --thought-len 200 --answer-len 50 --ratio 1.0`: the budget question,
ranked by the gradient's signal-to-noise per token (claim 7); `--objective variance` ranks by the
thought-advantage variance instead."""

from __future__ import annotations

import argparse
import sys

FAST_HELP = "run every check on a smaller Monte Carlo grid with fewer samples (about 30 s on 2 cores)"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m theory", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--fast", action="store_true", help=FAST_HELP)
    commands = parser.add_subparsers(dest="command")
    check = commands.add_parser(
        "check", help="run every claim of theory/README.md as a named check (the default)"
    )
    check.add_argument("--fast", action="store_true", default=argparse.SUPPRESS, help=FAST_HELP)
    budget = commands.add_parser(
        "budget",
        help="which T{K}A{M} a token budget should buy (gradient SNR per token, or --objective variance)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    budget.add_argument(
        "--budget", type=float, required=True, help="rollout tokens per prompt: K*L_t + K*M*L_a"
    )
    budget.add_argument("--thought-len", type=float, required=True, help="L_t: tokens per thought")
    budget.add_argument("--answer-len", type=float, required=True, help="L_a: tokens per answer")
    budget.add_argument(
        "--ratio",
        type=float,
        default=1.0,
        help="E[sigma^2]/sigma_theta^2: within-thought over between-thought variance of the rewards "
        "(thought values ~ Beta(mean*ratio, (1-mean)*ratio), Bernoulli answers)",
    )
    budget.add_argument("--mean", type=float, default=0.5, help="mean thought value (mean accuracy)")
    budget.add_argument(
        "--ddof", type=int, default=1, help="delta degrees of freedom of the std (trainer: 1)"
    )
    budget.add_argument(
        "--objective",
        choices=("gradient", "variance"),
        default="gradient",
        help="gradient: the policy gradient's signal-to-noise per generated token (claim 7); variance: the "
        "thought-averaged Var[A_k] (claims 1-6), which always prefers the fewest thoughts",
    )
    budget.add_argument(
        "--thought-repeat", type=float, default=0.0, help="P(two thoughts of one prompt are the same text)"
    )
    budget.add_argument(
        "--right-answer-repeat",
        type=float,
        default=0.0,
        help="P(two right answers of one thought are the same text)",
    )
    budget.add_argument(
        "--wrong-answer-repeat",
        type=float,
        default=0.0,
        help="P(two wrong answers of one thought are the same text)",
    )
    budget.add_argument(
        "--min-thoughts",
        type=int,
        default=None,
        help="smallest K considered; default 2 for the gradient objective, 3 for the variance one (K=2 gives "
        "a sign, whose variance is not a useful figure)",
    )
    budget.add_argument("--max-thoughts", type=int, default=1024, help="largest K considered")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "budget":
        from theory.budget import budget_report
        from theory.gradient import Repeats

        repeats = Repeats(args.thought_repeat, args.right_answer_repeat, args.wrong_answer_repeat)
        report = budget_report(
            args.budget,
            args.thought_len,
            args.answer_len,
            args.ratio,
            mean=args.mean,
            ddof=args.ddof,
            objective=args.objective,
            repeats=repeats,
            min_thoughts=args.min_thoughts,
            max_thoughts=args.max_thoughts,
        )
        print(report)
        return 0
    from theory.checks import main as run_checks

    return run_checks(fast=args.fast)


if __name__ == "__main__":
    sys.exit(main())
