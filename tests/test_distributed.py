"""Data-parallel runs on torch.distributed (gloo, CPU): two processes started by torchrun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.runs import SINUSOID_TINY, check_ok, comparable, read_results, run_metarun

TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
REPO = Path(__file__).resolve().parent.parent
#: One thread a process: two processes share the machine's cores.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "METARUN_DIST_TIMEOUT": "60"}
ENV.pop("HYDRA_FULL_ERROR", None)


def torchrun(*arguments: str, cwd: Path, processes: int = 2) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [TORCHRUN, "--standalone", f"--nproc_per_node={processes}", *arguments],
        cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finished(process: subprocess.Popen[str], timeout: float = 240) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"torchrun did not finish within {timeout} s:\n{err[-3000:]}")
    return process.returncode, out, err


def run_distributed(*overrides: str, cwd: Path, processes: int = 2) -> dict:
    code, _, err = finished(torchrun("-m", "metarun", *overrides, cwd=cwd, processes=processes))
    assert code == 0, err[-4000:]
    return read_results(Path(overrides[-1].split("=", 1)[1]))


def _close(first: dict, second: dict, tolerance: float = 1e-5) -> None:
    """Two results.json equal up to float32 rounding (the sums are grouped differently)."""
    assert first.keys() == second.keys()
    for key, value in first.items():
        if isinstance(value, dict):
            _close(value, second[key], tolerance)
        elif isinstance(value, float):
            assert value == pytest.approx(second[key], rel=tolerance, abs=tolerance), key
        else:
            assert value == second[key], key


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)["algorithm"]


def test_sharded_meta_gradients_equal_one_process_in_float64(tmp_path):
    code, _, err = finished(torchrun(str(REPO / "tests" / "distributed_grad_worker.py"),
                                       cwd=tmp_path))
    assert code == 0, err[-3000:]
    ranks = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("grad-rank*.json"))]
    assert sorted((rank["rank"], rank["tasks"]) for rank in ranks) == [(0, 3), (1, 2)]
    for rank in ranks:
        assert rank["gradient_scale"] > 1e-3  # a real gradient, not zeros compared with zeros
        assert rank["max_abs_difference"] < 1e-10


def test_the_clipped_meta_gradient_is_the_whole_batchs_on_two_processes(tmp_path):
    """Meta-LSTM's clip is the trainer's, after the all-reduce: two ranks make the update of one
    process clipping the whole meta-batch's gradient (float64)."""
    code, _, err = finished(torchrun(str(REPO / "tests" / "distributed_clip_worker.py"),
                                     cwd=tmp_path))
    assert code == 0, err[-3000:]
    ranks = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("clip-rank*.json"))]
    assert sorted((rank["rank"], rank["tasks"]) for rank in ranks) == [(0, 3), (1, 2)]
    for rank in ranks:
        assert rank["norm"] == pytest.approx(rank["whole_norm"], rel=1e-12)
        assert rank["norm"] > 10 * 1e-3  # the bound (1e-3) does clip
        assert rank["max_abs_difference"] < 1e-12
        # Clipping each rank's share before the sum gives another update: the test can tell.
        assert rank["per_rank_clip_difference"] > 1e-5


def test_two_processes_match_one_and_only_rank_zero_writes(tmp_path):
    tiny = [*SINUSOID_TINY, "task.meta_batch_size=4", "threads=1"]
    check_ok(run_metarun(*tiny, f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path))
    two = run_distributed(*tiny[:-1], f"hydra.run.dir={tmp_path / 'two'}", cwd=tmp_path)
    _close(comparable(read_results(tmp_path / "one")), comparable(two))
    for name, tensor in _weights(tmp_path / "one").items():
        assert torch.allclose(tensor, _weights(tmp_path / "two")[name], rtol=1e-4, atol=1e-6)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["one", "two"]  # no rank-1 folder
    assert not list(Path("/tmp").glob(f"metarun-rank1-*{os.getpid()}*"))


def test_a_run_resumes_at_another_world_size(tmp_path):
    tiny = [*SINUSOID_TINY, "task.meta_batch_size=4", "threads=1"]
    check_ok(run_metarun(*tiny, f"hydra.run.dir={tmp_path / 'straight'}", cwd=tmp_path))
    half = [override for override in tiny if not override.startswith("trainer.max_iters")]
    run_distributed(*half, "trainer.max_iters=20", f"hydra.run.dir={tmp_path / 'split'}",
                    cwd=tmp_path)
    check_ok(run_metarun(f"resume={tmp_path / 'split'}", "trainer.max_iters=40", "threads=1",
                         cwd=tmp_path))
    resumed = comparable(read_results(tmp_path / "split"))
    straight = comparable(read_results(tmp_path / "straight"))
    _close(straight, resumed)


def _rank_pid(launcher: subprocess.Popen[str], rank: int, timeout: float = 60) -> int:
    """The worker process of ``rank`` among torchrun's children (read from their environment)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = subprocess.run(["pgrep", "-P", str(launcher.pid)], capture_output=True,
                                  text=True).stdout.split()
        for pid in children:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"RANK={rank}".encode() in environ:
                return int(pid)
        time.sleep(0.2)
    pytest.fail(f"no worker of rank {rank} appeared")


def _long_run(tmp_path: Path) -> tuple[subprocess.Popen[str], Path]:
    run_dir = tmp_path / "run"
    launcher = torchrun("-m", "metarun", "trainer.max_iters=1000000", "trainer.val_every=100000",
                        "trainer.ckpt_every=20", "trainer.progress=false",
                        "task.meta_batch_size=4", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    deadline = time.monotonic() + 120
    while not (run_dir / "checkpoints" / "last.pt").is_file():
        if launcher.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the run did not start:\n{launcher.communicate()[1][-3000:]}")
        time.sleep(0.2)
    return launcher, run_dir


def test_sigterm_to_one_rank_stops_every_rank_with_the_run_saved(tmp_path):
    launcher, run_dir = _long_run(tmp_path)
    os.kill(_rank_pid(launcher, 1), signal.SIGTERM)
    code, _, err = finished(launcher, timeout=120)
    assert code != 0
    results = read_results(run_dir)
    assert results["complete"] is False and results["interrupted_by"] == "SIGTERM"
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert saved["iteration"] == results["iterations"] > 20  # saved where the ranks stopped


def test_a_killed_rank_stops_the_others_instead_of_leaving_them_waiting(tmp_path):
    """torchrun sees the dead worker and stops the rest (or, without torchrun, their next
    collective fails or times out): no process waits forever, the last checkpoint stays."""
    launcher, run_dir = _long_run(tmp_path)
    os.kill(_rank_pid(launcher, 1), signal.SIGKILL)
    code, _, _ = finished(launcher, timeout=150)
    assert code != 0
    saved = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=False)
    assert saved["iteration"] >= 20
    check_ok(run_metarun(f"resume={run_dir}", "trainer.max_iters=" + str(saved["iteration"] + 2),
                         "trainer.val_episodes=5", "trainer.test_episodes=5", "threads=1",
                         cwd=tmp_path))
