"""Optuna searches (configs/hparams_search/): real sweeps with tiny budgets, read back from disk.

The objective is each trial's best meta-validation value, so the study's best must be the best
of the trials' ``results.json`` ``best_val`` values, with that trial's overrides as parameters.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import sqlalchemy
import yaml
from hydra import compose, initialize_config_module
from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import IntUniformDistribution, LogUniformDistribution

from metarun.config import register_configs
from metarun.sweep import objective as sweep_objective
from tests.runs import SINUSOID_TINY, check_ok, read_results, run_metarun

SEARCHED = {"algo.inner_lr", "optimizer.lr", "algo.inner_steps"}


def _compose(*overrides: str) -> DictConfig:
    register_configs()
    with initialize_config_module(config_module="metarun.configs", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def _trials(sweep_dir: Path) -> list[tuple[dict, dict[str, float]]]:
    """Each job's results.json and the searched values its overrides.yaml says it ran with."""
    found = []
    job_dirs = [path for path in sweep_dir.iterdir() if path.name.isdigit()]
    for job_dir in sorted(job_dirs, key=lambda path: int(path.name)):
        overrides = yaml.safe_load((job_dir / ".hydra" / "overrides.yaml").read_text())
        searched = {
            key: float(value)
            for key, value in (item.split("=", 1) for item in overrides)
            if key in SEARCHED
        }
        results = read_results(job_dir) if (job_dir / "results.json").exists() else {}
        found.append((results, searched))
    return found


def test_the_objective_is_the_best_meta_validation_value() -> None:
    results = {
        "best_val": {"metric": "mse", "value": 0.25, "iteration": 40},
        "meta_test": {"metric": "mse", "mean": 0.5},
    }
    assert sweep_objective(results) == 0.25


@pytest.mark.parametrize("value", [None, math.nan, math.inf])
def test_no_finite_validation_value_gives_none_not_nan(value: float | None) -> None:
    # optuna 2.10 raises inside hydra-optuna-sweeper 1.3 on NaN and ends the study; None is a
    # failed trial and the search goes on.
    results = {"best_val": {"metric": "accuracy", "value": value, "iteration": None}}
    assert sweep_objective(results) is None


def test_maml_omniglot_search_composes_with_its_search_space() -> None:
    cfg = _compose("hparams_search=maml_omniglot", "dataset=omniglot")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_ == "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler"
    assert sweeper.sampler.seed == 0
    assert sweeper.direction == "maximize"
    assert sweeper.storage is None
    assert sweeper.study_name == "maml_omniglot"
    assert sweeper.n_trials == 20
    # The plugin's own parser turns the yaml's params into Optuna distributions.
    params = [f"{key}={value}" for key, value in sweeper.params.items()]
    space, fixed = create_params_from_overrides(params)
    assert fixed == {}
    assert space == {
        "algo.inner_lr": LogUniformDistribution(0.01, 1.0),
        "optimizer.lr": LogUniformDistribution(1e-4, 1e-2),
        "algo.inner_steps": IntUniformDistribution(1, 5),
    }
    # The run itself is still MAML on Omniglot with the pair's paper values as its starting point.
    assert cfg.hydra.runtime.choices.algo == "maml"
    assert cfg.dataset._target_ == "metarun.data.omniglot.Omniglot"
    assert cfg.algo.inner_lr == 0.4 and cfg.algo.test_inner_steps is None


def test_the_search_overrides_an_experiment_and_keeps_its_task() -> None:
    cfg = _compose("experiment=maml_omniglot_20w1s", "hparams_search=maml_omniglot")
    assert cfg.hydra.sweeper.direction == "maximize"
    assert cfg.task.ways == 20 and cfg.algo.inner_lr == 0.1 and cfg.task.meta_batch_size == 16
    assert cfg.algo.test_inner_steps is None  # the search's, not the experiment's 5


def test_a_three_trial_search_names_the_best_trial(tmp_path: Path) -> None:
    proc = run_metarun(
        "-m",
        "hparams_search=maml_sinusoid",
        *SINUSOID_TINY,
        "hydra.sweeper.n_trials=3",
        # Two random trials, then one from TPE: optuna 2.10's TPE code runs on this numpy.
        "hydra.sweeper.sampler.n_startup_trials=2",
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )
    check_ok(proc)
    sweep_dir = tmp_path / "sweep"
    summary = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    trials = _trials(sweep_dir)
    assert len(trials) == 3
    assert set(summary["best_params"]) == SEARCHED
    values = [results["best_val"]["value"] for results, _ in trials]
    assert all(results["best_val"]["metric"] == "mse" for results, _ in trials)
    assert all(math.isfinite(value) for value in values)
    # mse: the study minimised the meta-validation values (not the meta-test ones).
    best = min(range(3), key=lambda i: values[i])
    assert summary["best_value"] == pytest.approx(values[best], rel=1e-12)
    assert summary["best_value"] != trials[best][0]["meta_test"]["mean"]
    assert {key: float(value) for key, value in summary["best_params"].items()} == trials[best][1]
    # Every trial drew from the configured space, and the run used what the trial drew.
    for job, (_, searched) in enumerate(trials):
        assert 1e-3 <= searched["algo.inner_lr"] <= 0.1
        assert 1e-4 <= searched["optimizer.lr"] <= 1e-2
        assert searched["algo.inner_steps"] in {1, 2, 3, 4, 5}
        ran = OmegaConf.load(sweep_dir / str(job) / ".hydra" / "config.yaml")
        assert ran.algo.inner_lr == searched["algo.inner_lr"]
        assert ran.algo.inner_steps == searched["algo.inner_steps"]
        assert ran.optimizer.lr == searched["optimizer.lr"]
        assert ran.algo.test_inner_steps is None


def test_a_diverged_trial_fails_and_the_search_goes_on(tmp_path: Path) -> None:
    # An outer learning rate of 1e6 makes the loss infinite within a few iterations: metarun
    # refuses to go on (a one-line error), the trial is recorded as failed, the others run.
    proc = run_metarun(
        "-m",
        "hparams_search=maml_sinusoid",
        *SINUSOID_TINY,
        "optimizer.lr=choice(1e-3,1e6)",
        "hydra.sweeper.n_trials=3",
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )
    sweep_dir = tmp_path / "sweep"
    assert proc.returncode == 1, proc.stderr[-3000:]  # the sweep summary reports a failed job
    trials = _trials(sweep_dir)
    assert len(trials) == 3
    tried = {searched["optimizer.lr"] for _, searched in trials}
    assert tried == {1e-3, 1e6}, "the seeded sampler should try both values"
    failed = [p for p in sweep_dir.iterdir() if (p / "error.json").exists()]
    assert failed and all(
        json.loads((p / "error.json").read_text())["error"] == "NumericalError" for p in failed
    )
    summary = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert summary["best_params"]["optimizer.lr"] == 1e-3


def test_a_search_in_the_wrong_direction_is_refused_before_any_trial(tmp_path: Path) -> None:
    proc = run_metarun(
        "-m",
        "hparams_search=maml_omniglot",  # maximises accuracy; the default dataset is sinusoid
        *SINUSOID_TINY,
        "hydra.sweeper.n_trials=3",
        "hydra.sweep.dir=sweep",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert (
        "metarun: error: hydra.sweeper.direction=maximize, but the objective is Sinusoid's "
        "meta-validation mse: use hydra.sweeper.direction=minimize" in proc.stderr
    )
    assert not (tmp_path / "sweep" / "0").exists()


def test_a_sqlite_study_is_kept_and_continued(tmp_path: Path) -> None:
    # optuna 2.x cannot open its storage under SQLAlchemy 2: metarun[optuna] pins SQLAlchemy<2.
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    common = [*SINUSOID_TINY, "hydra.sweeper.n_trials=1", f"hydra.sweeper.storage={storage}"]
    for sweep in ("first", "second"):
        proc = run_metarun(
            "-m", "hparams_search=maml_sinusoid", *common, f"hydra.sweep.dir={sweep}", cwd=tmp_path
        )
        assert proc.returncode == 0, (
            f"SQLAlchemy {sqlalchemy.__version__} installed (metarun[optuna] needs <2):\n"
            + proc.stderr[-3000:]
        )
    import optuna

    study = optuna.load_study(study_name="maml_sinusoid", storage=storage)
    assert [trial.state.name for trial in study.trials] == ["COMPLETE", "COMPLETE"]
    values = [trial.value for trial in study.trials]
    runs = [
        read_results(tmp_path / sweep / "0")["best_val"]["value"] for sweep in ("first", "second")
    ]
    assert sorted(values) == pytest.approx(sorted(runs), rel=1e-12)
    # The second sweep's summary covers both sweeps' trials.
    summary = yaml.safe_load((tmp_path / "second" / "optimization_results.yaml").read_text())
    assert summary["best_value"] == pytest.approx(min(runs), rel=1e-12)
