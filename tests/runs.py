"""Running the real `metarun` console script in a subprocess, and reading what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

METARUN = str(Path(sys.executable).with_name("metarun"))

#: Tiny budgets for end-to-end runs on sinusoids: seconds, not minutes.
SINUSOID_TINY = [
    "trainer.max_iters=40",
    "trainer.val_every=20",
    "trainer.val_episodes=50",
    "trainer.test_episodes=600",
    "trainer.log_every=10",
    "trainer.ckpt_every=10",
    "trainer.eval_batch_size=300",
    "trainer.progress=false",
]


def run_metarun(
    *overrides: str, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    full_env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [METARUN, *overrides],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, f"metarun failed ({proc.returncode}):\n{proc.stderr[-4000:]}"


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def comparable(results: dict) -> dict:
    """results.json without the wall-clock time, which no two runs share."""
    return {key: value for key, value in results.items() if key != "wall_time_s"}


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series in the run's TensorBoard logs, read back by TensorBoard's own reader."""
    accumulator = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def omniglot_learning_run(
    tmp_path: Path, data_root: Path, cache_dir: Path, iterations: int, test_episodes: int,
    *overrides: str,
) -> dict:
    """A learning run on the real Omniglot, 5-way 1-shot with 5 queries per class, conv4 at 16
    channels, seed 0, one thread, validation and logging only at the end; its results.json."""
    proc = run_metarun(
        "dataset=omniglot",
        f"dataset.root={data_root}",
        f"dataset.cache_dir={cache_dir}",
        "dataset.download=false",
        "backbone.channels=16",
        "task.ways=5",
        "task.shots=1",
        "task.queries=5",
        f"trainer.max_iters={iterations}",
        f"trainer.val_every={iterations}",
        "trainer.val_episodes=20",
        f"trainer.test_episodes={test_episodes}",
        f"trainer.log_every={iterations}",
        "trainer.ckpt_every=1000",
        "trainer.eval_batch_size=100",
        "trainer.progress=false",
        "seed=0",
        # One thread: the same CPU time, and no threads spinning against other jobs' threads.
        "threads=1",
        "hydra.run.dir=run",
        *overrides,
        cwd=tmp_path,
    )
    check_ok(proc)
    return read_results(tmp_path / "run")


def poison_meta_loss(trainer, at_iterations: set[int]) -> None:
    """Make the meta-loss (and its metrics) NaN at the given (1-based) iterations, as a
    diverging run would."""
    real_step = trainer.algorithm.meta_train_step
    calls = {"count": 0}

    def step(batch):
        calls["count"] += 1
        loss, metrics = real_step(batch)
        if calls["count"] in at_iterations:
            return loss * float("nan"), {name: float("nan") for name in metrics}
        return loss, metrics

    trainer.algorithm.meta_train_step = step
