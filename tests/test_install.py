"""A non-editable install carries its configs: `metarun` works from any folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_non_editable_install_runs_from_another_folder(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [
            sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
            "--no-build-isolation", "--target", str(target), str(REPO_ROOT),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (target / "metarun" / "configs" / "config.yaml").is_file()
    assert (target / "metarun" / "configs" / "algo" / "maml.yaml").is_file()
    for source in ("cpu_kernels.c", "cpu_kernels_body.h"):  # built on first use
        assert (target / "metarun" / "execution" / "kernels" / source).is_file()
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = "import metarun, sys; from metarun.cli import main; print(metarun.__file__); main()"
    proc = subprocess.run(
        [
            sys.executable, "-c", code,
            "trainer.max_iters=2", "trainer.val_episodes=10", "trainer.test_episodes=10",
            "trainer.progress=false", "hydra.run.dir=run",
        ],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(str(target))  # the installed copy ran, not the source tree
    assert (workdir / "run" / "results.json").is_file()
