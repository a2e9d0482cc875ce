"""Every algorithm is one `algo=` away: a sweep over all of them runs every job to completion."""

from __future__ import annotations

from tests.runs import check_ok, read_results, run_metarun

ALGORITHMS = [
    "maml",
    "fomaml",
    "reptile",
    "metasgd",
    "anil",
    "protonet",
    "matchingnet",
    "relationnet",
    "baseline",
    "baselinepp",
    "hypernet",
    "metalstm",
    "mann",
    "snail",
]


def test_sweep_over_every_algorithm_completes(tmp_path, shared_data_root, omniglot_cache_dir):
    proc = run_metarun(
        "-m",
        f"algo={','.join(ALGORITHMS)}",
        "dataset=omniglot",
        f"dataset.root={shared_data_root}",
        f"dataset.cache_dir={omniglot_cache_dir}",
        "dataset.download=false",
        "backbone.channels=8",
        "task.meta_batch_size=2",
        "trainer.max_iters=2",
        "trainer.val_every=2",
        "trainer.val_episodes=10",
        "trainer.test_episodes=10",
        "trainer.progress=false",
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
        timeout=600,
    )
    check_ok(proc)
    assert f"{len(ALGORITHMS)} of {len(ALGORITHMS)} jobs finished" in proc.stdout
    for job, algo in enumerate(ALGORITHMS):
        results = read_results(tmp_path / "sweep" / str(job))
        assert results["algo"] == algo and results["complete"] is True
        assert results["iterations"] == 2 and results["meta_test"]["episodes"] == 10
        assert 0.0 <= results["meta_test"]["mean"] <= 1.0
