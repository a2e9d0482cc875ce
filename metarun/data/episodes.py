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


class ClassImageSampler:
    """N-way K-shot tasks from one split of an image dataset held as uint8 base images.

    A class is a (source image set, quarter-turn rotation) pair, so rotated copies of a character
    (the Vinyals Omniglot protocol) cost no memory: rotation happens on the few images a batch
    actually uses. Every draw comes from the given ``torch.Generator`` through batched ops, so a
    seed fixes the tasks exactly and a meta-batch costs the same few kernels whatever its size.

    ``images`` is ``[num_sources, drawings, H, W]`` uint8 (H == W when rotations are used), on
    the CPU or the training device (``dataset.on_device``: the batch is then made there);
    ``class_source`` and ``class_rotation`` (quarter turns counter-clockwise, 0-3) are ``[C]``.
    """

    def __init__(
        self,
        images: Tensor,
        class_source: Tensor,
        class_rotation: Tensor,
        ways: int,
        shots: int,
        queries: int,
    ) -> None:
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 [sources, drawings, H, W], got {images.shape}")
        if class_source.shape != class_rotation.shape or class_source.dim() != 1:
            raise ValueError("class_source and class_rotation must be 1-d and of equal length")
        if not 1 <= ways <= class_source.numel():
            raise ValueError(f"ways={ways} needs 1..{class_source.numel()} classes")
        if shots < 1 or queries < 1 or shots + queries > images.shape[1]:
            raise ValueError(f"shots={shots}, queries={queries}: {images.shape[1]} drawings")
        if bool((class_rotation % 4 != 0).any()) and images.shape[-1] != images.shape[-2]:
            raise ValueError("rotated classes need square images")
        self.images = images
        self.class_source = class_source.long()
        self.class_rotation = class_rotation.long() % 4
        self.ways = ways
        self.shots = shots
        self.queries = queries

    @property
    def num_classes(self) -> int:
        return self.class_source.numel()

    def sample(self, meta_batch_size: int, generator: torch.Generator) -> TaskBatch:
        """``meta_batch_size`` tasks; inputs are float32 in [0, 1], labels class-major."""
        batch, ways, shots = meta_batch_size, self.ways, self.shots
        per_class = shots + self.queries
        drawings = self.images.shape[1]
        # Distinct classes per task and distinct drawings per class: the top-k of i.i.d. uniform
        # keys is a uniform random subset without replacement, for all tasks at once.
        keys = torch.rand(batch, self.num_classes, generator=generator)
        classes = keys.topk(ways, dim=1).indices  # [B, N]
        keys = torch.rand(batch, ways, drawings, generator=generator)
        picks = keys.topk(per_class, dim=2).indices  # [B, N, K+Q]

        # The images may live on the training device (dataset.on_device): the draws above are
        # the CPU generator's, and only the index tensors go there.
        device = self.images.device
        sources = self.class_source[classes]  # [B, N]
        # [B, N, K+Q, H, W] uint8
        images = self.images[sources.unsqueeze(-1).to(device), picks.to(device)]
        rotations = self.class_rotation[classes]
        for quarter_turns in (1, 2, 3):
            mask = rotations == quarter_turns
            if bool(mask.any()):
                mask = mask.to(device)
                images[mask] = torch.rot90(images[mask], quarter_turns, dims=(-2, -1))
        images = images.to(torch.float32).div_(255.0).unsqueeze(3)  # [B, N, K+Q, 1, H, W]

        image_shape = images.shape[3:]
        support_x = images[:, :, :shots].reshape(batch, ways * shots, *image_shape)
        query_x = images[:, :, shots:].reshape(batch, ways * self.queries, *image_shape)
        labels = torch.arange(ways, device=device)
        support_y = labels.repeat_interleave(shots).repeat(batch, 1)
        query_y = labels.repeat_interleave(self.queries).repeat(batch, 1)
        return TaskBatch(support_x, support_y, query_x, query_y)


@dataclass
class LabeledBatch:
    """Ordinary labelled examples (not episodes): pre-training draws for transfer baselines.

    ``x`` is ``[n, C, H, W]`` float; ``y`` is ``[n]`` int64, the class index within the split
    (``0 .. num_classes - 1``), so one classifier can be trained over all of a split's classes.
    """

    x: Tensor
    y: Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> LabeledBatch:
        """Move to ``device``; ``dtype`` (if given) applies to the inputs only."""
        x = self.x.to(device=device, dtype=dtype or self.x.dtype, non_blocking=True)
        return LabeledBatch(x, self.y.to(device=device, non_blocking=True))


class ClassImageBatchSampler:
    """Mini-batches of i.i.d. uniformly random (class, drawing) pairs of one split.

    Same storage and rotation convention as ``ClassImageSampler`` (a class is a source image set
    turned by quarter turns), so the labels index the very classes the episodes of that split
    use. Draws are with replacement: a batch is a few tensor ops from the given generator, never
    an epoch bookkeeping or a loop per image, and a seed fixes every batch.
    """

    def __init__(
        self, images: Tensor, class_source: Tensor, class_rotation: Tensor, batch_size: int
    ) -> None:
        if images.dim() != 4 or images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 [sources, drawings, H, W], got {images.shape}")
        if class_source.shape != class_rotation.shape or class_source.dim() != 1:
            raise ValueError("class_source and class_rotation must be 1-d and of equal length")
        if class_source.numel() < 1 or batch_size < 1:
            raise ValueError(f"need classes and batch_size >= 1, got {batch_size}")
        if bool((class_rotation % 4 != 0).any()) and images.shape[-1] != images.shape[-2]:
            raise ValueError("rotated classes need square images")
        self.images = images
        self.class_source = class_source.long()
        self.class_rotation = class_rotation.long() % 4
        self.batch_size = batch_size

    @property
    def num_classes(self) -> int:
        return self.class_source.numel()

    def sample(self, generator: torch.Generator) -> LabeledBatch:
        """``batch_size`` images, float32 in [0, 1], ``[n, 1, H, W]``, with their class indices."""
        size, device = self.batch_size, self.images.device
        labels = torch.randint(self.num_classes, (size,), generator=generator)
        drawings = torch.randint(self.images.shape[1], (size,), generator=generator)
        images = self.images[self.class_source[labels].to(device), drawings.to(device)]  # a copy
        rotations = self.class_rotation[labels]
        for quarter_turns in (1, 2, 3):
            mask = rotations == quarter_turns
            if bool(mask.any()):
                mask = mask.to(device)
                images[mask] = torch.rot90(images[mask], quarter_turns, dims=(-2, -1))
        return LabeledBatch(images.to(torch.float32).div_(255.0).unsqueeze(1), labels.to(device))
