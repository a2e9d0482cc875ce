"""Faults a long run meets: kill -9, SIGINT/SIGTERM, corrupt checkpoints, failing sweep jobs."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from metarun.checkpoint import load_checkpoint, previous_path
from metarun.errors import CheckpointError
from tests.runs import METARUN, check_ok, comparable, read_results, read_scalars, run_metarun

MAX_ITERS = 600  # long enough to kill at three random points; the length itself is not tested
BUDGET = [
    f"trainer.max_iters={MAX_ITERS}",
    "trainer.val_every=200",
    "trainer.val_episodes=50",
    "trainer.test_episodes=100",
    "trainer.log_every=20",
    "trainer.ckpt_every=30",  # not a multiple of log_every: resume must restore the log window
    "trainer.progress=false",
]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted reference run."""
    root = tmp_path_factory.mktemp("straight")
    check_ok(run_metarun(*BUDGET, "hydra.run.dir=run", cwd=root))
    return root / "run"


def _iteration(path: Path) -> int:
    try:
        return load_checkpoint(path)["iteration"]
    except CheckpointError:
        return 0


def _start(args: list[str], cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [METARUN, *args], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for_checkpoint(proc: subprocess.Popen, last: Path, at_least: int) -> None:
    deadline = time.monotonic() + 180
    while _iteration(last) < at_least:
        assert proc.poll() is None, f"the run ended first:\n{proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.01)


def _assert_same_as(run_dir: Path, reference: Path) -> None:
    assert comparable(read_results(run_dir)) == comparable(read_results(reference))
    mine, theirs = read_scalars(run_dir), read_scalars(reference)
    for tag in ("meta_train/loss", "meta_train/mse", "meta_val/mse", "meta_test/mse"):
        assert mine[tag] == theirs[tag], tag  # every step once, identical values


def test_sigkill_at_random_points_then_resume_matches_uninterrupted(tmp_path, straight):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.pt"
    points = sorted(random.Random(7).sample(range(60, MAX_ITERS - 200), 3))
    args = [*BUDGET, "hydra.run.dir=run"]
    for point in points:
        proc = _start(args, tmp_path)
        _wait_for_checkpoint(proc, last, point)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        assert not (run_dir / "results.json").exists()
        args = [f"resume={run_dir}"]
    check_ok(run_metarun(*args, cwd=tmp_path))
    _assert_same_as(run_dir, straight)


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_stop_signal_saves_marks_incomplete_and_resumes(tmp_path, straight, signum, exit_code):
    run_dir = tmp_path / "run"
    proc = _start([*BUDGET, "hydra.run.dir=run"], tmp_path)
    _wait_for_checkpoint(proc, run_dir / "checkpoints" / "last.pt", 100)
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == exit_code, stderr[-2000:]
    assert f"metarun resume={run_dir}" in stderr
    assert "Traceback" not in stderr
    partial = read_results(run_dir)
    assert partial["complete"] is False
    assert partial["interrupted_by"] == signal.Signals(signum).name
    assert "meta_test" not in partial
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["iteration"] == partial[
        "iterations"
    ]
    check_ok(run_metarun(f"resume={run_dir}", cwd=tmp_path))
    _assert_same_as(run_dir, straight)


def test_corrupt_last_checkpoint_falls_back_to_the_previous_one(tmp_path, straight):
    run_dir = tmp_path / "run"
    last = run_dir / "checkpoints" / "last.pt"
    proc = _start([*BUDGET, "hydra.run.dir=run"], tmp_path)
    _wait_for_checkpoint(proc, last, 200)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    good = load_checkpoint(previous_path(last))["iteration"]
    last.write_bytes(last.read_bytes()[:1000])  # torn, as a failing disk might leave it

    proc = run_metarun(f"resume={run_dir}", cwd=tmp_path)
    check_ok(proc)
    said = proc.stdout + proc.stderr  # Hydra's console log goes to stdout
    assert "truncated or corrupt" in said
    assert f"resuming from the previous checkpoint last-previous.pt (iteration {good})" in said
    _assert_same_as(run_dir, straight)


def test_corrupt_checkpoint_without_fallback_is_a_clear_error(tmp_path):
    check_ok(run_metarun(*BUDGET[1:], "trainer.max_iters=2", "hydra.run.dir=run", cwd=tmp_path))
    checkpoints = tmp_path / "run" / "checkpoints"
    previous_path(checkpoints / "last.pt").unlink(missing_ok=True)
    (checkpoints / "last.pt").write_bytes(b"not a checkpoint")
    proc = run_metarun(f"resume={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "truncated or corrupt" in proc.stderr and "Traceback" not in proc.stderr


def test_a_failing_sweep_job_keeps_the_others_and_is_summarised(tmp_path):
    proc = run_metarun(
        "-m",
        "task.shots=5,0,10",
        "trainer.max_iters=5",
        "trainer.val_every=5",
        "trainer.val_episodes=10",
        "trainer.test_episodes=10",
        "trainer.progress=false",
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert "2 of 3 jobs finished" in proc.stdout
    assert "FAILED   1  task.shots=0" in proc.stdout
    assert "task.shots=0 is not allowed" in proc.stdout
    assert "Traceback" not in proc.stderr
    sweep = tmp_path / "sweep"
    assert read_results(sweep / "0")["complete"] and read_results(sweep / "2")["complete"]
    error = json.loads((sweep / "1" / "error.json").read_text())
    assert error["error"] == "ConfigError"


def test_full_error_env_shows_the_traceback(tmp_path):
    proc = subprocess.run(
        [METARUN, "task.shots=0"],
        cwd=tmp_path,
        env={**os.environ, "HYDRA_FULL_ERROR": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "Traceback" in proc.stderr
