"""`metarun-ensemble`: the super learner's fit against brute force on synthetic probabilities, the
leave-one-shot-out folds by hand, then a real two-run Omniglot sweep end to end.

Budget: the sweep is ProtoNet and MAML on the real Omniglot, 4 meta-iterations each at 8 channels
(near chance, which is all the end-to-end test needs); the ensemble draws 20 validation and 20
test tasks. No accuracy threshold: the checks are that every number is the one it should be.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from metarun.checkpoint import load_checkpoint, save_checkpoint
from metarun.data.episodes import TaskBatch
from metarun.ensemble import TEST_SEED, main
from metarun.ensemble_fit import (
    PROBABILITY_FLOOR,
    choose_per_task,
    cross_validate,
    fit_weights,
    task_log_loss,
)
from metarun.ensemble_runs import Member, fixed_tasks, leave_one_shot_out, rebuild
from tests.runs import check_ok, run_metarun

ENSEMBLE = str(Path(sys.executable).with_name("metarun-ensemble"))


def log_loss(z: np.ndarray, weights: np.ndarray) -> float:
    """The definition, written again: mean -log of the blended true-class probability."""
    blended = sum(w * runs for w, runs in zip(weights, z, strict=True))
    return float(-np.log(np.maximum(blended, PROBABILITY_FLOOR)).mean())


def simplex_grid(steps: int) -> np.ndarray:
    """Every point of the 3-run simplex with coordinates in multiples of 1 / steps."""
    points = [(i, j, steps - i - j) for i in range(steps + 1) for j in range(steps + 1 - i)]
    return np.array(points, dtype=np.float64) / steps


def random_true_class(runs: int, tasks: int, queries: int, seed: int) -> np.ndarray:
    """True-class probabilities ``[R, T, M]`` of runs whose skill varies from task to task, so
    each is best somewhere and a mixture beats every one of them."""
    rng = np.random.default_rng(seed)
    skill = rng.uniform(-0.5, 0.5, size=(runs, 1, 1)) + 1.5 * rng.normal(size=(runs, tasks, 1))
    logits = skill + rng.normal(size=(runs, tasks, queries))
    return 1 / (1 + np.exp(-logits))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weights_are_on_the_simplex_and_as_good_as_a_dense_grid(seed) -> None:
    z = random_true_class(3, 40, 15, seed)
    fit = fit_weights(z)
    assert fit.weights.min() >= 0 and fit.weights.sum() == pytest.approx(1, abs=1e-12)
    assert fit.log_loss == pytest.approx(log_loss(z, fit.weights), abs=1e-12)
    grid = simplex_grid(200)
    best_on_grid = float((-np.log(grid @ z.reshape(3, -1))).mean(1).min())
    assert fit.log_loss <= best_on_grid + 1e-12  # the grid contains the vertices: no run is better
    assert fit.log_loss >= best_on_grid - 1e-3  # the grid is fine enough to come close
    assert 0 <= fit.gap_bound <= 1e-9
    assert fit.weights.max() < 0.99 and fit.iterations > 0  # a mixture: the update was tested


def test_all_weight_goes_to_a_run_better_on_every_validation_task() -> None:
    rng = np.random.default_rng(4)
    weaker = rng.uniform(0.05, 0.9, size=(2, 30, 10))
    stronger = np.minimum(weaker.max(0) * rng.uniform(1.01, 1.1, size=(30, 10)), 1.0)
    for position in range(3):
        z = np.insert(weaker, position, stronger, axis=0)
        weights = fit_weights(z).weights
        assert weights[position] == 1.0 and weights.sum() == 1.0 and weights.min() == 0.0


def test_the_fit_does_not_depend_on_the_order_of_the_runs() -> None:
    z = random_true_class(4, 30, 10, seed=5)
    weights = fit_weights(z).weights
    assert weights.max() < 0.99  # a real mixture, not a vertex
    for order in ([3, 1, 0, 2], [1, 2, 3, 0]):
        reordered = fit_weights(z[order]).weights
        np.testing.assert_allclose(reordered, weights[order], atol=1e-8)
        cv = cross_validate(z[order], folds=5)
        assert cv.blend_log_loss == pytest.approx(cross_validate(z, 5).blend_log_loss, abs=1e-9)


def test_cv_log_loss_of_complementary_runs_beats_each_run() -> None:
    """Run A is sure and right on even tasks and nearly blind on odd ones, run B the reverse:
    any fold's fit mixes them, and the mixture loses less on every held-out task than either."""
    tasks, queries = 40, 10
    good, bad = 0.9, 0.05
    even = (np.arange(tasks) % 2 == 0)[:, None].repeat(queries, 1)
    z = np.stack([np.where(even, good, bad), np.where(even, bad, good)])
    cv = cross_validate(z, folds=5)
    single = task_log_loss(z).mean(1)
    assert single.tolist() == pytest.approx([-(np.log(good) + np.log(bad)) / 2] * 2)
    assert cv.blend_log_loss < single.min()
    assert cv.blend_log_loss == pytest.approx(-np.log((good + bad) / 2), abs=1e-6)
    for weights in cv.fold_weights:
        np.testing.assert_allclose(weights, [0.5, 0.5], atol=1e-4)


def test_leave_one_shot_out_holds_out_one_shot_of_every_class() -> None:
    tasks, ways, shots = 2, 3, 4
    ids = torch.arange(tasks * ways * shots, dtype=torch.float32)
    support_x = ids.reshape(tasks, ways * shots, 1)  # an image's value is its own id
    support_y = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    query = torch.zeros(tasks, ways, 1)
    folds = leave_one_shot_out(TaskBatch(support_x, support_y, query, support_y[:, ::shots]))
    assert folds.support_x.shape == (tasks * shots, ways * (shots - 1), 1)
    assert folds.query_x.shape == (tasks * shots, ways, 1)
    for task, held in itertools.product(range(tasks), range(shots)):
        fold = task * shots + held
        for c in range(ways):
            own = [task * ways * shots + c * shots + s for s in range(shots)]
            assert folds.query_x[fold, c, 0].item() == own[held]
            assert folds.query_y[fold, c].item() == c
            kept = folds.support_x[fold, c * (shots - 1):(c + 1) * (shots - 1), 0].tolist()
            assert kept == [own[s] for s in range(shots) if s != held]
        assert folds.support_y[fold].tolist() == [c for c in range(ways) for _ in range(shots - 1)]


def test_per_task_choice_takes_the_lowest_held_out_loss_and_falls_back_without_one() -> None:
    held_out = np.array([[0.2, np.nan, 0.5, 0.3], [0.1, np.nan, 0.7, 0.3]])
    assert choose_per_task(held_out, fallback=1).tolist() == [1, 1, 0, 0]


# ------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def sweep(tmp_path_factory, shared_data_root, omniglot_cache_dir) -> Path:
    cwd = tmp_path_factory.mktemp("ensemble")
    proc = run_metarun(
        "-m", "algo=protonet,maml", "dataset=omniglot",
        f"dataset.root={shared_data_root}", f"dataset.cache_dir={omniglot_cache_dir}",
        "dataset.download=false", "backbone.channels=8", "task.meta_batch_size=2",
        "trainer.max_iters=4", "trainer.val_every=2", "trainer.val_episodes=10",
        "trainer.test_episodes=10", "trainer.progress=false", "threads=1",
        "hydra.sweep.dir=sweep", cwd=cwd, timeout=300,
    )
    check_ok(proc)
    return cwd / "sweep"


def test_a_two_run_sweep_goes_through_the_ensemble(sweep) -> None:
    # A third run that never finished: skipped, saying so, and the other two are blended.
    shutil.copytree(sweep / "0", sweep / "2")
    (sweep / "2" / "checkpoints" / "best.pt").unlink()
    proc = subprocess.run(
        [ENSEMBLE, str(sweep), "--val-tasks", "20", "--test-tasks", "20", "--folds", "4",
         "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )
    shutil.rmtree(sweep / "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped 2 (algo=protonet): no checkpoints/best.pt" in proc.stderr
    report = json.loads((sweep / "ensemble.json").read_text())
    table = (sweep / "ensemble.md").read_text()
    assert [run["run"] for run in report["runs"]] == ["0 (algo=protonet)", "1 (algo=maml)"]
    assert report["skipped"] == [{"run": "2 (algo=protonet)", "reason": "no checkpoints/best.pt"}]
    weights = list(report["blend"]["weights"].values())
    assert min(weights) >= 0 and sum(weights) == pytest.approx(1)
    assert report["blend"]["val_log_loss"] <= min(r["val_log_loss"] for r in report["runs"])
    best = min(report["runs"], key=lambda run: run["val_log_loss"])
    assert report["best_run"]["run"] == best["run"] and report["best_run"]["test"] == best["test"]
    for learner in [report["blend"], *report["runs"]]:
        assert 0 <= learner["test"]["accuracy"] <= 1 and learner["test"]["ci95"] > 0
    for line in ("| super learner (blend) |", f"| best run: {best['run']} |",
                 "| 0 (algo=protonet) |", "| 1 (algo=maml) |"):
        assert line in table and line in proc.stdout
    # Each run's meta-test accuracy is what its own evaluate() gives on the same fixed tasks.
    for index, folder in enumerate(["0", "1"]):
        saved = load_checkpoint(sweep / folder / "checkpoints" / "best.pt")["config"]
        config = OmegaConf.create(saved)
        algorithm, samplers = rebuild(Member(sweep / folder, folder, config), "cpu", None)
        accuracy = torch.cat([
            algorithm.evaluate(batch)["accuracy"].double()
            for batch in fixed_tasks(samplers["test"], 20, TEST_SEED, batch_size=7)
        ])
        assert report["runs"][index]["test"]["accuracy"] == pytest.approx(accuracy.mean().item())


@pytest.mark.parametrize(
    ("key", "value", "reason"),
    [
        ("task.shots", 5, "have different task shapes (task.shots=1 against 5)"),
        ("dataset.split", "lake", "have different datasets (dataset.split=vinyals against lake)"),
    ],
)
def test_runs_of_other_tasks_are_refused_in_one_line(sweep, tmp_path, capsys, key, value, reason):
    pair = tmp_path / "pair"
    shutil.copytree(sweep / "0", pair / "a")
    shutil.copytree(sweep / "1", pair / "b")
    best = pair / "b" / "checkpoints" / "best.pt"
    state = load_checkpoint(best)
    config = OmegaConf.create(state["config"])
    OmegaConf.update(config, key, value)
    state["config"] = OmegaConf.to_yaml(config)
    save_checkpoint(best, {k: v for k, v in state.items() if k != "format_version"})
    with pytest.raises(SystemExit) as stop:
        main([str(pair), "--no-progress"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("metarun-ensemble: error: runs a (algo=protonet) and b (algo=maml) ")
    assert reason in err
