"""Episodes as sequences, for learners that read a task one example at a time (MANN, SNAIL).

A sequence learner is shown a task's support set as a sequence and then asked about each query.
``episode_sequence`` turns a ``TaskBatch`` into that sequence, the same way for every such
learner, so no trainer or sampler knows about sequences:

- **Support order**: the support items in a random order drawn from the generator passed in, a
  fresh permutation per task. The sampler's class-major order (0, 0, 1, 1, ...) would tell the
  learner the labels by position alone.
- **Labels shifted by one step** (Santoro et al. 2016, sec. 2): position ``t`` holds the input
  ``x_t`` and the one-hot label of the previous item, ``y_{t-1}``; the first position's previous
  label is all zeros. A learner predicts ``y_t`` at position ``t`` before it is shown, so every
  support position is a prediction too. Shifting pushes the last support label past the end of
  the support sequence: ``last_label`` holds it for learners that still need it before the
  queries (MANN takes one more step with it). ``support_labels`` is the unshifted one-hot, for a
  learner that reads (x_t, y_t) pairs and is scored on queries only (SNAIL, as in its paper).
- **Queries**: each query comes after the support sequence with an all-zeros label input
  (``query_labels``): a query's label is never an input, only a target (``query_y``). Each query
  is predicted from the support sequence and itself alone, never from the other queries: a
  learner treats every query as the one position after the support sequence (the queries of a
  task are that position's alternatives, not a continuation of each other).
- **Targets**: the label of each position, ``support_y`` (in the drawn order) then ``query_y``.

Usage::

    generator = torch.Generator().manual_seed(0)
    sequence = episode_sequence(batch, ways=5, generator=generator)
    inputs = torch.cat([embed(sequence.support_x), sequence.previous_labels], -1)  # [B, S, D+N]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from metarun.data.episodes import TaskBatch


@dataclass
class EpisodeSequence:
    """B tasks as sequences: ``S`` support positions, then ``Q`` queries, ``N`` ways."""

    #: ``[B, S, ...]`` support inputs in the drawn order.
    support_x: Tensor
    #: ``[B, S]`` their labels: the targets of the support positions.
    support_y: Tensor
    #: ``[B, S, N]`` the label input of each support position: one-hot ``y_{t-1}``, zeros at 0.
    previous_labels: Tensor
    #: ``[B, Q, ...]`` query inputs, in the batch's order.
    query_x: Tensor
    #: ``[B, Q]`` query labels: targets only, never part of an input.
    query_y: Tensor
    #: ``[B, Q, N]`` the label input of every query position: all zeros.
    query_labels: Tensor
    #: ``[B, S]`` the drawn order: ``support_x[b, t] == batch.support_x[b, order[b, t]]``.
    order: Tensor

    @property
    def ways(self) -> int:
        return self.previous_labels.shape[-1]

    @property
    def support_labels(self) -> Tensor:
        """``[B, S, N]`` one-hot ``y_t`` at position ``t`` (unshifted)."""
        return F.one_hot(self.support_y, self.ways).to(self.previous_labels.dtype)

    @property
    def last_label(self) -> Tensor:
        """``[B, N]`` one-hot label of the last support item, which the shift leaves unshown."""
        return self.support_labels[:, -1]

    @property
    def targets(self) -> Tensor:
        """``[B, S + Q]`` the label of every position: support (drawn order), then queries."""
        return torch.cat([self.support_y, self.query_y], dim=1)


def episode_sequence(batch: TaskBatch, ways: int, generator: torch.Generator,
                     one_order: bool = False) -> EpisodeSequence:
    """The tasks of ``batch`` as sequences (see the module's docstring), support order drawn from
    ``generator`` (a CPU generator; the permutation is moved to the batch's device): one order
    per task, or with ``one_order`` the same drawn order for every task (evaluation, so that a
    task's sequence does not depend on its place in the batch)."""
    support_y = batch.support_y
    if support_y.is_floating_point():
        raise ValueError("episode sequences need class labels, not regression targets")
    if int(support_y.max()) >= ways or int(batch.query_y.max()) >= ways:
        raise ValueError(f"labels must lie in [0, {ways}) for a {ways}-way sequence")
    tasks, shots = support_y.shape
    keys = torch.rand(1 if one_order else tasks, shots, generator=generator)
    order = keys.argsort(dim=1).expand(tasks, shots).to(support_y.device)
    support_x = batch.support_x.gather(1, _expand_like(order, batch.support_x))
    support_y = support_y.gather(1, order)
    dtype = batch.support_x.dtype if batch.support_x.is_floating_point() else torch.float32
    one_hot = F.one_hot(support_y, ways).to(dtype)
    previous = torch.cat([torch.zeros_like(one_hot[:, :1]), one_hot[:, :-1]], dim=1)
    blank = one_hot.new_zeros(tasks, batch.query_y.shape[1], ways)
    return EpisodeSequence(
        support_x, support_y, previous, batch.query_x, batch.query_y, blank, order
    )


def _expand_like(order: Tensor, values: Tensor) -> Tensor:
    """``order [B, S]`` as a gather index for ``values [B, S, ...]``."""
    index = order.reshape(*order.shape, *([1] * (values.dim() - 2)))
    return index.expand(*order.shape, *values.shape[2:])
