"""Baseline and Baseline++ learn on the real Omniglot through the real CLI, at CI size.

Budget (per algorithm): conv4 with 16 channels, 400 pre-training iterations of 64 images
(Adam, lr 1e-2) on the lake split's 25 meta-train alphabets, meta-val on 100 tasks at iterations
200 and 400, meta-test 5-way 1-shot on 200 tasks of the 20 evaluation alphabets. The two runs
go in parallel, one thread each (about 15 s of CPU each), then a 2-iteration MAML + ResNet-12
run (about 5 s). With the session's Omniglot decode (about 8 s of CPU on 2 workers) the file
needs about 25-30 s on an idle 2-core machine (estimated from CPU time; 61 s measured on a
machine shared with a training run, load average 7).

Threshold: meta-test accuracy > 65%. Chance is 20%, and the same body untrained (a fitted head
on random conv features) scores about 40%, so a run must have learned from pre-training to pass.
Seen with seeds 0-2: Baseline 79-83%, Baseline++ 76-80%. A sabotaged algorithm fails it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from metarun.checkpoint import load_checkpoint
from metarun.data.omniglot import Omniglot
from tests.runs import check_ok, read_results, read_scalars, run_metarun

ALGORITHMS = ("baseline", "baselinepp")
THRESHOLD = 0.65
BUDGET = (
    "dataset=omniglot",
    "dataset.split=lake",
    "backbone.channels=16",
    "optimizer.lr=1e-2",
    "trainer.max_iters=400",
    "trainer.val_every=200",
    "trainer.val_episodes=100",
    "trainer.test_episodes=200",
    "trainer.log_every=100",
    "trainer.eval_batch_size=100",
    "trainer.progress=false",
)
#: Two single-threaded runs side by side use both cores without oversubscribing them.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def data_overrides(root: Path, cache_dir: Path) -> list[str]:
    return [f"dataset.root={root}", f"dataset.cache_dir={cache_dir}", "dataset.download=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, shared_data_root, omniglot_cache_dir):
    cwd = tmp_path_factory.mktemp("baseline-learning")
    data = data_overrides(shared_data_root, omniglot_cache_dir)

    def run(algo: str) -> CompletedProcess[str]:
        return run_metarun(f"algo={algo}", *data, *BUDGET, f"hydra.run.dir={algo}", cwd=cwd,
                           env=ONE_THREAD, timeout=600)

    with ThreadPoolExecutor(len(ALGORITHMS)) as pool:
        procs = dict(zip(ALGORITHMS, pool.map(run, ALGORITHMS), strict=True))
    return {algo: (procs[algo], cwd / algo) for algo in ALGORITHMS}


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_pretrain_then_adapt_beats_chance_on_omniglot_5_way_1_shot(
    runs, algo, shared_data_root, omniglot_cache_dir
):
    proc, run_dir = runs[algo]
    check_ok(proc)
    results = read_results(run_dir)
    assert results["algo"] == algo and results["complete"]
    test = results["meta_test"]
    assert test["metric"] == "accuracy" and test["episodes"] == 200
    assert test["mean"] > THRESHOLD, f"{algo}: meta-test accuracy {test['mean']:.3f}"
    best = results["best_val"]
    assert best["iteration"] in (200, 400) and best["value"] > THRESHOLD

    # Pre-training ran through the trainer on mini-batches: its loss fell and was logged.
    scalars = read_scalars(run_dir)
    losses = [value for _, value in scalars["meta_train/loss"]]
    assert [step for step, _ in scalars["meta_train/loss"]] == [100, 200, 300, 400]
    assert losses[-1] < losses[0] - 1.0
    assert all(0 <= value <= 1 for _, value in scalars["meta_train/accuracy"])

    # The checkpoint holds the pre-training classifier over all meta-train classes.
    lake = Omniglot(root=str(shared_data_root), split="lake", cache_dir=str(omniglot_cache_dir),
                    download=False)
    weights = load_checkpoint(run_dir / "checkpoints" / "best.pt")["algorithm"]
    assert weights["classifier.weight"].shape == (lake.num_classes("train"), 16)


def test_tiny_maml_with_resnet12_completes(tmp_path, shared_data_root, omniglot_cache_dir):
    proc = run_metarun(
        "algo=maml",
        "backbone=resnet12",
        "backbone.channels=[8,8,16,16]",
        *data_overrides(shared_data_root, omniglot_cache_dir),
        "dataset=omniglot",
        "task.meta_batch_size=2",
        "trainer.max_iters=2",
        "trainer.val_every=2",
        "trainer.val_episodes=4",
        "trainer.test_episodes=10",
        "trainer.log_every=1",
        "trainer.eval_batch_size=5",
        "trainer.progress=false",
        "hydra.run.dir=run",
        cwd=tmp_path,
        env=ONE_THREAD,
    )
    check_ok(proc)
    results = read_results(tmp_path / "run")
    assert results["backbone"] == "resnet12" and results["complete"]
    assert results["meta_test"]["episodes"] == 10
    assert 0 <= results["meta_test"]["mean"] <= 1
    weights = load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")["algorithm"]
    assert weights["model.features.3.body.0.weight"].shape == (16, 16, 3, 3)
