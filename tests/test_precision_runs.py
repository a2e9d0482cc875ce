"""Whole runs in bf16/fp16: training ends near float32, checkpoints resume exactly (the loss
scaler's state included), an fp16 overflow skips a step without stopping the run, and every
process of a distributed run skips the same steps."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from metarun.build import make_trainer
from metarun.checkpoint import load_checkpoint
from metarun.cli import _register_resolvers
from metarun.config import register_configs
from metarun.trainer import RunInterrupted
from tests.runs import read_scalars
from tests.test_distributed import REPO, finished, torchrun
from tests.test_scheduler import _interrupt_after

#: bf16/fp16 sinusoid MAML ends within 10% of float32's meta-test MSE after the same 200
#: iterations (measured: within 1% for bf16, 3% for fp16, while training halves the MSE).
TRAINING_TOLERANCE = 0.10
TINY = [
    "trainer.max_iters=12",
    "trainer.val_every=4",
    "trainer.val_episodes=20",
    "trainer.test_episodes=20",
    "trainer.log_every=1",
    "trainer.ckpt_every=4",
    "trainer.progress=false",
]


def _trainer(run_dir: Path, *overrides: str):
    register_configs()
    _register_resolvers()
    with initialize_config_module(config_module="metarun.configs", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TINY, *overrides])
    return make_trainer(cfg, run_dir, {"algo": "maml", "dataset": "sinusoid"})


def _meta_test_mse(run_dir: Path, *overrides: str) -> float:
    results = _trainer(run_dir, "trainer.val_every=100", "trainer.val_episodes=100",
                       "trainer.test_episodes=200", "trainer.log_every=50", *overrides).run()
    return results["meta_test"]["mean"]


def test_low_precision_training_ends_close_to_float32(tmp_path):
    untrained = _meta_test_mse(tmp_path / "untrained", "trainer.max_iters=0")
    budget = "trainer.max_iters=200"
    fp32 = _meta_test_mse(tmp_path / "fp32", budget)
    assert fp32 < 0.75 * untrained  # it learned something in this budget
    for precision in ("bf16", "fp16"):
        low = _meta_test_mse(tmp_path / precision, budget, f"trainer.precision={precision}")
        assert low != fp32  # it really ran in another precision
        assert abs(low - fp32) <= TRAINING_TOLERANCE * fp32, (precision, low, fp32)


def _big_scale(trainer, init_scale: float, growth_interval: int = 2000) -> None:
    """A loss scaler that starts where float16 overflows, as a fresh one can."""
    trainer.precision.scaler = torch.amp.GradScaler(
        "cpu", init_scale=init_scale, growth_interval=growth_interval
    )


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_an_interrupted_low_precision_run_resumes_exactly(tmp_path, precision):
    overrides = [f"trainer.precision={precision}", "algo.task_batching=loop"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    first = _trainer(straight, *overrides)
    interrupted = _trainer(split, *overrides)
    if precision == "fp16":
        # Skips at first, then the scale grows every 2 steps and overflows again: the steps
        # taken depend on the scaler's state, which must come back from the checkpoint. (The
        # loss-scaled inner loop overflows from about 2^15 on here; skipped at 2^17, 2^16, ...)
        for trainer in (first, interrupted):
            _big_scale(trainer, 2.0**17, growth_interval=2)
    first.run()
    _interrupt_after(interrupted, 6)
    with pytest.raises(RunInterrupted):
        interrupted.run()
    resumed = _trainer(split, *overrides, f"resume={split}")
    resumed.run()

    assert read_scalars(split)["meta_train/loss"] == read_scalars(straight)["meta_train/loss"]
    ends = [load_checkpoint(run / "checkpoints" / "last.pt") for run in (straight, split)]
    assert ends[0]["iteration"] == ends[1]["iteration"] == 12
    assert ends[0]["precision"] == ends[1]["precision"]
    for name, weights in ends[0]["algorithm"].items():
        assert torch.equal(weights, ends[1]["algorithm"][name]), name
    if precision == "fp16":
        scales = read_scalars(straight)["meta_train/loss_scale"]
        assert read_scalars(split)["meta_train/loss_scale"] == scales
        assert ends[0]["precision"]["skipped_steps"] >= 2  # it did skip, before and after 6
        assert len({value for _, value in scales}) > 2  # and the scale moved both ways


@pytest.mark.parametrize("driver", ["vmap", "loop"])
def test_an_fp16_overflow_skips_the_step_and_never_stops_the_run(tmp_path, driver):
    trainer = _trainer(tmp_path, "trainer.precision=fp16", f"algo.task_batching={driver}",
                       "trainer.max_iters=2", "trainer.val_every=2",
                       "scheduler=step", "scheduler.step_size=1")
    _big_scale(trainer, 2.0**60)  # overflows in every backward for a while
    before = {name: p.detach().clone() for name, p in trainer.algorithm.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # torch's "scheduler before optimizer"
        results = trainer.run()
    assert results["complete"] and results["skipped_batches"] == 0  # not a non-finite loss
    assert trainer.precision.skipped_steps == 2
    assert trainer.precision.scaler.get_scale() == 2.0**58
    for name, p in trainer.algorithm.named_parameters():
        assert torch.equal(p, before[name]), name  # no step was taken
    assert read_scalars(tmp_path)["meta_train/fp16_skipped_steps"] == [(1, 1.0), (2, 2.0)]


def test_every_process_skips_the_same_fp16_steps(tmp_path):
    code, _, err = finished(torchrun(str(REPO / "tests" / "precision_dist_worker.py"),
                                     cwd=tmp_path))
    assert code == 0, err[-3000:]
    lines = [line for rank in (0, 1)
             for line in json.loads((tmp_path / f"rank{rank}.json").read_text())]
    steps = {step: [line for line in lines if line["step"] == step] for step in (0, 1)}
    assert [len(steps[0]), len(steps[1])] == [2, 2]
    for line in steps[0]:  # only rank 1 overflowed; both skip and halve the scale
        assert not line["stepped"] and not line["changed"] and line["scale"] == 2.0**15
    for line in steps[1]:
        assert line["stepped"] and line["changed"] and line["skipped"] == 1
    assert steps[1][0]["weights"] == steps[1][1]["weights"]
