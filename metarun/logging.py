"""Where a run's numbers go: TensorBoard event files, the console, and results.json."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger("metarun")


class RunLogger:
    """Scalars to TensorBoard under ``<run_dir>/tensorboard``.

    ``purge_step`` is the first iteration a resumed run will write: TensorBoard drops any events
    at or after it that the interrupted run had written past its last checkpoint, so each step
    appears exactly once.
    """

    def __init__(self, run_dir: Path, purge_step: int | None = None) -> None:
        self.log_dir = Path(run_dir) / "tensorboard"
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}/{name}", value, global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def mean_and_ci95(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% normal confidence interval (1.96 standard errors)."""
    count = len(values)
    mean = sum(values) / count
    if count < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (count - 1)
    return mean, 1.96 * math.sqrt(variance / count)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    """Write JSON atomically so a reader never sees half a results file."""
    path = Path(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(payload, handle, indent=2, sort_keys=True)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def format_metric(metric: str, mean: float, ci95: float) -> str:
    """``accuracy 97.12% ± 0.31`` or ``mse 0.2143 ± 0.0120``: how people quote few-shot results."""
    if metric == "accuracy":
        return f"accuracy {100 * mean:.2f}% ± {100 * ci95:.2f}"
    return f"{metric} {mean:.4f} ± {ci95:.4f}"
