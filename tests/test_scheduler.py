"""Learning-rate schedules (configs/scheduler/): the rates logged, exact resume, early refusal."""

from __future__ import annotations

import math
import signal
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from metarun.build import make_trainer, run_hparams
from metarun.checkpoint import load_checkpoint, save_checkpoint
from metarun.cli import _register_resolvers
from metarun.config import register_configs
from metarun.errors import ConfigError
from metarun.resume import resumed_config
from metarun.trainer import RunInterrupted
from tests.runs import (
    SINUSOID_TINY,
    check_ok,
    poison_meta_loss,
    read_results,
    read_scalars,
    run_metarun,
)

LR = 0.01
TINY = [
    "trainer.max_iters=12",
    "trainer.val_every=4",
    "trainer.val_episodes=20",
    "trainer.test_episodes=20",
    "trainer.log_every=1",
    "trainer.ckpt_every=4",
    "trainer.progress=false",
    f"optimizer.lr={LR}",
]
STEP = ["scheduler=step", "scheduler.step_size=4", "scheduler.gamma=0.5"]


def _compose(*overrides: str):
    register_configs()
    _register_resolvers()
    with initialize_config_module(config_module="metarun.configs", version_base="1.3"):
        return compose(config_name="config", overrides=[*TINY, *overrides])


def _trainer(run_dir: Path, *overrides: str):
    scheduler = next((o.split("=")[1] for o in overrides if o.startswith("scheduler=")), "none")
    choices = {"algo": "maml", "dataset": "sinusoid", "scheduler": scheduler}
    return make_trainer(_compose(*overrides), run_dir, choices)


def _logged_lr(run_dir: Path) -> dict[int, float]:
    return dict(read_scalars(run_dir)["meta_train/lr"])


def _interrupt_after(trainer, iteration: int) -> None:
    """SIGTERM's effect during the given (1-based) iteration: the run stops once it is done."""
    real_step = trainer.algorithm.meta_train_step
    calls = {"count": 0}

    def step(batch):
        calls["count"] += 1
        if calls["count"] == iteration:
            trainer.stop_signal = signal.SIGTERM
        return real_step(batch)

    trainer.algorithm.meta_train_step = step


def _straight_then_interrupted(make, tmp_path, *overrides: str):
    """``make(folder, *overrides)`` run straight through in ``straight/``, and again in ``split/``
    stopped during iteration 6 (between checkpoints, inside a schedule step) as SIGTERM stops
    it; returns the two folders, for the caller to resume ``split/`` and compare."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    make(straight, *overrides).run()
    interrupted = make(split, *overrides)
    _interrupt_after(interrupted, 6)
    with pytest.raises(RunInterrupted):
        interrupted.run()
    return straight, split


def test_step_halves_the_logged_lr_every_step_size_iterations(tmp_path):
    _trainer(tmp_path, *STEP).run()
    logged = _logged_lr(tmp_path)
    assert sorted(logged) == list(range(1, 13))
    # Logged after each iteration's step: iterations 1-4 update at LR, 5-8 at LR/2, ...
    for step, lr in logged.items():
        assert lr == pytest.approx(LR * 0.5 ** (step // 4), rel=1e-6), step
    assert logged[3] == pytest.approx(LR) and logged[4] == pytest.approx(LR / 2)


def test_without_a_schedule_the_lr_stays(tmp_path):
    trainer = _trainer(tmp_path)
    assert trainer.scheduler is None
    trainer.run()
    logged = _logged_lr(tmp_path)
    assert len(logged) == 12 and all(lr == pytest.approx(LR) for lr in logged.values())


def test_cosine_anneals_to_eta_min_at_max_iters(tmp_path):
    eta_min = 1e-4
    trainer = _trainer(tmp_path, "scheduler=cosine", f"scheduler.eta_min={eta_min}")
    assert trainer.scheduler.T_max == 12  # ${trainer.max_iters}
    trainer.run()
    logged = _logged_lr(tmp_path)
    assert logged[12] == pytest.approx(eta_min, rel=1e-6)
    for step, lr in logged.items():
        expected = eta_min + (LR - eta_min) * (1 + math.cos(math.pi * step / 12)) / 2
        assert lr == pytest.approx(expected, rel=1e-5), step


def test_a_skipped_batch_still_counts_as_an_iteration_of_the_schedule(tmp_path):
    trainer = _trainer(tmp_path, *STEP, "trainer.skip_non_finite=true")
    poison_meta_loss(trainer, {1, 6})  # the first one before any optimizer step
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # torch's "step() before optimizer.step()"
        results = trainer.run()
    assert results["skipped_batches"] == 2
    for step, lr in _logged_lr(tmp_path).items():
        assert lr == pytest.approx(LR * 0.5 ** (step // 4), rel=1e-6), step


@pytest.mark.parametrize("schedule", [STEP, ["scheduler=cosine"]], ids=["step", "cosine"])
def test_interrupted_and_resumed_run_matches_the_uninterrupted_one(tmp_path, schedule):
    straight, split = _straight_then_interrupted(_trainer, tmp_path, *schedule)
    assert load_checkpoint(split / "checkpoints" / "last.pt")["iteration"] == 6
    _trainer(split, *schedule, f"resume={split}").run()

    assert _logged_lr(split) == _logged_lr(straight)
    assert read_scalars(split)["meta_train/loss"] == read_scalars(straight)["meta_train/loss"]
    ends = [load_checkpoint(run / "checkpoints" / "last.pt") for run in (straight, split)]
    assert ends[0]["iteration"] == ends[1]["iteration"] == 12
    assert ends[0]["scheduler"] == ends[1]["scheduler"]
    for name, weights in ends[0]["algorithm"].items():
        assert torch.equal(weights, ends[1]["algorithm"][name]), name


def test_a_checkpoint_from_before_schedules_still_resumes(tmp_path):
    straight, split = _straight_then_interrupted(_trainer, tmp_path)
    # What an older metarun wrote: no "scheduler" in the state nor in the saved config.
    last = split / "checkpoints" / "last.pt"
    state = load_checkpoint(last)
    state.pop("format_version")
    del state["scheduler"]
    config = OmegaConf.create(state["config"])
    del config["scheduler"]
    state["config"] = OmegaConf.to_yaml(config)
    save_checkpoint(last, state)

    _trainer(split, f"resume={split}").run()
    assert _logged_lr(split) == _logged_lr(straight)
    ends = [load_checkpoint(run / "checkpoints" / "last.pt") for run in (straight, split)]
    for name, weights in ends[0]["algorithm"].items():
        assert torch.equal(weights, ends[1]["algorithm"][name]), name


@pytest.mark.parametrize(
    ("command", "picked", "refused"),
    [
        (["scheduler=cosine"], "cosine", "scheduler"),
        ([*STEP, "scheduler.gamma=0.25"], "step", "scheduler.gamma"),
    ],
)
def test_the_schedule_cannot_change_on_resume(command, picked, refused):
    saved = OmegaConf.to_yaml(_compose(*STEP), resolve=True)
    with pytest.raises(ConfigError, match=f"cannot change {refused} when resuming"):
        resumed_config(
            saved,
            _compose(*command),
            saved_choices={"scheduler": "step"},
            overrides=command,
            current_choices={"scheduler": picked},
        )


def test_the_schedule_is_named_in_the_hparams_and_results(tmp_path):
    hparams = run_hparams(_compose(*STEP), {"algo": "maml", "scheduler": "step"})
    assert hparams["scheduler"] == "step" and hparams["scheduler.step_size"] == 4
    assert "scheduler._target_" not in hparams

    proc = run_metarun(
        *SINUSOID_TINY,
        "scheduler=step",
        "scheduler.step_size=15",
        "hydra.run.dir=run",
        cwd=tmp_path,
    )
    check_ok(proc)
    assert read_results(tmp_path / "run")["scheduler"] == "step"
    lrs = _logged_lr(tmp_path / "run")
    assert lrs[10] == pytest.approx(1e-3) and lrs[20] == pytest.approx(5e-4)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["scheduler=step", "scheduler.step_size=0"], "scheduler.step_size must be an integer"),
        (["scheduler=step", "scheduler.gamma=-1"], "scheduler.gamma must be a positive number"),
        (["scheduler=cosine", "scheduler.eta_min=-1"], "scheduler.eta_min must be a number >= 0"),
        (["scheduler=cosine", "scheduler.T_max=0"], "scheduler.T_max must be an integer >= 1"),
    ],
)
def test_a_bad_schedule_is_one_line_before_any_data_loads(tmp_path, overrides, expected):
    # Omniglot from a folder that does not exist, downloads off: loading data would fail first.
    no_data = tmp_path / "no-data"
    proc = run_metarun(
        "dataset=omniglot",
        f"dataset.root={no_data}",
        "dataset.download=false",
        *overrides,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(proc.stderr.splitlines()) == 1, proc.stderr
    assert proc.stderr.startswith(f"metarun: error: {expected}"), proc.stderr
    assert not no_data.exists()


@pytest.mark.parametrize("ways", [5, 20])
def test_protonet_experiments_halve_the_lr_every_2000_episodes(ways):
    # Snell et al. 2017, sec. 3.1; one episode per update, so 2000 meta-iterations.
    cfg = _compose(f"experiment=protonet_omniglot_{ways}w1s")
    assert cfg.task.meta_batch_size == 1
    assert cfg.scheduler._target_ == "torch.optim.lr_scheduler.StepLR"
    assert cfg.scheduler.step_size == 2000 and cfg.scheduler.gamma == 0.5
    # The pair without the experiment keeps a constant rate: a specialize file picks no group.
    assert not _compose("algo=protonet", "dataset=omniglot").scheduler
