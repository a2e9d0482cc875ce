"""A run killed with SIGKILL mid-training resumes to exactly the uninterrupted result."""

from __future__ import annotations

import os
import signal
import subprocess
import time

from metarun.checkpoint import load_checkpoint
from metarun.errors import CheckpointError
from tests.runs import METARUN, check_ok, comparable, read_results, read_scalars, run_metarun

BUDGET = [
    "trainer.max_iters=1200",
    "trainer.val_every=400",
    "trainer.val_episodes=50",
    "trainer.test_episodes=100",
    "trainer.log_every=20",
    "trainer.ckpt_every=20",
    "trainer.progress=false",
]


def _checkpoint_iteration(path) -> int:
    try:
        return load_checkpoint(path)["iteration"]
    except CheckpointError:  # not written yet
        return 0


def test_sigkill_then_resume_matches_uninterrupted_run(tmp_path):
    check_ok(run_metarun(*BUDGET, "hydra.run.dir=straight", cwd=tmp_path))

    proc = subprocess.Popen(
        [METARUN, *BUDGET, "hydra.run.dir=killed"],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = tmp_path / "killed" / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 120
    while _checkpoint_iteration(last) < 420 and time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = _checkpoint_iteration(last)
    assert 420 <= killed_at < 1200
    assert not (tmp_path / "killed" / "results.json").exists()

    check_ok(run_metarun(f"resume={tmp_path / 'killed'}", cwd=tmp_path))
    assert comparable(read_results(tmp_path / "killed")) == comparable(
        read_results(tmp_path / "straight")
    )
    # TensorBoard: every step once, the same values as the uninterrupted run.
    straight, resumed = read_scalars(tmp_path / "straight"), read_scalars(tmp_path / "killed")
    for tag in ("meta_train/loss", "meta_train/mse", "meta_val/mse", "meta_test/mse"):
        assert resumed[tag] == straight[tag], tag
