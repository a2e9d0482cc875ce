"""Where a run's numbers go: TensorBoard event files, the console, and results.json."""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams import summary_v2 as hparams_v2
from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger("metarun")


def _event_file_second(path: Path) -> int:
    try:
        return int(path.name.split(".")[3])
    except (IndexError, ValueError):
        return 0


def _wait_for_a_later_file_name(log_dir: Path) -> None:
    """Wait, if need be, until a new events file's name sorts after those already in
    ``log_dir``: TensorBoard reads a folder's files in name order, and a name is
    ``events.out.tfevents.<second>.<host>.<pid>.<counter>``. Two files of the same second can
    sort the wrong way round (pid or counter 9 before 10): the resumed run's events would then
    be read first and the interrupted run's, read after them, purged as stale. Seen when a run is
    interrupted and resumed within one second in one process (tests, an in-process sweep)."""
    seconds = [_event_file_second(p) for p in log_dir.glob("events.out.tfevents.*")]
    if not seconds:
        return
    latest, now = max(seconds), time.time()
    # (A file stamped further ahead came from a clock that was ahead: waiting for it could take
    # hours, so it is left to sort as it will.)
    if int(now) <= latest <= now + 2:
        time.sleep(latest + 1 - now)


class RunLogger:
    """Scalars to TensorBoard under ``<run_dir>/tensorboard``.

    ``purge_step`` is the first iteration a resumed run will write: TensorBoard drops any events
    at or after it that the interrupted run had written past its last checkpoint, so each step
    appears exactly once.
    """

    def __init__(self, run_dir: Path, purge_step: int | None = None) -> None:
        self.log_dir = Path(run_dir) / "tensorboard"
        _wait_for_a_later_file_name(self.log_dir)
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=purge_step)

    def scalars(self, prefix: str, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(f"{prefix}/{name}", value, global_step=step)

    def hparams_start(self, hparams: dict[str, Any], group: str) -> None:
        """The run's hyperparameters for TensorBoard's HParams tab (a session start).

        Only the session is written, never an experiment summary: with one per run, TensorBoard
        would show the first run's hyperparameter list for the whole sweep. Without one it lists
        the union over runs and takes the run's scalars (meta_val/*, meta_test/*) as metrics.
        Runs with the same ``group`` (the same configuration, other seeds) form one session group.
        """
        summary = hparams_v2.hparams_pb(hparams, trial_id=group)
        self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def hparams_end(self, complete: bool) -> None:
        """Marks the session finished, so the HParams tab shows its status."""
        status = api_pb2.STATUS_SUCCESS if complete else api_pb2.STATUS_ABORTED
        end_info = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
        end = plugin_data_pb2.HParamsPluginData(session_end_info=end_info)
        summary = summary_pb2.Summary()
        summary.value.add(
            tag=hparams_metadata.SESSION_END_INFO_TAG,
            metadata=hparams_metadata.create_summary_metadata(end),
            tensor=hparams_metadata.NULL_TENSOR,
        )
        self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def flat_hparams(config: dict[str, Any], skip: frozenset[str] = frozenset()) -> dict[str, Any]:
    """A nested config as TensorBoard hyperparameters: dotted keys, scalar values.

    Lists become strings, ``None`` becomes ``"null"`` and Hydra's ``_target_``/``_partial_``
    keys are left out (they say how to build, not how to learn); ``skip`` names keys (dotted,
    or a section) that are no hyperparameter at all, e.g. where the data lives.
    """
    flat: dict[str, Any] = {}

    def visit(node: Any, prefix: str) -> None:
        if prefix in skip:
            return
        if isinstance(node, dict):
            for key, value in node.items():
                if not (str(key).startswith("_") and str(key).endswith("_")):
                    visit(value, f"{prefix}.{key}" if prefix else str(key))
        elif isinstance(node, bool | int | float | str):
            flat[prefix] = node
        else:
            flat[prefix] = "null" if node is None else str(node)

    visit(config, "")
    return flat


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
