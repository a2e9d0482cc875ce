"""Markdown table of the meta-test results of one or more sweeps (or single runs).

    python scripts/results_table.py multirun/2026-11-25/13-10-00 [more sweep or run folders]

One row per run: its command-line overrides, the meta-test metric as mean ± 95% CI, the
episodes, the iterations and the wall time, read from each run's results.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def run_folders(paths: list[str]) -> list[Path]:
    found = []
    for path in map(Path, paths):
        if (path / "results.json").exists():
            found.append(path)
        else:
            runs = (p.parent for p in path.glob("*/results.json"))
            found.extend(sorted(runs, key=lambda p: (len(p.name), p.name)))
    return found


def row(run: Path) -> str:
    results = json.loads((run / "results.json").read_text())
    overrides_file = run / ".hydra" / "overrides.yaml"
    overrides = ""
    if overrides_file.exists():
        lines = overrides_file.read_text().splitlines()
        overrides = " ".join(line.removeprefix("- ").strip() for line in lines)
    if not results.get("complete"):
        return f"| {run.name} | {overrides} | incomplete | | | |"
    test = results["meta_test"]
    scale = 100 if test["metric"] == "accuracy" else 1
    unit = "%" if scale == 100 else ""
    metric = f"{scale * test['mean']:.2f}{unit} ± {scale * test['ci95']:.2f}"
    minutes = results["wall_time_s"] / 60
    return (
        f"| {run.name} | {overrides} | {metric} | {test['episodes']} | "
        f"{results['iterations']} | {minutes:.1f} min |"
    )


def main() -> None:
    runs = run_folders(sys.argv[1:])
    if not runs:
        sys.exit("no results.json under the given folders")
    print("| run | overrides | meta-test | episodes | iterations | wall time |")
    print("|---|---|---|---|---|---|")
    for run in runs:
        print(row(run))


if __name__ == "__main__":
    main()
