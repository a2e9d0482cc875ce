"""The comparison's tables: Markdown (for the terminal and for docs) and CSV (for analysis).

Meta-test results are quoted the way few-shot papers quote them, mean ± 95% CI over the test
episodes; a configuration run with several seeds also gets the spread of its seeds' means, which
is what decides whether two configurations really differ.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from statistics import fmean, stdev

from metarun.compare_runs import Run, configurations, describe, distinguishing_keys


def format_value(metric: str | None, value: float, spread: float | None = None) -> str:
    """``97.12% ± 0.31`` for accuracy (percent points), ``0.4012 ± 0.0300`` for other metrics:
    the style of the run's own log and of few-shot papers."""
    if metric == "accuracy":
        text, spread_text = f"{100 * value:.2f}%", f"{100 * (spread or 0):.2f}"
    else:
        text, spread_text = f"{value:.4f}", f"{spread or 0:.4f}"
    return text if spread is None or math.isnan(spread) else f"{text} ± {spread_text}"


def _format_time(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return f"{seconds:.1f} s" if seconds < 60 else f"{seconds / 60:.1f} min"


def _iterations(run: Run) -> str:
    """From results.json; for a run still going, the last iteration it logged."""
    if run.results and run.results.get("iterations") is not None:
        return str(run.results["iterations"])
    return "" if run.last_step is None else str(run.last_step)


def _meta_test_cell(run: Run) -> str:
    test = run.meta_test
    if not test:
        return "—"
    return f"{test['metric']} {format_value(test['metric'], test['mean'], test.get('ci95'))}"


def _markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(row) for row in rows)]


def _over_seeds(members: list[Run]) -> str:
    """The finished seeds' meta-test means: their mean ± standard deviation."""
    finished = [run.meta_test for run in members if run.meta_test]
    if not finished:
        return "—"
    metric = finished[0]["metric"]
    means = [test["mean"] for test in finished]
    if len(means) == 1:
        return f"{metric} {format_value(metric, means[0])} (one seed)"
    return f"{metric} {format_value(metric, fmean(means), stdev(means))}"


def markdown_table(runs: list[Run]) -> str:
    """One row per run; then, when any configuration has several seeds, one row per
    configuration: the spread over seeds is what says whether two configurations differ."""
    keys = distinguishing_keys(runs)
    header = ["run", *keys, "seed", "meta-test (mean ± 95% CI)", "iterations", "wall time"]
    rows = [
        [
            run.label,
            *(run.overrides.get(key) or "(default)" for key in keys),
            run.seed,
            _meta_test_cell(run),
            _iterations(run),
            _format_time((run.results or {}).get("wall_time_s")),
            run.status,
        ]
        for run in runs
    ]
    lines = _markdown([*header, "status"], rows)
    groups = configurations(runs, keys)
    if any(len(members) > 1 for members in groups.values()):
        summary = [
            [
                describe(keys, values),
                f"{sum(run.meta_test is not None for run in members)} of {len(members)}",
                _over_seeds(members),
            ]
            for values, members in groups.items()
        ]
        header = ["configuration", "seeds done", "meta-test (mean ± std over seeds)"]
        lines += ["", *_markdown(header, summary)]
    return "\n".join(lines)


CSV_TAIL = ["seed", "status", "metric", "mean", "ci95", "episodes", "iterations", "wall_time_s"]


def write_csv(path: Path, runs: list[Run]) -> None:
    """One row per run, numbers unrounded (``mean``, ``ci95``) for further analysis."""
    keys = distinguishing_keys(runs)
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", *keys, *CSV_TAIL, "path"])
        for run in runs:
            test = run.meta_test or {}
            results = run.results or {}
            writer.writerow(
                [
                    run.label,
                    *(run.overrides.get(key, "") for key in keys),
                    run.seed,
                    run.status,
                    test.get("metric", run.metric or ""),
                    test.get("mean", ""),
                    test.get("ci95", ""),
                    test.get("episodes", ""),
                    _iterations(run),
                    results.get("wall_time_s", ""),
                    str(run.path),
                ]
            )
