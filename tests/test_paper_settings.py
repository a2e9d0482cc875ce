"""The papers' settings per algorithm-dataset pair (configs/specialize/) and the named settings
that build on them (configs/experiment/): every file names options that exist, a pair's file sets
only keys its pair's config has and its values survive composition, and an experiment takes its
pair's values from the pair's file instead of writing them again (DESIGN: a value is written once).

tests/test_experiments.py checks each experiment's own keys and values against its papers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf

import metarun.configs
from metarun.config import register_configs, validate

CONFIGS = Path(metarun.configs.__file__).parent
SPECIALIZE = sorted(path.stem for path in (CONFIGS / "specialize").glob("*.yaml"))
EXPERIMENTS = sorted(path.stem for path in (CONFIGS / "experiment").glob("*.yaml"))
#: Omniglot's experiments were written before their pairs' files held every value and still spell
#: those values out; the rule holds for every experiment after them.
SPELLED_OUT = {
    "anil_omniglot_5w1s", "fomaml_omniglot_5w1s", "maml_omniglot_5w1s", "maml_omniglot_5w5s",
    "metasgd_omniglot_5w1s", "protonet_omniglot_5w1s", "protonet_omniglot_20w1s",
    "reptile_omniglot_5w1s",
}


def _compose(*overrides: str) -> DictConfig:
    register_configs()
    with initialize_config_module(config_module="metarun.configs", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def _leaves(node: Any, prefix: str = "") -> dict[str, Any]:
    """Every leaf value by dotted path (`algo.inner_lr`); lists are leaves."""
    if not isinstance(node, dict):
        return {prefix: node}
    found: dict[str, Any] = {}
    for key, value in node.items():
        found |= _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    return found


def _job_keys(cfg: DictConfig) -> set[str]:
    values = OmegaConf.to_container(cfg, resolve=False)
    assert isinstance(values, dict)
    values.pop("hydra")
    return set(_leaves(values))


def _read(group: str, name: str) -> tuple[list[Any], dict[str, Any]]:
    """A config file's defaults list and the leaf values written in it."""
    content = OmegaConf.to_container(OmegaConf.load(CONFIGS / group / f"{name}.yaml"))
    assert isinstance(content, dict), f"{group}/{name}.yaml is not a mapping"
    defaults = content.pop("defaults", [])
    return defaults, _leaves(content) if content else {}


def _named_options(group: str, name: str) -> list[tuple[str, str]]:
    """(group, option) for each entry of a file's defaults list; a bare name is a file of the same
    group, `override /group: option` (or `/group@package: option`) one of another group."""
    named = []
    for entry in _read(group, name)[0]:
        if isinstance(entry, str):
            if entry != "_self_":
                named.append((group, entry))
            continue
        ((key, option),) = entry.items()
        if option is not None:
            other = key.removeprefix("override ").strip().lstrip("/").split("@")[0]
            named.append((other, str(option)))
    return named


def _values(group: str, name: str) -> dict[str, Any]:
    """The values a file holds, its same-group defaults' first, as Hydra merges them."""
    values: dict[str, Any] = {}
    for other, option in _named_options(group, name):
        if other == group:
            values |= _values(group, option)
    return values | _read(group, name)[1]


def _pair(name: str) -> tuple[str, str]:
    algo, dataset = name.split("_", 1)
    return algo, dataset


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def test_there_are_pair_files_and_experiments_for_the_natural_image_benchmarks() -> None:
    assert {"miniimagenet", "tieredimagenet", "cub"} <= {_pair(name)[1] for name in SPECIALIZE}
    # <algo>_<dataset>_<shape>
    experimented = {name.split("_")[1] for name in EXPERIMENTS}
    assert {"miniimagenet", "tieredimagenet", "cub", "cifarfs", "fc100"} <= experimented


@pytest.mark.parametrize(
    ("group", "name"),
    [("specialize", name) for name in SPECIALIZE] + [("experiment", name) for name in EXPERIMENTS],
)
def test_a_file_names_only_options_that_exist(group: str, name: str) -> None:
    named = _named_options(group, name)
    if group == "specialize":  # its name is the pair it is picked for: algo=<a> dataset=<d>
        algo, dataset = _pair(name)
        named += [("algo", algo), ("dataset", dataset)]
    for other, option in named:
        assert (CONFIGS / other / f"{option}.yaml").is_file(), (
            f"{group}/{name}.yaml names {other}={option}, but there is no {other}/{option}.yaml"
        )


@pytest.mark.parametrize("name", SPECIALIZE)
def test_a_pair_file_sets_only_keys_of_its_pair_and_its_values_hold(name: str) -> None:
    algo, dataset = _pair(name)
    cfg = _compose(f"algo={algo}", f"dataset={dataset}")
    assert cfg.hydra.runtime.choices.specialize == name
    # A misspelt key (algo.inner_lrr) would be added silently to the untyped groups: the pair's
    # config without its file has the same keys.
    without = _compose(f"algo={algo}", f"dataset={dataset}", "~specialize")
    assert _job_keys(cfg) == _job_keys(without), f"specialize/{name}.yaml adds keys"
    values = _values("specialize", name)
    assert values, f"specialize/{name}.yaml holds no value"
    for key, value in values.items():
        assert _plain(OmegaConf.select(cfg, key)) == value, f"{name}: {key} did not hold"
    validate(cfg)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_an_experiment_builds_on_its_pairs_file_without_writing_its_values_again(
    name: str,
) -> None:
    cfg = _compose(f"experiment={name}")
    validate(cfg)
    choices = cfg.hydra.runtime.choices
    pair = f"{choices.algo}_{choices.dataset}"
    if pair not in SPECIALIZE:
        return
    assert choices.specialize == pair
    own = _read("experiment", name)[1]
    held = _values("specialize", pair)
    for key, value in held.items():
        if key not in own:  # the pair's value reaches the experiment's run
            assert _plain(OmegaConf.select(cfg, key)) == value, f"{name}: {key} from {pair}"
    repeated = sorted(key for key, value in own.items() if held.get(key, object()) == value)
    if name in SPELLED_OUT:
        return
    assert not repeated, f"experiment/{name}.yaml repeats specialize/{pair}.yaml's {repeated}"


def test_the_spelled_out_experiments_are_only_those_that_still_spell_out() -> None:
    # The exception list shrinks as those files drop their repeated values; it must not hide one
    # that no longer needs it.
    for name in SPELLED_OUT:
        cfg = _compose(f"experiment={name}")
        pair = f"{cfg.hydra.runtime.choices.algo}_{cfg.hydra.runtime.choices.dataset}"
        held = _values("specialize", pair)
        own = _read("experiment", name)[1]
        assert any(held.get(key, object()) == value for key, value in own.items()), name
