"""Multirun bookkeeping: a failed job never loses the others, and the sweep ends with a summary.

Each job writes its own outcome into its folder (``results.json``, or ``error.json`` when it
failed), so the summary also works for launchers that run jobs in other processes or machines.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf

from metarun.errors import ConfigError
from metarun.logging import format_metric, write_json

log = logging.getLogger("metarun")

#: Set in the launching process when a sweep starts.
_sweep_dir: Path | None = None


class SweepSummary(Callback):
    """Remembers where the sweep writes, for `report` once Hydra is done."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _sweep_dir
        _sweep_dir = Path(config.hydra.sweep.dir)


def record_failure(run_dir: Path, error: BaseException) -> None:
    """``error.json`` in the job's folder: what failed and why, in one line and in full."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        run_dir / "error.json",
        {
            "error": type(error).__name__,
            "message": str(error).strip().splitlines()[0] if str(error).strip() else "",
            "traceback": "".join(traceback.format_exception(error)),
        },
    )


@dataclass
class JobOutcome:
    job: str
    overrides: str
    ok: bool
    detail: str


def outcomes(sweep_dir: Path) -> list[JobOutcome]:
    found = []
    for job_dir in sorted(
        (p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()),
        key=lambda p: int(p.name),
    ):
        overrides_file = job_dir / ".hydra" / "overrides.yaml"
        overrides = ""
        if overrides_file.exists():
            lines = overrides_file.read_text().splitlines()
            overrides = " ".join(line.removeprefix("- ").strip() for line in lines)
        results, error = job_dir / "results.json", job_dir / "error.json"
        if results.exists() and json.loads(results.read_text()).get("complete"):
            test = json.loads(results.read_text())["meta_test"]
            found.append(
                JobOutcome(
                    job_dir.name,
                    overrides,
                    True,
                    format_metric(test["metric"], test["mean"], test["ci95"]),
                )
            )
        elif error.exists():
            failure = json.loads(error.read_text())
            found.append(
                JobOutcome(
                    job_dir.name, overrides, False, f"{failure['error']}: {failure['message']}"
                )
            )
        else:
            found.append(JobOutcome(job_dir.name, overrides, False, "did not finish"))
    return found


def report() -> int:
    """Print the sweep's summary (if a sweep ran in this process); the number of failed jobs."""
    if _sweep_dir is None or not _sweep_dir.is_dir():
        return 0
    jobs = outcomes(_sweep_dir)
    failed = [job for job in jobs if not job.ok]
    print(f"\nsweep {_sweep_dir}: {len(jobs) - len(failed)} of {len(jobs)} jobs finished")
    for job in jobs:
        status = "ok    " if job.ok else "FAILED"
        print(f"  {status} {job.job:>3}  {job.overrides}  ->  {job.detail}")
    return len(failed)


def objective(results: dict[str, Any]) -> float | None:
    """What a sweeper (Optuna's) optimises: the run's best meta-validation value.

    Never the meta-test value: choosing hyperparameters on it would leak the held-out classes
    into the choice and bias the reported number. No finite value (``trainer.max_iters=0``, a
    diverged validation) gives None, not NaN: hydra-optuna-sweeper 1.3 records a None as a failed
    trial and goes on, while a NaN makes optuna 2.10 raise inside the sweeper and ends the study.
    """
    value, metric = results["best_val"]["value"], results["best_val"]["metric"]
    if value is None or not math.isfinite(value):
        log.warning("no finite meta-validation %s (got %s) for a sweeper to use", metric, value)
        return None
    return float(value)


class ObjectiveDirection(Callback):
    """Stops a search before its first trial when ``hydra.sweeper.direction`` misfits the data.

    The objective is accuracy on classification datasets and mse on regression ones; a search
    going the wrong way would run every trial and then name the worst one best.
    """

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        from metarun.algorithms.base import CLASSIFICATION, REGRESSION

        direction = OmegaConf.select(config, "hydra.sweeper.direction")
        direction = getattr(direction, "name", direction)  # the sweeper's default is an enum
        if not isinstance(direction, str):
            return  # no direction (a grid sweep) or several objectives
        target = OmegaConf.select(config, "dataset._target_")
        try:
            dataset = get_class(target) if isinstance(target, str) else None
        except (ImportError, ValueError):
            dataset = None
        if dataset is None:
            return  # the job itself reports a dataset that cannot be built
        objective = {CLASSIFICATION: ("accuracy", "maximize"), REGRESSION: ("mse", "minimize")}
        metric, expected = objective.get(getattr(dataset, "task_type", None), (None, direction))
        if direction == expected:
            return
        message = (
            f"hydra.sweeper.direction={direction}, but the objective is {dataset.__name__}'s "
            f"meta-validation {metric}: use hydra.sweeper.direction={expected} "
            "(or the hparams_search for this dataset)"
        )
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise ConfigError(message)
        print(f"metarun: error: {message}", file=sys.stderr)
        sys.exit(2)
