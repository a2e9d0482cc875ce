"""Checks of the values a config hands to a constructor: one line naming the key, or the value.

Hydra passes ListConfigs and may pass strings from the command line, so every component checks
its own hyperparameters when it is built, before any training, with these.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any

from metarun.errors import ConfigError


def positive_int(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be an integer >= 1, got {value!r}")
    return value


def optional_positive_int(value: object, key: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{key} must be an integer >= 1 or null, got {value!r}")
    return value


def positive_ints(value: object, key: str) -> tuple[int, ...]:
    try:
        items = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        raise ConfigError(f"{key} must be a list of positive integers, got {value!r}") from None
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or item < 1:
            raise ConfigError(f"{key} must be a list of positive integers, got {list(items)!r}")
    return items


def positive_number(value: object, key: str) -> float:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key} must be a positive number, got {value!r}")
    return float(value)


def auto_or_bool(value: object, key: str) -> str | bool:
    """``auto``, ``true`` or ``false`` (e.g. ``dataset.on_device``)."""
    if isinstance(value, bool) or value == "auto":
        return value  # type: ignore[return-value]
    raise ConfigError(f"{key}={shown(value)} is not allowed: use auto, true or false")


def image_shape(input_shape: Sequence[int] | int, backbone: str) -> tuple[int, int, int]:
    """``(C, H, W)`` for a convolutional backbone, or the one-line reason it can't read the data."""
    shape = tuple(input_shape) if isinstance(input_shape, Sequence) else (input_shape,)
    if len(shape) != 3:
        raise ConfigError(
            f"backbone={backbone} needs image inputs (C, H, W) but the dataset gives shape "
            f"{shape}; use backbone=mlp"
        )
    channels, height, width = positive_ints(shape, "backbone.input_shape")
    return channels, height, width


def shown(value: Any) -> str:
    """A value as it would be typed on the command line, for messages (``null``, ``true``,
    ``'10'`` for a string that would read as a number)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))
    if isinstance(value, str) and _reads_as_other_type(value):
        return repr(value)  # '10', not 10: the quotes are the difference
    return str(value)


def _reads_as_other_type(text: str) -> bool:
    if text.lower() in ("true", "false", "null", "none"):
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True
