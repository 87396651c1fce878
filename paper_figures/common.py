"""What the paper_figures scripts share: the default folders, the embedded model's size, and one argument
parser for the flags they have in common.

Each script asks `parser()` for the common flags it uses and adds its own flags to the parser it gets back:

    made = parser("python -m paper_figures.variance", __doc__, "fast", "out_dir", "results_dir")
    made.add_argument(...)  # a flag of this script only
    args = made.parse_args(argv)
"""

from __future__ import annotations

import argparse
from pathlib import Path

PACKAGE_DIR = Path(__file__).parent
OUT_DIR = "paper_figures/out"  # figures (PNG and PDF)
RESULTS_DIR = "paper_figures/results"  # numbers (JSON, CSV, markdown tables)
CACHE_DIR = "paper_figures/cache"  # cached training runs (git-ignored)
README = PACKAGE_DIR / "README.md"

# grpo_ma's embedded Qwen2ForCausalLM (tests/test_paper_figures.py counts the parameters of the built model)
EMBEDDED_PARAMETERS = 598_656
EMBEDDED_SIZE = "0.6M"

FLAGS: dict[str, tuple[str, dict]] = {
    "fast": ("--fast", {"action": "store_true", "help": "CPU setting: short runs, fewer seeds"}),
    "out_dir": ("--out-dir", {"default": OUT_DIR, "help": "figures, PNG and PDF (default: %(default)s)"}),
    "results_dir": (
        "--results-dir",
        {"default": RESULTS_DIR, "help": "numbers (JSON, CSV) and tables.md (default: %(default)s)"},
    ),
    "cache_dir": (
        "--cache-dir",
        {"default": CACHE_DIR, "help": "cached training runs, git-ignored (default: %(default)s)"},
    ),
    "jobs": (
        "--jobs",
        {
            "type": int,
            "default": 2,
            "help": "training runs side by side, one process each (default: %(default)s)",
        },
    ),
    "threads": (
        "--threads",
        {
            "type": int,
            "default": 1,
            "help": f"torch threads per process; 1 is fastest for the {EMBEDDED_SIZE}-parameter embedded "
            "model (default: %(default)s)",
        },
    ),
    "seeds": (
        "--seeds",
        {"type": int, "nargs": "+", "default": [0, 1, 2], "help": "seeds (default: %(default)s)"},
    ),
    "quiet": ("--quiet", {"action": "store_true", "help": "print only the final summary lines"}),
}


def parser(
    prog: str, doc: str | None, *flags: str, helps: dict[str, str] | None = None
) -> argparse.ArgumentParser:
    """An ArgumentParser named `prog`, described by the script's docstring `doc`, holding the common `flags`
    (keys of FLAGS, in that order); `helps` replaces the help text of some of them."""
    unknown = [f for f in flags if f not in FLAGS]
    if unknown:
        raise ValueError(f"unknown common flags {unknown}; known: {sorted(FLAGS)}")
    made = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    for name in flags:
        flag, options = FLAGS[name]
        if helps and name in helps:
            options = {**options, "help": helps[name]}
        made.add_argument(flag, **options)
    return made
