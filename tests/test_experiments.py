"""Named benchmark settings (configs/experiment/): each composes, sets only keys that exist, holds
the paper's values its comments cite, and one of them runs end to end."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf

import metarun.configs
from metarun.config import register_configs
from tests.runs import SINUSOID_TINY, check_ok, read_results, run_metarun

EXPERIMENT_DIR = Path(metarun.configs.__file__).parent / "experiment"
EXPERIMENTS = sorted(path.stem for path in EXPERIMENT_DIR.glob("*.yaml"))
#: <algo>_<dataset>_<N>w<K>s or <algo>_<dataset>_k<K>: what the name promises.
NAME = re.compile(
    r"(?P<algo>[a-z]+)_(?P<dataset>[a-z][a-z0-9]*)_(?:(?P<ways>\d+)w(?P<shots>\d+)s|k(?P<k>\d+))"
)
GROUPS = ("dataset", "algo", "backbone", "optimizer", "scheduler")

#: The values each experiment's comments attribute to its paper (or the authors' code).
PAPER_VALUES: dict[str, dict[str, Any]] = {
    "maml_sinusoid_k10": {  # Finn et al. 2017, sec. 5.1; cbfinn/maml
        "backbone.hidden": [40, 40], "task.shots": 10, "task.queries": 10,
        "task.meta_batch_size": 25, "algo.inner_lr": 0.01, "algo.inner_steps": 1,
        "optimizer._target_": "torch.optim.Adam", "optimizer.lr": 1e-3,
        "trainer.max_iters": 70000,
    },
    "maml_omniglot_5w1s": {  # Finn et al. 2017, appendix A.1
        "task.ways": 5, "task.shots": 1, "task.meta_batch_size": 32, "algo.inner_lr": 0.4,
        "algo.inner_steps": 1, "algo.test_inner_steps": 3, "algo.first_order": False,
        "optimizer.lr": 1e-3, "trainer.max_iters": 60000,
    },
    "maml_omniglot_5w5s": {
        "task.ways": 5, "task.shots": 5, "task.meta_batch_size": 32, "algo.inner_lr": 0.4,
        "algo.inner_steps": 1, "algo.test_inner_steps": 3, "trainer.max_iters": 60000,
    },
    "maml_omniglot_20w1s": {
        "task.ways": 20, "task.shots": 1, "task.meta_batch_size": 16, "algo.inner_lr": 0.1,
        "algo.inner_steps": 5, "algo.test_inner_steps": 5, "trainer.max_iters": 60000,
    },
    "maml_omniglot_20w5s": {
        "task.ways": 20, "task.shots": 5, "task.meta_batch_size": 16, "algo.inner_lr": 0.1,
        "algo.inner_steps": 5, "algo.test_inner_steps": 5, "trainer.max_iters": 60000,
    },
    "fomaml_omniglot_5w1s": {
        "algo.first_order": True, "task.meta_batch_size": 32, "algo.inner_lr": 0.4,
        "algo.inner_steps": 1, "algo.test_inner_steps": 3,
    },
    "protonet_omniglot_5w1s": {  # Snell et al. 2017, sec. 3.1
        "task.ways": 5, "algo.train_ways": 60, "algo.train_shots": None,
        "algo.train_queries": 5, "task.meta_batch_size": 1, "optimizer.lr": 1e-3,
        "scheduler.step_size": 2000, "scheduler.gamma": 0.5,  # halved every 2000 episodes
    },
    "protonet_omniglot_20w1s": {
        "task.ways": 20, "algo.train_ways": 60, "algo.train_shots": None,
        "algo.train_queries": 5, "task.meta_batch_size": 1,
        "scheduler.step_size": 2000, "scheduler.gamma": 0.5,
    },
    "matchingnet_omniglot_5w1s": {"algo.fce": False, "algo.train_ways": None},
    "relationnet_omniglot_5w1s": {  # Sung et al. 2018, sec. 4.1; LearningToCompare_FSL
        "algo.train_queries": 19, "task.meta_batch_size": 1, "algo.relation_hidden": 8,
        "optimizer.lr": 1e-3, "trainer.max_iters": 1_000_000, "trainer.test_episodes": 1000,
    },
    "reptile_omniglot_5w1s": {  # Nichol et al. 2018, appendix (Omniglot)
        "algo.inner_optimizer": "adam", "algo.inner_lr": 0.001, "algo.inner_steps": 5,
        "algo.test_inner_steps": 50, "task.meta_batch_size": 5,
        "optimizer._target_": "torch.optim.SGD", "optimizer.lr": 1.0, "optimizer.momentum": 0.0,
        "trainer.max_iters": 100000,
    },
    "metasgd_omniglot_5w1s": {
        "algo.inner_lr": 0.4, "algo.inner_steps": 1, "algo.test_inner_steps": 1,
        "task.meta_batch_size": 32,
    },
    "anil_omniglot_5w1s": {
        "algo.inner_lr": 0.4, "algo.inner_steps": 1, "algo.test_inner_steps": 3,
        "task.meta_batch_size": 32,
    },
    # Natural-image benchmarks (issue 14): each through its pair's specialize/ file.
    "maml_miniimagenet_5w1s": {  # Finn et al. 2017, A.1 and sec. 5.2; cbfinn/maml
        "task.shots": 1, "task.meta_batch_size": 4, "task.queries": 15, "backbone.channels": 32,
        "algo.inner_lr": 0.01, "algo.inner_steps": 5, "algo.test_inner_steps": 10,
        "algo.first_order": False, "optimizer.lr": 1e-3, "trainer.max_iters": 60000,
    },
    "maml_miniimagenet_5w5s": {
        "task.shots": 5, "task.meta_batch_size": 2, "backbone.channels": 32,
        "algo.inner_lr": 0.01, "algo.inner_steps": 5, "algo.test_inner_steps": 10,
    },
    "protonet_miniimagenet_5w1s": {  # Snell et al. 2017, sec. 3.2 (and 3.1's schedule)
        "algo.train_ways": 30, "algo.train_shots": None, "algo.train_queries": 15,
        "task.meta_batch_size": 1, "backbone.channels": 64, "optimizer.lr": 1e-3,
        "scheduler.step_size": 2000, "scheduler.gamma": 0.5,
    },
    "protonet_miniimagenet_5w5s": {
        "task.shots": 5, "algo.train_ways": 20, "algo.train_queries": 15,
        "task.meta_batch_size": 1, "scheduler.step_size": 2000, "scheduler.gamma": 0.5,
    },
    "protonet_cub_5w1s": {  # Chen et al. 2019; CloserLookFewShot train.py / test.py
        "algo.train_ways": None, "algo.train_queries": 16, "task.queries": 15,
        "task.meta_batch_size": 1, "dataset.augment.enabled": True, "trainer.max_iters": 60000,
    },
    "protonet_cub_5w5s": {
        "task.shots": 5, "algo.train_queries": 16, "trainer.max_iters": 40000,
    },
    "baselinepp_cub_5w1s": {  # Chen et al. 2019; CloserLookFewShot train.py
        "algo.classifier": "cosine", "algo.batch_size": 16, "optimizer.lr": 1e-3,
        "dataset.augment.enabled": True, "algo.finetune_steps": 100, "algo.finetune_lr": 0.01,
    },
    "baselinepp_cub_5w5s": {"task.shots": 5, "algo.classifier": "cosine", "algo.batch_size": 16},
    "baselinepp_miniimagenet_5w1s": {  # 400 epochs x 38,400 images / 16
        "algo.classifier": "cosine", "algo.batch_size": 16, "dataset.augment.enabled": True,
        "trainer.max_iters": 960000,
    },
    "baselinepp_miniimagenet_5w5s": {"task.shots": 5, "trainer.max_iters": 960000},
    "protonet_cifarfs_5w1s": {"task.ways": 5, "task.shots": 1, "backbone.channels": 64},
    "protonet_cifarfs_5w5s": {"task.ways": 5, "task.shots": 5, "backbone.channels": 64},
    "protonet_fc100_5w1s": {"task.ways": 5, "task.shots": 1, "backbone.channels": 64},
    "protonet_fc100_5w5s": {"task.ways": 5, "task.shots": 5, "backbone.channels": 64},
    "protonet_tieredimagenet_5w1s": {  # Ren et al. 2018's code (few-shot-ssl-public)
        "algo.train_ways": None, "algo.train_queries": 5, "task.meta_batch_size": 1,
        "optimizer.lr": 1e-3, "trainer.max_iters": 200000, "scheduler.step_size": 25000,
        "scheduler.gamma": 0.5,
    },
}


def _compose(*overrides: str) -> DictConfig:
    register_configs()
    with initialize_config_module(config_module="metarun.configs", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def _keys(node: Any, prefix: str = "") -> set[str]:
    """Dotted paths of every leaf value: `algo.inner_lr`, `backbone.hidden`, ..."""
    if not isinstance(node, dict):
        return {prefix}
    paths = (_keys(value, f"{prefix}.{key}" if prefix else str(key)) for key, value in node.items())
    return set().union(*paths)


def _job_keys(cfg: DictConfig) -> set[str]:
    values = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(values, dict)
    values.pop("hydra")
    return _keys(values)


def test_the_paper_table_covers_every_experiment() -> None:
    assert len(EXPERIMENTS) >= 28
    assert set(PAPER_VALUES) == set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_an_experiment_is_what_its_name_says_and_sets_only_existing_keys(name: str) -> None:
    cfg = _compose(f"experiment={name}")
    choices = cfg.hydra.runtime.choices
    promised = NAME.fullmatch(name)
    assert promised, f"{name}: experiment names are <algo>_<dataset>_<N>w<K>s or ..._k<K>"
    assert choices.experiment == name
    assert choices.algo == promised["algo"] and choices.dataset == promised["dataset"]
    if promised["ways"]:
        assert cfg.task.ways == int(promised["ways"]) and cfg.task.shots == int(promised["shots"])
    else:
        assert cfg.task.shots == int(promised["k"])
    # A misspelt key (algo.inner_lrr) would be added silently to the untyped groups: compare with
    # the same options composed without the experiment.
    plain = _compose(*(f"{group}={choices[group]}" for group in GROUPS))
    assert _job_keys(cfg) == _job_keys(plain)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_an_experiment_holds_its_papers_values(name: str) -> None:
    cfg = _compose(f"experiment={name}")
    for key, expected in PAPER_VALUES[name].items():
        value = OmegaConf.select(cfg, key)
        if OmegaConf.is_config(value):
            value = OmegaConf.to_container(value)
        wanted = pytest.approx(expected) if isinstance(expected, float) else expected
        assert value == wanted, f"{name}: {key}={value}, the paper's is {expected}"


def test_an_experiment_overrides_the_pairs_values_and_the_command_line_overrides_it() -> None:
    # specialize/maml_omniglot.yaml holds the 5-way values (0.4); the 20-way experiment wins over
    # it, and a command-line value wins over the experiment.
    assert _compose("algo=maml", "dataset=omniglot").algo.inner_lr == 0.4
    assert _compose("experiment=maml_omniglot_20w1s").algo.inner_lr == 0.1
    cfg = _compose("experiment=maml_omniglot_20w1s", "algo.inner_lr=0.05", "task.ways=10")
    assert cfg.algo.inner_lr == 0.05 and cfg.task.ways == 10


def test_no_experiment_by_default() -> None:
    cfg = _compose()
    assert cfg.hydra.runtime.choices.experiment is None
    assert cfg.trainer.max_iters == 30000  # the sinusoid default, not the experiment's 70000


def test_maml_sinusoid_k10_runs_end_to_end(tmp_path: Path) -> None:
    proc = run_metarun(
        "experiment=maml_sinusoid_k10", *SINUSOID_TINY, "hydra.run.dir=run", cwd=tmp_path
    )
    check_ok(proc)
    run_dir = tmp_path / "run"
    results = read_results(run_dir)
    assert results["complete"] and results["iterations"] == 40  # the command line's budget
    assert results["algo"] == "maml" and results["dataset"] == "sinusoid"
    assert results["meta_test"]["metric"] == "mse" and math.isfinite(results["meta_test"]["mean"])
    ran = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    assert ran.algo.inner_lr == 0.01 and ran.task.meta_batch_size == 25
    assert list(ran.backbone.hidden) == [40, 40] and ran.task.shots == 10
    assert "experiment=maml_sinusoid_k10" in (run_dir / ".hydra" / "overrides.yaml").read_text()
