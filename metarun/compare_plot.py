"""The comparison plot of `metarun-compare`: scalars against iteration, one line per configuration.

Events are read with TensorBoard's own reader, so the plot shows what TensorBoard shows
(including a resumed run's purge of the steps logged past its last checkpoint). Matplotlib draws
on a bare `Figure` with the Agg canvas: no display and no pyplot global state, so it works on a
cluster node, over ssh and inside tests.

Seeds of one configuration become one line, their mean at each iteration, with a band from the
lowest to the highest seed (min–max rather than ± std: with the 2–5 seeds a sweep usually has, a
standard deviation says little, and min–max shows every seed's extent honestly).
"""

from __future__ import annotations

import math
from pathlib import Path
from statistics import fmean

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metarun.compare_runs import CompareError, Run, configurations, describe

Series = list[tuple[int, float]]

#: Default panels after the meta-validation metric(s).
DEFAULT_EXTRA = ("meta_train/loss",)
PHASES = {"meta_train": "meta-train", "meta_val": "meta-validation", "meta_test": "meta-test"}
LOWER_IS_BETTER = ("loss", "mse")


def read_scalars(run_dir: Path) -> dict[str, Series]:
    """Every scalar series of the run (``{}`` when it has logged nothing yet)."""
    log_dir = run_dir / "tensorboard"
    if not log_dir.is_dir():
        return {}
    accumulator = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def load_events(runs: list[Run]) -> None:
    """Attach each run's scalars, its last logged iteration and, for a run without results.json,
    its primary metric: the trainer logs ``meta_val/<metric>_ci95`` for that one only."""
    for run in runs:
        run.scalars = read_scalars(run.path)
        run.last_step = max((step for one in run.scalars.values() for step, _ in one), default=None)
        if run.metric is None:
            run.metric = next(
                (
                    tag.removeprefix("meta_val/").removesuffix("_ci95")
                    for tag in run.scalars
                    if tag.startswith("meta_val/") and tag.endswith("_ci95")
                ),
                None,
            )


def default_tags(run: Run) -> list[str]:
    """What a run is compared on by default: its own meta-validation metric, then the loss."""
    own = [f"meta_val/{run.metric}"] if run.metric else []
    return own + list(DEFAULT_EXTRA)


def aggregate(series: list[Series]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps, mean, min and max over the runs that logged each step (non-finite values left out).

    A seed still running has fewer steps: past its last one the mean is over the others.
    """
    by_step: dict[int, list[float]] = {}
    for one in series:
        for step, value in one:
            if math.isfinite(value):
                by_step.setdefault(step, []).append(value)
    steps = sorted(by_step)
    return (
        steps,
        [fmean(by_step[step]) for step in steps],
        [min(by_step[step]) for step in steps],
        [max(by_step[step]) for step in steps],
    )


def _title(tag: str) -> str:
    phase, _, name = tag.partition("/")
    if not name:
        return tag
    better = " (lower is better)" if name in LOWER_IS_BETTER else ""
    better = " (higher is better)" if name == "accuracy" else better
    return f"{PHASES.get(phase, phase)} {name}{better}"


def _ylabel(tag: str) -> str:
    name = tag.rpartition("/")[2]
    return "accuracy (%)" if name == "accuracy" else name


def _legend_label(keys: list[str], values: tuple[str, ...], members: list[Run]) -> str:
    seeds = sorted({run.seed for run in members}, key=lambda s: (len(s), s))
    seed_text = f"seed {seeds[0]}" if len(members) == 1 else f"{len(members)} seeds"
    running = sum(run.status == "running" for run in members)
    extra = f", {running} running" if running else ""
    # With nothing to tell configurations apart there is one: name it by its run, or "all runs".
    name = members[0].label if len(members) == 1 else "all runs"
    if keys:
        name = describe(keys, values)
    return f"{name} ({seed_text}{extra})"


def missing_notes(runs: list[Run], tags: list[str], explicit: bool) -> list[str]:
    """One line per tag that some run lacks. With the default panels a run is only expected to
    have its own metric, so a regression run is not reported for lacking accuracy."""
    notes = []
    for tag in tags:
        expected = [run for run in runs if explicit or tag in default_tags(run)]
        lacking = [run for run in expected if not run.scalars.get(tag)]
        if lacking:
            names = ", ".join(
                f"{run.label} ({run.status})" if run.status != "done" else run.label
                for run in lacking
            )
            notes.append(f"note: no {tag} in {len(lacking)} of {len(runs)} runs: {names}")
    return notes


def chosen_tags(runs: list[Run], scalars: list[str] | None) -> list[str]:
    """The panels: the tags asked for, else every run's default tags in order of appearance."""
    if scalars:
        logged = {tag for run in runs for tag in run.scalars}
        if logged and not logged & set(scalars):
            raise CompareError(
                f"no run logged {', '.join(scalars)}; logged tags are: {', '.join(sorted(logged))}"
            )
        return list(dict.fromkeys(scalars))
    tags: dict[str, None] = {}
    for run in runs:
        tags.update(dict.fromkeys(tag for tag in default_tags(run) if tag.startswith("meta_val/")))
    return [*tags, *DEFAULT_EXTRA]


def plot_runs(
    runs: list[Run], keys: list[str], scalars: list[str] | None, path: Path, fmt: str
) -> list[str]:
    """Draw one panel per tag into ``path``; return notes on what could not be plotted."""
    tags = chosen_tags(runs, scalars)
    groups = configurations(runs, keys)
    columns = min(len(tags), 3)
    rows = math.ceil(len(tags) / columns)
    legend_rows = math.ceil(len(groups) / 2)
    figure = Figure(
        figsize=(5.0 * columns + 0.5, 3.6 * rows + 0.6 + 0.25 * legend_rows),
        dpi=100,
        layout="constrained",
    )
    FigureCanvasAgg(figure)
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    palette = _palette(len(groups))
    handles: dict[str, object] = {}
    for axis, tag in zip(axes, tags, strict=False):
        scale = 100.0 if tag.endswith("/accuracy") else 1.0
        drawn = False
        for color, (values, members) in zip(palette, groups.items(), strict=True):
            present = [run.scalars[tag] for run in members if run.scalars.get(tag)]
            if not present:
                continue
            steps, mean, low, high = aggregate(present)
            (line,) = axis.plot(
                steps,
                [scale * value for value in mean],
                color=color,
                linewidth=1.6,
                marker="o" if len(steps) <= 15 else None,
                markersize=3.5,
            )
            if len(present) > 1:
                axis.fill_between(
                    steps,
                    [scale * value for value in low],
                    [scale * value for value in high],
                    color=color,
                    alpha=0.2,
                    linewidth=0,
                )
            handles.setdefault(_legend_label(keys, values, members), line)
            drawn = True
        axis.set_title(_title(tag), fontsize=11)
        axis.set_xlabel("iteration")
        axis.set_ylabel(_ylabel(tag))
        axis.grid(alpha=0.3)
        if not drawn:
            axis.text(
                0.5,
                0.5,
                f"no run logged\n{tag}",
                transform=axis.transAxes,
                ha="center",
                va="center",
                color="gray",
            )
    for axis in axes[len(tags) :]:
        axis.set_visible(False)
    seeded = any(len(members) > 1 for members in groups.values())
    figure.suptitle(
        f"{_count(len(runs), 'run')}, {_count(len(groups), 'configuration')}"
        + ("; lines: mean over seeds, bands: min–max" if seeded else ""),
        fontsize=12,
    )
    if handles:
        figure.legend(
            list(handles.values()),
            list(handles),
            loc="outside lower center",
            ncols=min(len(handles), 2),
            fontsize=9,
            frameon=False,
        )
    figure.savefig(path, format=fmt, dpi=100)
    return missing_notes(runs, tags, explicit=bool(scalars))


def _palette(count: int) -> list[tuple[float, float, float, float]]:
    """Distinct colours: tab10 up to ten configurations, tab20 beyond (cycled past twenty)."""
    cmap = colormaps["tab10" if count <= 10 else "tab20"]
    return [cmap(index % cmap.N) for index in range(count)]


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'' if number == 1 else 's'}"
