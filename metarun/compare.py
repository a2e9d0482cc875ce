"""`metarun-compare`: runs and sweeps side by side, as a plot and a table, from what they wrote.

    metarun-compare multirun/2026-11-25/13-10-00 [more sweep or run folders]
        [--out FOLDER | FILE.png | FILE.svg] [--scalars TAG ...] [--format png|svg]

writes ``compare.png`` (scalars against iteration: by default each run's meta-validation metric
and ``meta_train/loss``; seeds of one configuration as their mean with a min–max band),
``compare.md`` and ``compare.csv`` (final meta-test metric ± 95% CI per run, with the overrides
that distinguish the runs as columns) and prints the table.

A sweep is most often compared while it is still going, so runs still training (events, no
results.json), interrupted or failed are plotted and listed as such rather than refused. Nothing
here imports torch: the command answers in a second or two. The parts: `compare_runs` (finding
and reading runs), `compare_table`, `compare_plot`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from metarun.compare_plot import load_events, plot_runs
from metarun.compare_runs import CompareError, distinguishing_keys, read_runs
from metarun.compare_table import markdown_table, write_csv
from metarun.errors import MetarunError


def output_paths(paths: list[str], out: str | None, fmt: str | None) -> tuple[Path, str]:
    """Where the files go (a stem: ``<stem>.png``, ``.md``, ``.csv``) and the plot's format.

    By default into the one folder compared, or ``./compare`` when several are: putting a
    comparison of two sweeps inside one of them would be arbitrary.
    """
    if out is not None and Path(out).suffix.lower() in (".png", ".svg"):
        suffix = Path(out).suffix.lower()[1:]
        if fmt is not None and fmt != suffix:
            raise CompareError(f"--out {out} is a .{suffix} file but --format is {fmt}; drop one")
        return Path(out).with_suffix(""), suffix
    if out is not None:
        folder = Path(out)
    else:
        folder = Path(paths[0]) if len(paths) == 1 else Path("compare")
    return folder / "compare", fmt or "png"


def compare(paths: list[str], out: str | None, scalars: list[str] | None, fmt: str | None) -> str:
    """Read, plot, write the tables; return what to print."""
    stem, fmt = output_paths(paths, out, fmt)
    runs = read_runs(paths)
    load_events(runs)
    table = markdown_table(runs)
    plot_file, md_file, csv_file = (Path(f"{stem}.{ext}") for ext in (fmt, "md", "csv"))
    try:
        stem.parent.mkdir(parents=True, exist_ok=True)
        notes = plot_runs(runs, distinguishing_keys(runs), scalars, plot_file, fmt)
        md_file.write_text(table + "\n")
        write_csv(csv_file, runs)
    except OSError as err:
        raise CompareError(
            f"cannot write the comparison to {stem.parent}: {err.strerror or err}; "
            "pass another folder with --out"
        ) from err
    wrote = [f"wrote {plot_file}", f"wrote {md_file}", f"wrote {csv_file}"]
    return "\n".join([table, "", *notes, *wrote])


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metarun-compare",
        description="Plot and tabulate metarun runs and sweeps from their TensorBoard events "
        "and results.json. Seeds of one configuration are shown as their mean with a min-max "
        "band.",
    )
    parser.add_argument("paths", nargs="+", metavar="DIR", help="run or sweep folders")
    parser.add_argument(
        "--out",
        help="folder for compare.{png,md,csv}, or a .png/.svg file (the tables go beside it); "
        "default: the folder given, or ./compare when several are",
    )
    parser.add_argument(
        "--scalars",
        nargs="+",
        metavar="TAG",
        help="TensorBoard tags to plot, one panel each (default: each run's meta-validation "
        "metric, e.g. meta_val/accuracy or meta_val/mse, and meta_train/loss)",
    )
    parser.add_argument("--format", choices=["png", "svg"], help="plot format (default: png)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        print(compare(args.paths, args.out, args.scalars, args.format))
    except MetarunError as err:
        print(f"metarun-compare: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
