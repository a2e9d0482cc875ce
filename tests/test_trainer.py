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
from tests.runs import poison_meta_loss, read_scalars
from tests.test_scheduler import _straight_then_interrupted

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


def test_nan_loss_stops_the_run_naming_the_iteration(tmp_path):
    trainer = _trainer(tmp_path)
    poison_meta_loss(trainer, {6})
    with pytest.raises(NumericalError, match="became nan at iteration 6.*last.pt is the last good"):
        trainer.run()
    # The last good checkpoint is intact and untouched by the bad step.
    assert load_checkpoint(tmp_path / "checkpoints" / "last.pt")["iteration"] == 4


def test_nan_batches_can_be_skipped_and_counted(tmp_path):
    trainer = _trainer(tmp_path, "trainer.skip_non_finite=true")
    poison_meta_loss(trainer, {3, 7})
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


def _metalstm(run_dir, *overrides: str):
    """Meta-LSTM on sinusoids, whose meta-gradient norm (about 1 at the start) a bound of 0.01
    clips at every step; plain SGD, so a step's length is the clipped gradient's times lr."""
    register_configs()
    _register_resolvers()
    with initialize_config_module(config_module="metarun.configs", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            *TINY, "algo=metalstm", "dataset=sinusoid", "algo.inner_steps=2",
            "algo.meta_grad_clip=0.01", "optimizer=sgd", "optimizer.momentum=0",
            "optimizer.lr=0.5", *overrides])
    return make_trainer(cfg, run_dir, {"algo": "metalstm", "dataset": "sinusoid"})


def _step_length(trainer) -> float:
    """The length of the trainer's first optimizer step, over all the meta-parameters."""
    before = [p.detach().clone() for p in trainer.algorithm.parameters()]
    trainer.run()
    return torch.cat([(p.detach() - b).reshape(-1) for p, b in
                      zip(trainer.algorithm.parameters(), before, strict=True)]).norm().item()


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_the_trainer_clips_the_meta_gradient_an_algorithm_bounds(tmp_path, precision):
    # One step, validated right after it (so meta-test loads the stepped weights as best.pt).
    trainer = _metalstm(tmp_path, "trainer.max_iters=1", "trainer.val_every=1",
                        f"trainer.precision={precision}")
    if precision == "fp16":
        # A scale the learner's loss-scaled inner gradient does not overflow at (the default
        # 65536 does, on sinusoids: that step would be skipped, as the scaler skips any).
        trainer.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    length = _step_length(trainer)
    # fp16: clipped after the loss scale (256) is divided out, or the step would be 256 times
    # shorter.
    assert length == pytest.approx(0.5 * 0.01, rel=1e-3)
    norms = read_scalars(tmp_path)["meta_train/meta_grad_norm"]
    assert len(norms) == 1 and norms[0][1] > 0.1  # the bound did clip


def test_an_overflowing_fp16_step_of_a_clipping_algorithm_is_still_skipped(tmp_path):
    trainer = _metalstm(tmp_path, "trainer.max_iters=2", "trainer.val_every=2",
                        "trainer.precision=fp16")
    trainer.precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**60)
    assert _step_length(trainer) == 0.0
    assert trainer.precision.skipped_steps == 2
    scalars = read_scalars(tmp_path)
    assert "meta_train/meta_grad_norm" not in scalars  # no norm of an inf gradient is logged
    assert scalars["meta_train/fp16_skipped_steps"][-1] == (2, 2.0)


def test_a_clipped_run_resumes_exactly(tmp_path):
    straight, split = _straight_then_interrupted(_metalstm, tmp_path)
    _metalstm(split, f"resume={split}").run()
    for name in ("meta_train/loss", "meta_train/meta_grad_norm"):
        assert read_scalars(split)[name] == read_scalars(straight)[name], name
    ends = [load_checkpoint(run / "checkpoints" / "last.pt") for run in (straight, split)]
    assert ends[0]["iteration"] == ends[1]["iteration"] == 12
    for name, weights in ends[0]["algorithm"].items():
        assert torch.equal(weights, ends[1]["algorithm"][name]), name
