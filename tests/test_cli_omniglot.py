"""End to end on the real Omniglot (``../shared/data`` or ``$METARUN_DATA``), tiny budgets."""

from __future__ import annotations

import math

from metarun.checkpoint import load_checkpoint
from tests.runs import check_ok, read_results, read_scalars, run_metarun


def test_maml_on_real_omniglot_writes_every_output(tmp_path, shared_data_root, omniglot_cache_dir):
    proc = run_metarun(
        "algo=maml",
        "dataset=omniglot",
        f"dataset.root={shared_data_root}",
        f"dataset.cache_dir={omniglot_cache_dir}",
        "dataset.download=false",
        "task.meta_batch_size=4",
        "backbone.channels=16",
        "trainer.max_iters=10",
        "trainer.val_every=5",
        "trainer.val_episodes=40",
        "trainer.test_episodes=200",
        "trainer.log_every=5",
        "trainer.eval_batch_size=100",
        "trainer.progress=false",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    check_ok(proc)
    run_dir = tmp_path / "run"
    results = read_results(run_dir)
    assert results["dataset"] == "omniglot" and results["backbone"] == "conv4"
    assert results["task"] == {"ways": 5, "shots": 1, "queries": 15, "meta_batch_size": 4}
    test = results["meta_test"]
    assert test["metric"] == "accuracy" and test["episodes"] == 200
    # 5-way: chance is 20%; accuracy is a fraction and its CI over 200 tasks is a few points.
    assert 0.2 < test["mean"] <= 1.0
    assert 0 < test["ci95"] < 0.1
    assert results["best_val"]["iteration"] in (5, 10)

    scalars = read_scalars(run_dir)
    for tag in ("meta_train/loss", "meta_train/accuracy", "meta_train/lr"):
        assert [step for step, _ in scalars[tag]] == [5, 10], tag
    assert [step for step, _ in scalars["meta_val/accuracy"]] == [5, 10]
    assert all(0 <= value <= 1 for _, value in scalars["meta_val/accuracy"])
    assert math.isclose(scalars["meta_test/accuracy"][0][1], test["mean"], rel_tol=1e-6)
    assert scalars["meta_test/loss"][0][1] > 0

    state = load_checkpoint(run_dir / "checkpoints" / "best.pt")
    assert "dataset" in state["config"] and "inner_lr: 0.4" in state["config"]
