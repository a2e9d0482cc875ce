"""Tasks as stacked tensors: the one currency between datasets, algorithms and the trainer.

A sampler turns preloaded tensors into whole meta-batches by indexing, so an episode costs a few
tensor ops, never a Python loop over images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor


@dataclass
class TaskBatch:
    """B tasks: support ``[B, N*K, ...]`` and query ``[B, N*Q, ...]``.

    Classification labels are int64 class indices in ``[0, N)``; regression targets are float
    ``[B, K]`` (one output per point), the same shape as classification labels.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    @property
    def meta_batch_size(self) -> int:
        return self.support_x.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TaskBatch:
        """Move to ``device``; ``dtype`` (if given) applies to the inputs and float targets only."""

        def move(t: Tensor, is_target: bool) -> Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype, non_blocking=True)
            return t.to(device=device, non_blocking=True)

        return TaskBatch(
            move(self.support_x, False),
            move(self.support_y, True),
            move(self.query_x, False),
            move(self.query_y, True),
        )

    def task(self, index: int) -> TaskBatch:
        """Task ``index`` as a meta-batch of one (keeps the leading dimension)."""
        s = slice(index, index + 1)
        return TaskBatch(self.support_x[s], self.support_y[s], self.query_x[s], self.query_y[s])


class EpisodeSampler(Protocol):
    """Draws meta-batches of tasks of one split with a fixed ways/shots/queries shape."""

    def sample(self, meta_batch_size: int, generator: torch.Generator) -> TaskBatch: ...


def fixed_episodes(
    sampler: EpisodeSampler, episodes: int, meta_batch_size: int, seed: int
) -> list[TaskBatch]:
    """The same ``episodes`` tasks every time for a given seed (meta-val and meta-test sets).

    Regenerated from the seed rather than stored, so a resumed run sees the identical set.
    """
    generator = torch.Generator().manual_seed(seed)
    batches = []
    remaining = episodes
    while remaining > 0:
        size = min(meta_batch_size, remaining)
        batches.append(sampler.sample(size, generator))
        remaining -= size
    return batches
