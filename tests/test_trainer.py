"""The trainer in-process: non-finite losses, best-checkpoint choice, what results.json holds."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_module

from metarun.build import make_trainer
from metarun.checkpoint import load_checkpoint
from metarun.cli import _register_resolvers
from metarun.config import register_configs
from metarun.trainer import NumericalError

TINY = [
    "trainer.max_iters=12",
    "trainer.val_every=4",
    "trainer.val_episodes=20",
    "trainer.test_episodes=20",
    "trainer.log_every=2",
    "trainer.ckpt_every=4",
    "trainer.progress=false",
]


def _trainer(tmp_path, *overrides: str):
    register_configs()
    _register_resolvers()
    with initialize_config_module(config_module="metarun.configs", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TINY, *overrides])
    return make_trainer(cfg, tmp_path, {"algo": "maml", "dataset": "sinusoid"})


def _poison(trainer, at_iterations: set[int]) -> None:
    """Make the meta-loss NaN at the given (1-based) iterations, as a diverging run would."""
    real_step = trainer.algorithm.meta_train_step
    calls = {"count": 0}

    def step(batch):
        calls["count"] += 1
        loss, metrics = real_step(batch)
        if calls["count"] in at_iterations:
            return loss * float("nan"), {name: float("nan") for name in metrics}
        return loss, metrics

    trainer.algorithm.meta_train_step = step


def test_nan_loss_stops_the_run_naming_the_iteration(tmp_path):
    trainer = _trainer(tmp_path)
    _poison(trainer, {6})
    with pytest.raises(NumericalError, match="became nan at iteration 6.*last.pt is the last good"):
        trainer.run()
    # The last good checkpoint is intact and untouched by the bad step.
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["iteration"] == 4


def test_nan_batches_can_be_skipped_and_counted(tmp_path):
    trainer = _trainer(tmp_path, "trainer.skip_non_finite=true")
    _poison(trainer, {3, 7})
    before = {name: p.detach().clone() for name, p in trainer.algorithm.named_parameters()}
    results = trainer.run()
    assert results["complete"] and results["skipped_batches"] == 2 and results["iterations"] == 12
    assert math.isfinite(results["meta_test"]["mean"])
    after = dict(trainer.algorithm.named_parameters())
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert all(torch.isfinite(p).all() for p in after.values())
    written = json.loads((tmp_path / "results.json").read_text())
    assert written["skipped_batches"] == 2


def test_meta_test_uses_the_best_validation_checkpoint(tmp_path):
    trainer = _trainer(tmp_path)
    results = trainer.run()
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")
    assert results["best_val"]["iteration"] == best["iteration"]
    assert results["best_val"]["value"] == best["best_value"]
    # The weights scored at meta-test are best.pt's, whatever the last iteration left.
    for name, tensor in trainer.algorithm.state_dict().items():
        assert torch.equal(tensor, best["algorithm"][name]), name
