"""Sinusoid regression, the toy problem of MAML (Finn et al. 2017, section 5.1).

A task is ``y = A sin(x - phase)`` with amplitude ``A ~ U[0.1, 5.0]``, phase ``~ U[0, pi]`` and
inputs ``x ~ U[-5, 5]``; K support points to adapt on, Q query points to score. As in the paper,
meta-train, meta-val and meta-test draw from the same task distribution: they differ only in
the seeds the trainer gives their generators. Tasks are generated on the fly, so the "dataset"
is a few floats and every split has unboundedly many tasks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from metarun.data.episodes import TaskBatch
from metarun.errors import ConfigError


class SinusoidSampler:
    """Draws whole meta-batches of sinusoid tasks with one call per random quantity."""

    def __init__(
        self,
        amplitude: tuple[float, float],
        phase: tuple[float, float],
        x_range: tuple[float, float],
        shots: int,
        queries: int,
    ) -> None:
        self.amplitude = amplitude
        self.phase = phase
        self.x_range = x_range
        self.shots = shots
        self.queries = queries

    def sample(self, meta_batch_size: int, generator: torch.Generator) -> TaskBatch:
        """Support ``[B, K, 1]`` / ``[B, K]`` and query ``[B, Q, 1]`` / ``[B, Q]``, float32."""
        batch, points = meta_batch_size, self.shots + self.queries
        amplitude = _uniform((batch, 1), self.amplitude, generator)
        phase = _uniform((batch, 1), self.phase, generator)
        x = _uniform((batch, points), self.x_range, generator)
        y = amplitude * torch.sin(x - phase)
        x = x.unsqueeze(-1)
        k = self.shots
        return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])


class Sinusoid:
    """The dataset object the trainer asks for samplers; built by Hydra from ``dataset.*``."""

    task_type = "regression"
    input_shape = (1,)

    def __init__(
        self,
        amplitude: Sequence[float] = (0.1, 5.0),
        phase: Sequence[float] = (0.0, math.pi),
        x_range: Sequence[float] = (-5.0, 5.0),
    ) -> None:
        self.amplitude = _interval("dataset.amplitude", amplitude)
        self.phase = _interval("dataset.phase", phase)
        self.x_range = _interval("dataset.x_range", x_range)

    def output_size(self, ways: int) -> int:
        return 1

    def num_classes(self, split_name: str) -> None:
        """Regression has no classes; ``None`` tells the trainer there is nothing to check."""
        return None

    def batch_sampler(self, split_name: str, batch_size: int) -> None:
        """Labelled mini-batches need classes; regression tasks share no labels to pre-train on."""
        raise ConfigError(
            "dataset=sinusoid is regression and has no classes to draw labelled mini-batches "
            "from; use a classification dataset (e.g. dataset=omniglot)"
        )

    def sampler(self, split_name: str, ways: int, shots: int, queries: int) -> SinusoidSampler:
        """``ways`` is ignored (one output); ``shots`` is K, the support points per task."""
        for key, value in (("task.shots", shots), ("task.queries", queries)):
            if value < 1:
                raise ConfigError(f"{key}={value} but it must be at least 1")
        return SinusoidSampler(self.amplitude, self.phase, self.x_range, shots, queries)


def _interval(key: str, bounds: Sequence[float]) -> tuple[float, float]:
    """A ``[low, high]`` pair from the config (lists arrive as OmegaConf ListConfig)."""
    try:
        low, high = (float(value) for value in bounds)
    except (TypeError, ValueError):
        low, high = math.nan, math.nan
    if not low <= high:
        raise ConfigError(f"{key}={bounds} must be two numbers [low, high] with low <= high")
    return low, high


def _uniform(shape: tuple[int, int], bounds: tuple[float, float], generator: torch.Generator):
    low, high = bounds
    return torch.rand(shape, generator=generator) * (high - low) + low
