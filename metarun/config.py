"""Structured configs: the typed schema of a run, registered in Hydra's ConfigStore.

Typed nodes (`task`, `trainer`, top-level keys) make Hydra reject `trainer.max_iters=abc` while
composing, before anything is built. Range checks that a type cannot express live in `validate`,
which runs before any data is loaded; checks that need the data or the model (ways against a
split's classes, a backbone against the dataset's input) live with the code that knows.

This module imports no torch: a bad config fails before torch's import is paid for.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ValidationError

from metarun.checks import positive_int, positive_number, shown
from metarun.errors import ConfigError


@dataclass
class TaskConfig:
    """The shape of every episode: N ways, K shots and Q queries per class, B tasks a step."""

    ways: int = 5
    shots: int = 1
    queries: int = 15
    meta_batch_size: int = 32


#: trainer.precision's values (metarun/precision.py says what each does).
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainerConfig:
    max_iters: int = 60000
    val_every: int = 1000
    val_episodes: int = 300
    test_episodes: int = 600
    log_every: int = 10
    ckpt_every: int = 100
    eval_batch_size: int = 50
    device: str = "auto"
    progress: bool = True
    skip_non_finite: bool = False
    #: fp32, or bf16 / fp16 autocast (fp16 with loss scaling): metarun/precision.py.
    precision: str = "fp32"


@dataclass
class MetarunConfig:
    dataset: Any = field(default_factory=dict)
    backbone: Any = field(default_factory=dict)
    algo: Any = field(default_factory=dict)
    optimizer: Any = field(default_factory=dict)
    #: The meta-optimizer's learning-rate schedule; empty (scheduler=none): a constant rate.
    scheduler: Any = field(default_factory=dict)
    task: TaskConfig = field(default_factory=TaskConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    resume: str | None = None
    #: torch's intra-op threads; None: automatic (metarun/threads.py says how).
    threads: int | None = None


def register_configs() -> None:
    ConfigStore.instance().store(name="metarun_schema", node=MetarunConfig)


def check_override_types(overrides: Iterable[str]) -> None:
    """Refuse a command-line value the schema cannot hold, in one line naming the type expected.

    Hydra would refuse it too, while composing, but in a multi-line validation dump; this runs the
    same conversion (``OmegaConf.update`` into the typed schema) on each override first. Overrides
    of untyped keys, config groups and anything Hydra cannot parse are left to Hydra.
    """
    try:
        parsed = OverridesParser.create().parse_overrides(list(overrides))
    except HydraException:
        return
    for override in parsed:
        key = override.key_or_group
        field_type = _schema_type(key)
        if field_type is None or override.is_delete():
            continue
        value = override.value()
        if override.is_sweep_override():
            if not isinstance(value, ChoiceSweep):
                continue
            candidates = [(item, shown(item)) for item in value.list]
        else:
            candidates = [(value, override.input_line.split("=", 1)[1])]
        for candidate, text in candidates:
            try:
                OmegaConf.update(OmegaConf.structured(MetarunConfig), key, candidate, merge=True)
            except ValidationError:
                raise ConfigError(
                    f"{key}={text} is not allowed: {key} must be {_kind(field_type)}, e.g. "
                    f"{key}={_example(key, field_type, candidate)}"
                ) from None


def _schema_type(key: str) -> Any:
    """The type the schema declares for a leaf ``key``; None where it declares none (``Any``)."""
    node: Any = MetarunConfig
    for part in key.split("."):
        if not dataclasses.is_dataclass(node):
            return None
        hints = typing.get_type_hints(node)
        if part not in hints:
            return None
        node = hints[part]
    return None if node is Any or dataclasses.is_dataclass(node) else node


_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _kind(field_type: Any) -> str:
    args = typing.get_args(field_type)
    if typing.get_origin(field_type) in (typing.Union, types.UnionType) and type(None) in args:
        (inner,) = [arg for arg in args if arg is not type(None)]
        return f"{_KINDS.get(inner, inner.__name__)} or null"
    return _KINDS.get(field_type, getattr(field_type, "__name__", str(field_type)))


def _example(key: str, field_type: Any, value: Any) -> str:
    """The value written the way the schema takes it (1e9 -> 1000000000), else the default."""
    wants_int = field_type is int or int in typing.get_args(field_type)
    if wants_int and isinstance(value, float) and value.is_integer():
        return str(int(value))
    default = OmegaConf.select(OmegaConf.structured(MetarunConfig), key)
    return shown(default)


_POSITIVE_INTS = [
    ("task.ways", "the number of classes per task"),
    ("task.shots", "the support examples per class"),
    ("task.queries", "the query examples per class"),
    ("task.meta_batch_size", "the tasks per meta-iteration"),
    ("trainer.val_every", "iterations between meta-validations"),
    ("trainer.val_episodes", "meta-validation tasks"),
    ("trainer.test_episodes", "meta-test tasks"),
    ("trainer.log_every", "iterations between log points"),
    ("trainer.ckpt_every", "iterations between checkpoints"),
    ("trainer.eval_batch_size", "tasks evaluated at once"),
]


def validate(cfg: DictConfig) -> None:
    """Reject values no run can use, naming the key and what to do."""
    for key, meaning in _POSITIVE_INTS:
        value = _select(cfg, key)
        if value < 1:
            raise ConfigError(f"{key}={value} is not allowed: {meaning} must be at least 1")
    if cfg.trainer.max_iters < 0:
        raise ConfigError(f"trainer.max_iters={cfg.trainer.max_iters} must be 0 or more")
    lr = cfg.optimizer.get("lr")
    if lr is not None and not (isinstance(lr, int | float) and lr > 0):
        raise ConfigError(f"optimizer.lr={lr!r} must be a positive number, e.g. optimizer.lr=1e-3")
    _validate_scheduler(cfg.get("scheduler"))
    if cfg.trainer.device not in ("auto", "cpu") and not str(cfg.trainer.device).startswith(
        ("cuda", "mps")
    ):
        raise ConfigError(
            f"trainer.device={cfg.trainer.device!r} is not a device; use auto, cpu or cuda[:N]"
        )
    precision = cfg.trainer.get("precision", "fp32")  # configs saved before it: float32
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is not allowed: use fp32, bf16 or fp16")


#: The schedules' keys (configs/scheduler/) and their checks: a schedule is built only after the
#: data and the model, too late for a bad value to fail at once.
_SCHEDULER_CHECKS = {"step_size": positive_int, "T_max": positive_int, "gamma": positive_number}


def _validate_scheduler(scheduler: Any) -> None:
    """A step size, period or decay no schedule can use; an empty node is a constant rate."""
    if not scheduler:
        return
    for key, check in _SCHEDULER_CHECKS.items():
        if key in scheduler:
            check(scheduler[key], f"scheduler.{key}")
    eta_min = scheduler.get("eta_min", 0.0)
    is_number = isinstance(eta_min, int | float) and not isinstance(eta_min, bool)
    if not is_number or not math.isfinite(eta_min) or eta_min < 0:
        raise ConfigError(f"scheduler.eta_min must be a number >= 0, got {eta_min!r}")


def _select(cfg: DictConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = node[part]
    return node
