"""End to end on sinusoid regression: the real console script, real files, read back."""

from __future__ import annotations

import math

import torch

from metarun.checkpoint import load_checkpoint
from tests.runs import (
    SINUSOID_TINY,
    check_ok,
    comparable,
    read_results,
    read_scalars,
    run_metarun,
)


def test_run_writes_every_output(tmp_path):
    proc = run_metarun(*SINUSOID_TINY, "hydra.run.dir=run", cwd=tmp_path)
    check_ok(proc)
    run_dir = tmp_path / "run"

    hydra_config = (run_dir / ".hydra" / "config.yaml").read_text()
    assert "metarun.algorithms.maml.MAML" in hydra_config

    results = read_results(run_dir)
    assert results["complete"] is True
    assert results["algo"] == "maml" and results["dataset"] == "sinusoid"
    assert results["iterations"] == 40
    assert results["meta_test"]["metric"] == "mse"
    assert results["meta_test"]["episodes"] == 600
    # Targets are A sin(x - b) with A up to 5: an MSE outside (0, 25) would be nonsense.
    assert 0 < results["meta_test"]["mean"] < 25
    assert 0 < results["meta_test"]["ci95"] < results["meta_test"]["mean"]
    assert results["best_val"]["metric"] == "mse"
    assert results["best_val"]["iteration"] in (20, 40)
    assert results["wall_time_s"] > 0

    for name in ("last.pt", "best.pt"):
        state = load_checkpoint(run_dir / "checkpoints" / name)
        assert {"algorithm", "optimizer", "train_generator", "torch_rng", "config"} <= set(state)
        assert state["iteration"] in (20, 40)
        assert all(torch.isfinite(t).all() for t in state["algorithm"].values())
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["iteration"] == 40

    scalars = read_scalars(run_dir)
    for tag in ("loss", "mse", "lr", "iters_per_sec"):
        steps = [step for step, _ in scalars[f"meta_train/{tag}"]]
        assert steps == [10, 20, 30, 40], tag
    assert [s for s, _ in scalars["meta_val/mse"]] == [20, 40]
    assert [s for s, _ in scalars["meta_test/mse"]] == [40]
    assert math.isclose(scalars["meta_test/mse"][0][1], results["meta_test"]["mean"], rel_tol=1e-6)
    assert all(math.isclose(value, 1e-3, rel_tol=1e-6) for _, value in scalars["meta_train/lr"])
    assert "meta_val/loss" in scalars and "meta_test/loss" in scalars


def test_same_seed_same_numbers_and_other_seed_differs(tmp_path):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        check_ok(run_metarun(*SINUSOID_TINY, f"seed={seed}", f"hydra.run.dir={name}", cwd=tmp_path))
    a, b, c = (comparable(read_results(tmp_path / name)) for name in "abc")
    assert a == b
    assert a["meta_test"]["mean"] != c["meta_test"]["mean"]


def test_resume_extends_a_finished_run_to_the_uninterrupted_result(tmp_path):
    check_ok(run_metarun(*SINUSOID_TINY, "hydra.run.dir=straight", cwd=tmp_path))
    half = [o for o in SINUSOID_TINY if not o.startswith("trainer.max_iters")]
    check_ok(run_metarun(*half, "trainer.max_iters=20", "hydra.run.dir=split", cwd=tmp_path))
    proc = run_metarun(f"resume={tmp_path / 'split'}", "trainer.max_iters=40", cwd=tmp_path)
    check_ok(proc)
    assert comparable(read_results(tmp_path / "split")) == comparable(
        read_results(tmp_path / "straight")
    )
    straight, split = read_scalars(tmp_path / "straight"), read_scalars(tmp_path / "split")
    for tag in ("meta_train/loss", "meta_val/mse"):
        assert split[tag] == straight[tag], tag
    # The resumed invocation kept the original config and wrote its own beside it.
    assert (tmp_path / "split" / ".hydra" / "config.yaml").exists()
    assert list((tmp_path / "split" / ".hydra").glob("resume-*/overrides.yaml"))


def test_multirun_runs_one_job_per_combination(tmp_path):
    proc = run_metarun(
        "-m", "algo=maml,fomaml", *SINUSOID_TINY, "hydra.sweep.dir=sweep", cwd=tmp_path
    )
    check_ok(proc)
    jobs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    assert "algo=fomaml" in (jobs[1] / ".hydra" / "overrides.yaml").read_text()
    algos = [read_results(job)["algo"] for job in jobs]
    assert algos == ["maml", "fomaml"]
    for job in jobs:
        assert (job / "checkpoints" / "best.pt").exists()
        assert read_scalars(job)["meta_test/mse"]


def test_default_output_folder_is_under_outputs(tmp_path):
    check_ok(run_metarun(*SINUSOID_TINY, "trainer.max_iters=2", cwd=tmp_path))
    results = list((tmp_path / "outputs").glob("*/*/results.json"))
    assert len(results) == 1
