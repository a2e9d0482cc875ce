"""Episodes from a class-grouped uint8 image store: indexing, never decoding, per episode.

The image datasets (mini-ImageNet, tiered-ImageNet, CIFAR-FS, FC100, CUB, a user's folders) keep
every image once as uint8 ``[rows, C, H, W]``, rows grouped by class. A split is a set of classes;
a class is a run of rows (``start``, ``count``), and classes may hold different numbers of images
(CUB, a user's folders). Samplers draw whole meta-batches with a few batched tensor ops from an
explicit ``torch.Generator``, gather the rows, and turn them into normalised float32 in one pass.

Large stores (tiered-ImageNet, about 16.5 GB as uint8) stay on disk, memory-mapped: a gather
reads only the rows it needs, and the pages it touched are handed back to the kernel afterwards,
so a run's resident memory stays the size of a few meta-batches, not of the dataset.

A store that fits can be copied once to the training GPU (``dataset.on_device``,
``metarun.data.on_device``): ``DeviceImageRows`` gathers there, the samplers normalise there, and
the batch arrives on the device. The row draws stay the CPU generator's.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from metarun.data.augment import Augmentation
from metarun.data.episodes import LabeledBatch, TaskBatch


class ImageRows:
    """uint8 images ``[rows, C, H, W]`` with ``gather(rows) -> Tensor`` (a copy).

    ``resident=True`` keeps the pages a gather touched (the page cache serves later gathers
    from memory: right for stores that fit); ``resident=False`` releases them after every gather
    (``madvise(MADV_DONTNEED)``), so the process never holds more than one gather's rows.
    """

    def __init__(self, array: np.ndarray, mapping: mmap.mmap | None = None,
                 resident: bool = True) -> None:
        if array.dtype != np.uint8 or array.ndim != 4:
            raise ValueError(f"images must be uint8 [rows, C, H, W], got {array.dtype} "
                             f"{array.shape}")
        self.array = array
        self._mapping = mapping
        self.resident = resident or mapping is None

    @classmethod
    def from_tensor(cls, images: Tensor) -> ImageRows:
        return cls(images.numpy())

    @classmethod
    def open(cls, path: Path, shape: Sequence[int], resident: bool) -> ImageRows:
        """Memory-map a raw uint8 file of exactly ``shape`` (checked by the caller)."""
        with open(path, "rb") as file:
            mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        array = np.frombuffer(mapping, dtype=np.uint8).reshape(tuple(shape))
        return cls(array, mapping, resident)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.array.shape)  # type: ignore[return-value]

    def gather(self, rows: Tensor) -> Tensor:
        """The images at ``rows`` (any shape of int64), as ``[*rows.shape, C, H, W]`` uint8."""
        flat = rows.reshape(-1).numpy()
        if self.resident:
            picked = self.array[flat]
        else:
            # Reading in row order turns a random gather into a forward sweep of the file.
            order = np.argsort(flat, kind="stable")
            picked = np.empty((flat.size, *self.array.shape[1:]), dtype=np.uint8)
            picked[order] = self.array[flat[order]]
            self._mapping.madvise(mmap.MADV_DONTNEED)
        return torch.from_numpy(picked).reshape(*rows.shape, *self.array.shape[1:])

    def to_device(self, device: torch.device, chunk_bytes: int = 64 << 20) -> DeviceImageRows:
        """Every row copied to ``device``, a chunk at a time (a mapped store's pages released
        after each chunk, as its gathers do), so host memory never holds the whole store."""
        rows = torch.empty(self.shape, dtype=torch.uint8, device=device)
        step = max(1, chunk_bytes // max(1, int(np.prod(self.shape[1:]))))
        for first in range(0, self.shape[0], step):
            chunk = np.array(self.array[first:first + step])  # a writable copy for torch
            rows[first:first + step].copy_(torch.from_numpy(chunk))
            if not self.resident:
                self._mapping.madvise(mmap.MADV_DONTNEED)
        return DeviceImageRows(rows)


class DeviceImageRows:
    """The rows of an ``ImageRows`` held on a device: ``gather`` indexes there (the row
    indices, drawn on the CPU, are the only thing sent)."""

    def __init__(self, images: Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [rows, C, H, W], got {images.dtype} "
                             f"{tuple(images.shape)}")
        self.images = images

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(self.images.shape)  # type: ignore[return-value]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def gather(self, rows: Tensor) -> Tensor:
        """The images at ``rows`` (CPU int64, any shape), ``[*rows.shape, C, H, W]`` uint8."""
        return self.images[rows.to(self.images.device)]


class Normalize:
    """uint8 -> float32 ``(x / 255 - mean) / std`` per channel (the dataset's statistics), with
    the training augmentation, if any, applied in between to the [0, 1] images."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != len(std) or any(value <= 0 for value in std):
            raise ValueError(f"mean {mean} and std {std} must be per channel, std > 0")
        self.std = torch.tensor([float(value) for value in std]).view(-1, 1, 1)
        self.mean = torch.tensor([float(value) for value in mean]).view(-1, 1, 1)
        self.scale = 1.0 / (255.0 * self.std)
        self.shift = self.mean / self.std
        #: The four constants on each device images came from (copied there once).
        self._on_device: dict[torch.device, tuple[Tensor, ...]] = {}

    def __call__(self, images: Tensor, augment: Augmentation | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """``images`` uint8 ``[..., C, H, W]`` on any device; ``augment`` needs the
        ``generator`` (a CPU one: its draws are moved to the images)."""
        scale, shift, mean, std = self._constants(images.device)
        if augment is None:
            return images.to(torch.float32).mul_(scale).sub_(shift)
        shape = images.shape
        flat = images.reshape(-1, *shape[-3:]).to(torch.float32).div_(255.0)
        flat = augment(flat, generator)
        return flat.sub_(mean).div_(std).reshape(shape)

    def _constants(self, device: torch.device) -> tuple[Tensor, ...]:
        constants = (self.scale, self.shift, self.mean, self.std)
        if device == self.scale.device:
            return constants
        if device not in self._on_device:
            self._on_device[device] = tuple(value.to(device) for value in constants)
        return self._on_device[device]


class ClassSplit:
    """The classes of one split: class ``c`` is rows ``start[c] .. start[c] + count[c] - 1``."""

    def __init__(self, names: Sequence[str], start: Tensor, count: Tensor) -> None:
        if not (len(names) == start.numel() == count.numel()) or start.dim() != 1:
            raise ValueError("names, start and count must be of equal length")
        self.names = list(names)
        self.start = start.long()
        self.count = count.long()

    def __len__(self) -> int:
        return len(self.names)

    @property
    def fewest(self) -> tuple[int, str]:
        """The smallest class: (images, name)."""
        position = int(self.count.argmin())
        return int(self.count[position]), self.names[position]


class ClassRowsSampler:
    """N-way K-shot tasks from a ``ClassSplit`` of an ``ImageRows`` store.

    Distinct classes per task and distinct images per class, uniformly at random: the top-k of
    i.i.d. uniform keys, with the keys of rows past a class's end pushed below every real key.
    ``augment`` (training only) is applied to the whole meta-batch as tensor ops.
    """

    def __init__(self, images: ImageRows | DeviceImageRows, split: ClassSplit, ways: int,
                 shots: int, queries: int, normalize: Normalize,
                 augment: Augmentation | None = None) -> None:
        if not 1 <= ways <= len(split):
            raise ValueError(f"ways={ways} needs 1..{len(split)} classes")
        if shots < 1 or queries < 1 or shots + queries > split.fewest[0]:
            raise ValueError(f"shots={shots}, queries={queries}: a class has {split.fewest[0]}")
        self.images = images
        self.split = split
        self.ways, self.shots, self.queries = ways, shots, queries
        self.normalize = normalize
        self.augment = augment
        self.widest = int(split.count.max())
        self.positions = torch.arange(self.widest)

    @property
    def num_classes(self) -> int:
        return len(self.split)

    def sample(self, meta_batch_size: int, generator: torch.Generator) -> TaskBatch:
        batch, ways, shots, queries = meta_batch_size, self.ways, self.shots, self.queries
        keys = torch.rand(batch, self.num_classes, generator=generator)
        classes = keys.topk(ways, dim=1).indices  # [B, N]
        counts = self.split.count[classes]  # [B, N]
        keys = torch.rand(batch, ways, self.widest, generator=generator)
        keys.masked_fill_(self.positions >= counts.unsqueeze(-1), -1.0)
        picks = keys.topk(shots + queries, dim=2).indices  # [B, N, K+Q]
        rows = self.split.start[classes].unsqueeze(-1) + picks
        # Support and query rows are gathered apart, so the images land in their final layout
        # and are converted once, never copied again to split them.
        support_x = self.normalize(self.images.gather(rows[:, :, :shots].reshape(batch, -1)),
                                   self.augment, generator)
        query_x = self.normalize(self.images.gather(rows[:, :, shots:].reshape(batch, -1)),
                                 self.augment, generator)
        labels = torch.arange(ways, device=support_x.device)
        support_y = labels.repeat_interleave(shots).repeat(batch, 1)
        query_y = labels.repeat_interleave(queries).repeat(batch, 1)
        return TaskBatch(support_x, support_y, query_x, query_y)


class RowBatchSampler:
    """Mini-batches of images drawn uniformly (with replacement) from all images of a split,
    labelled by class index within the split: pre-training for the transfer baselines."""

    def __init__(self, images: ImageRows | DeviceImageRows, split: ClassSplit, batch_size: int,
                 normalize: Normalize, augment: Augmentation | None = None) -> None:
        if len(split) < 1 or batch_size < 1:
            raise ValueError(f"need classes and batch_size >= 1, got {batch_size}")
        self.images = images
        self.split = split
        self.batch_size = batch_size
        self.normalize = normalize
        self.augment = augment
        self.ends = split.count.cumsum(0)  # image i of the split belongs to the first end > i

    @property
    def num_classes(self) -> int:
        return len(self.split)

    def sample(self, generator: torch.Generator) -> LabeledBatch:
        total = int(self.ends[-1])
        picks = torch.randint(total, (self.batch_size,), generator=generator)
        labels = torch.searchsorted(self.ends, picks, right=True)
        first_of_class = self.ends[labels] - self.split.count[labels]
        rows = self.split.start[labels] + (picks - first_of_class)
        images = self.normalize(self.images.gather(rows), self.augment, generator)
        return LabeledBatch(images, labels.to(images.device))
