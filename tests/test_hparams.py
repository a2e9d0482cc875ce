"""TensorBoard's HParams tab compares a sweep out of the box: checked against a real TensorBoard."""

from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from metarun.logging import RunLogger, flat_hparams
from tests.runs import SINUSOID_TINY, check_ok, read_results, read_scalars, run_metarun

TENSORBOARD = str(Path(sys.executable).with_name("tensorboard"))


def test_flat_hparams_are_dotted_scalars_without_build_keys():
    config = {
        "algo": {"_target_": "x.MAML", "inner_lr": 0.4, "first_order": False},
        "optimizer": {"_partial_": True, "lr": 1e-3},
        "dataset": {"root": "/data", "amplitude": [0.1, 5.0]},
        "resume": None,
        "seed": 3,
    }
    flat = flat_hparams(config, skip=frozenset({"dataset.root"}))
    assert flat == {
        "algo.inner_lr": 0.4,
        "algo.first_order": False,
        "optimizer.lr": 1e-3,
        "dataset.amplitude": "[0.1, 5.0]",
        "resume": "null",
        "seed": 3,
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(url: str, payload: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.fixture
def tensorboard_for():
    servers = []

    def start(logdir: Path) -> str:
        port = _free_port()
        server = subprocess.Popen(
            [TENSORBOARD, "--logdir", str(logdir), "--port", str(port), "--host", "127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        servers.append(server)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{base}/data/plugins_listing", timeout=5).read()
                return base
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.5)
        raise AssertionError("tensorboard did not start within 60 s")

    yield start
    for server in servers:
        server.terminate()
        server.wait(timeout=30)


def test_a_sweep_appears_in_tensorboards_hparams_tab(tmp_path, tensorboard_for):
    sweep = tmp_path / "sweep"
    proc = run_metarun(
        "-m", "algo=maml,fomaml", "seed=0,1", *SINUSOID_TINY, f"hydra.sweep.dir={sweep}",
        cwd=tmp_path, env={"OMP_NUM_THREADS": "1"},
    )
    check_ok(proc)
    base = tensorboard_for(sweep)
    experiment = _post(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
    infos = {info["name"]: info for info in experiment["hparamInfos"]}
    assert sorted(infos["algo"]["domainDiscrete"]) == ["fomaml", "maml"]
    assert infos["algo"]["differs"] is True
    assert "algo.inner_lr" in infos and "optimizer.lr" in infos
    assert "dataset.root" not in infos and "algo._target_" not in infos
    metric_tags = {metric["name"]["tag"] for metric in experiment["metricInfos"]}
    assert {"meta_test/mse", "meta_val/mse", "meta_train/loss"} <= metric_tags

    groups = _post(
        f"{base}/data/plugin/hparams/session_groups",
        {
            "experimentName": "",
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_RUNNING"],
            "colParams": [{"metric": {"tag": "meta_test/mse", "group": ""}}],
            "startIndex": 0,
            "sliceSize": 100,
        },
    )["sessionGroups"]
    # Seeds of one configuration form one group; each session ended successfully.
    assert len(groups) == 2
    by_algo = {group["hparams"]["algo"]: group for group in groups}
    assert set(by_algo) == {"maml", "fomaml"}
    # A session is named by its run folder relative to the log dir: "<job>/tensorboard".
    results = {f"{job.name}/tensorboard": read_results(job) for job in sweep.glob("[0-9]*")}
    for algo, group in by_algo.items():
        assert len(group["sessions"]) == 2
        for session in group["sessions"]:
            assert session["status"] == "STATUS_SUCCESS"
            run = results[session["name"]]
            assert run["algo"] == algo
            logged = {m["name"]["tag"]: m["value"] for m in session["metricValues"]}
            assert math.isclose(logged["meta_test/mse"], run["meta_test"]["mean"], rel_tol=1e-6)


def test_a_resumed_log_reads_back_after_the_interrupted_one_within_one_second(
    tmp_path, monkeypatch
):
    """TensorBoard reads a folder's event files in name order, and names end
    ``<second>.<host>.<pid>.<counter>``: with the counter at 9 then 10 in one second (an
    interrupted run resumed in the same process), the resumed file would sort first and the
    interrupted run's steps be purged as stale (a flaky fp16 resume test was this)."""
    from tensorboard.summary.writer import event_file_writer

    monkeypatch.setattr(event_file_writer, "_global_uid", event_file_writer.AtomicCounter(9))
    interrupted = RunLogger(tmp_path)
    for step in range(1, 7):
        interrupted.scalars("meta_train", {"loss": float(step)}, step)
    interrupted.close()
    resumed = RunLogger(tmp_path, purge_step=5)  # the checkpoint was at 4
    for step in range(5, 9):
        resumed.scalars("meta_train", {"loss": 10.0 * step}, step)
    resumed.close()
    assert read_scalars(tmp_path)["meta_train/loss"] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0), (6, 60.0), (7, 70.0), (8, 80.0)
    ]


def test_a_log_folder_with_a_file_from_a_clock_far_ahead_is_not_waited_for(tmp_path):
    folder = tmp_path / "tensorboard"
    folder.mkdir()
    ahead = int(time.time()) + 3600
    (folder / f"events.out.tfevents.{ahead}.elsewhere.1.0").write_bytes(b"")
    started = time.monotonic()
    RunLogger(tmp_path, purge_step=5).close()
    assert time.monotonic() - started < 30  # not the hour to that file's second
