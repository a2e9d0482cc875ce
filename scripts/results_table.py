"""Markdown table of the meta-test results of one or more sweeps (or single runs).

    python scripts/results_table.py multirun/2026-11-25/13-10-00 [more sweep or run folders]

The table of `metarun-compare` (metarun/compare_table.py), printed and nothing written: one row
per run with the overrides that distinguish the runs, the seed, the meta-test metric as
mean ± 95% CI, the iterations, the wall time and whether the run finished. `metarun-compare`
also writes it as Markdown and CSV, beside a plot of the training curves.
"""

from __future__ import annotations

import sys

from metarun.compare_runs import read_runs
from metarun.compare_table import markdown_table
from metarun.errors import MetarunError


def main() -> None:
    try:
        runs = read_runs(sys.argv[1:])
    except MetarunError as err:
        sys.exit(f"results_table: error: {err}")
    print(markdown_table(runs))


if __name__ == "__main__":
    main()
