"""The runs a comparison is made of: found under run and sweep folders, read from what they wrote.

A run folder is recognised by what metarun writes into it (``results.json``, ``error.json``,
``tensorboard/``, ``.hydra/overrides.yaml``), not by its name, so single runs, sweep jobs and
whole ``multirun/`` trees are all found the same way. Only overrides whose values differ between
runs distinguish them: those are what a comparison is about, and runs that differ only by
``seed`` are one configuration. Nothing here imports torch or TensorBoard, so reading is fast
and ``scripts/results_table.py`` can use it too.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metarun.errors import MetarunError

#: What makes a folder a run: any of these (a run that failed early may have only some).
RUN_MARKERS = ("results.json", "error.json", "tensorboard", ".hydra/overrides.yaml")
#: Shown in their own column, or not a setting of the run at all: never a configuration key.
NOT_CONFIGURATION = frozenset({"seed", "resume"})


class CompareError(MetarunError):
    """A path that holds no run, or outputs that cannot be written."""


@dataclass
class Run:
    """One run folder as read from disk; ``results`` is None while the run has not finished."""

    path: Path
    label: str
    overrides: dict[str, str]
    results: dict[str, Any] | None
    status: str
    seed: str
    #: The primary metric (``accuracy``, ``mse``): from results.json, else from the event tags.
    metric: str | None = None
    #: The last iteration logged to TensorBoard (set once the events are read).
    last_step: int | None = None
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def meta_test(self) -> dict[str, Any] | None:
        if self.results and self.results.get("complete"):
            return self.results.get("meta_test")
        return None


# ------------------------------------------------------------------------------------- finding
def _is_run(folder: Path) -> bool:
    return any((folder / marker).exists() for marker in RUN_MARKERS)


def _natural(path: Path) -> list[Any]:
    """Sort key putting job 10 after job 9."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_runs(paths: list[str] | list[Path]) -> list[Path]:
    """The run folders at or below each path, in order, each once."""
    if not paths:
        raise CompareError("give at least one run or sweep folder")
    found: dict[Path, None] = {}
    for given in map(Path, paths):
        if not given.exists():
            raise CompareError(f"{given} does not exist")
        if not given.is_dir():
            raise CompareError(f"{given} is a file; pass the run or sweep folder that holds it")
        if _is_run(given):
            found[given.resolve()] = None
            continue
        below = []
        for root, dirs, _ in os.walk(given):
            dirs[:] = [name for name in dirs if not name.startswith(".")]
            if _is_run(Path(root)):
                below.append(Path(root))
                dirs.clear()  # a run's own folders (checkpoints, tensorboard) hold no runs
        if not below:
            raise CompareError(
                f"{given} holds no metarun run (no results.json, tensorboard/ or "
                ".hydra/overrides.yaml in it or below it)"
            )
        found.update((path.resolve(), None) for path in sorted(below, key=_natural))
    return list(found)


# ------------------------------------------------------------------------------------- reading
def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None


def read_overrides(run_dir: Path) -> dict[str, str]:
    """The command-line overrides, as Hydra saved them; a resume's ``trainer.*`` changes win."""
    files = [run_dir / ".hydra" / "overrides.yaml"]
    files += sorted((run_dir / ".hydra").glob("resume-*/overrides.yaml"))
    overrides: dict[str, str] = {}
    for file in files:
        for item in _read_yaml(file) or []:
            key, _, value = str(item).partition("=")
            key = key.lstrip("+~")
            if key != "resume":
                overrides[key] = value
    return overrides


def _status(run_dir: Path, results: dict[str, Any] | None) -> str:
    if results is not None:
        if results.get("complete"):
            return "done"
        stopped_by = results.get("interrupted_by")
        return f"incomplete ({stopped_by})" if stopped_by else "incomplete"
    error_file = run_dir / "error.json"
    if error_file.is_file():
        try:
            error = json.loads(error_file.read_text())
            return f"failed: {error.get('error')}: {error.get('message')}"
        except (OSError, ValueError):
            return "failed"
    return "running"


def read_run(run_dir: Path, label: str) -> Run:
    """Everything but the events; an unreadable results.json counts as not there yet."""
    results = None
    if (run_dir / "results.json").is_file():
        try:
            results = json.loads((run_dir / "results.json").read_text())
        except (OSError, ValueError):
            results = None
    overrides = read_overrides(run_dir)
    seed = (results or {}).get("seed", overrides.get("seed"))
    if seed is None:
        seed = (_read_yaml(run_dir / ".hydra" / "config.yaml") or {}).get("seed", "")
    metric = ((results or {}).get("best_val") or {}).get("metric")
    return Run(run_dir, label, overrides, results, _status(run_dir, results), str(seed), metric)


def read_runs(paths: list[str] | list[Path]) -> list[Run]:
    """Every run under ``paths``, labelled by its path below the folder they all share."""
    folders = find_runs(paths)
    common = Path(os.path.commonpath(folders)) if len(folders) > 1 else folders[0].parent
    return [read_run(folder, str(folder.relative_to(common))) for folder in folders]


# ------------------------------------------------------------------------------------- grouping
def distinguishing_keys(runs: list[Run]) -> list[str]:
    """Override keys whose values differ between runs (absent counts as a value), seed aside."""
    keys: dict[str, None] = {}
    for run in runs:
        keys.update(dict.fromkeys(run.overrides))
    return [
        key
        for key in keys
        if key not in NOT_CONFIGURATION and len({run.overrides.get(key) for run in runs}) > 1
    ]


def configurations(runs: list[Run], keys: list[str]) -> dict[tuple[str, ...], list[Run]]:
    """Runs grouped by their values of ``keys``: the seeds of one configuration together."""
    groups: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(run.overrides.get(key, "") for key in keys), []).append(run)
    return groups


def describe(keys: list[str], values: tuple[str, ...]) -> str:
    """``algo=maml optimizer.lr=0.001``: how the user typed it, ``(default)`` where not set."""
    return (
        " ".join(f"{key}={value or '(default)'}" for key, value in zip(keys, values, strict=True))
        or "all"
    )
