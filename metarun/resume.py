"""What a resumed run takes from its command line: the saved config, changed only in trainer.*.

A requeued job (SLURM's ``--requeue``, a retry loop) re-runs its original command with
``resume=<run folder>`` appended, so an override that repeats the saved value is accepted and
changes nothing. Only ``trainer.*`` and ``threads`` may really change: everything else (data,
model, algorithm, seed) shaped the saved state, and changing it on resume would silently continue
a different experiment.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from omegaconf import DictConfig, ListConfig, OmegaConf

from metarun.checks import shown
from metarun.errors import ConfigError

#: The config groups whose choice a checkpoint's run_info records (build.make_trainer), and
#: which TensorBoard's HParams show by name (build.run_hparams). Checkpoints written before
#: ``scheduler`` existed record only the first four.
RECORDED_GROUPS = ("algo", "dataset", "backbone", "optimizer", "scheduler")

_MISSING = object()


def saved_choices(run_dir: Path, run_info: Mapping[str, Any]) -> dict[str, str | None]:
    """The option picked for each config group when the run started.

    The checkpoint records the main four groups; the others (``experiment``, ``task``, ...) come
    from the ``.hydra/hydra.yaml`` Hydra wrote into the run folder then, when it is still there.
    """
    choices: dict[str, str | None] = {}
    try:
        hydra_yaml = OmegaConf.load(Path(run_dir) / ".hydra" / "hydra.yaml")
        recorded = OmegaConf.select(hydra_yaml, "hydra.runtime.choices", default=None)
        if isinstance(recorded, DictConfig):
            choices.update(OmegaConf.to_container(recorded))  # type: ignore[arg-type]
    except (OSError, ValueError, yaml.YAMLError):
        pass  # no record: a group override is then compared by what it put in the config
    choices.update({group: run_info[group] for group in RECORDED_GROUPS if group in run_info})
    return choices


def resumed_config(
    saved_yaml: str,
    current: DictConfig,
    saved_choices: Mapping[str, str | None] | None = None,
    overrides: Sequence[str] | None = None,
    current_choices: Mapping[str, str | None] | None = None,
) -> DictConfig:
    """The saved run's config with the command's ``trainer.*`` and ``threads`` overrides applied.

    Any other override must give the saved value (an option's name for a config group, the value
    for a key; 1e-3 and 0.001, 5 and 5.0 are the same), or the run is refused naming the key, the
    saved value and the new one. ``overrides`` and ``current_choices`` default to Hydra's.
    """
    saved = OmegaConf.create(saved_yaml)
    if overrides is None or current_choices is None:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get() if HydraConfig.initialized() else None
        if overrides is None:
            overrides = list(hydra_cfg.overrides.task) if hydra_cfg else []
        if current_choices is None:
            current_choices = dict(hydra_cfg.runtime.choices) if hydra_cfg else {}
    parsed = OverridesParser.create().parse_overrides(
        [o for o in overrides if not o.startswith("resume=")]
    )
    for override in parsed:
        key = override.key_or_group
        if key == "trainer" or key.startswith("trainer.") or key == "threads":
            OmegaConf.update(saved, key, OmegaConf.select(current, key), merge=True)
        elif key in current_choices:
            _check_same_choice(override, current_choices, saved_choices or {}, current, saved)
        else:
            _check_same_value(override, current, saved)
    saved.resume = current.resume
    return saved


def _check_same_choice(
    override: Override,
    current_choices: Mapping[str, str | None],
    saved_choices: Mapping[str, str | None],
    current: DictConfig,
    saved: DictConfig,
) -> None:
    group = override.key_or_group
    if group in saved_choices:
        old, new = saved_choices[group], current_choices[group]
        if old != new:
            _refuse(override, f"with {group}={shown(old)}", f"gives {group}={shown(new)}")
    elif group in current:
        # No record of the option (the run folder lost .hydra/): compare what it put in the config.
        _check_same_value(override, current, saved)
    else:
        raise ConfigError(
            f"cannot check {override.input_line} when resuming: the run's .hydra/hydra.yaml, "
            f"which records its {group}, is missing; drop {override.input_line} (the saved "
            "config is used as it is)"
        )


def _check_same_value(override: Override, current: DictConfig, saved: DictConfig) -> None:
    key = override.key_or_group
    new = _plain(OmegaConf.select(current, key, default=_MISSING))
    old = _plain(OmegaConf.select(saved, key, default=_MISSING))
    if override.type == OverrideType.DEL:
        new = _MISSING
    if not _same(old, new):
        saved_setting = f"without {key}" if old is _MISSING else f"with {key}={shown(old)}"
        new_setting = f"removes {key}" if new is _MISSING else f"gives {key}={shown(new)}"
        _refuse(override, saved_setting, new_setting)


def _refuse(override: Override, saved_setting: str, new_setting: str) -> None:
    key = override.key_or_group
    raise ConfigError(
        f"cannot change {key} when resuming: the run was saved {saved_setting}, this command "
        f"{new_setting}; drop {override.input_line} to resume (only trainer.* and "
        "threads may change), or start a new run without resume="
    )


def _plain(value: Any) -> Any:
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _same(old: Any, new: Any) -> bool:
    """Equal as settings: numbers by value (5 == 5.0, 1e-3 == 0.001), booleans only to booleans."""
    if isinstance(old, bool) or isinstance(new, bool):
        return type(old) is type(new) and old == new
    if isinstance(old, int | float) and isinstance(new, int | float):
        return math.isclose(old, new, rel_tol=1e-12) or (math.isnan(old) and math.isnan(new))
    if isinstance(old, dict) and isinstance(new, dict):
        return old.keys() == new.keys() and all(_same(old[k], new[k]) for k in old)
    if isinstance(old, list) and isinstance(new, list):
        return len(old) == len(new) and all(_same(a, b) for a, b in zip(old, new, strict=True))
    return type(old) is type(new) and old == new
