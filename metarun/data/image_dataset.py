"""What every class-labelled image dataset shares: cache, splits, normalisation, samplers.

A dataset module (mini-ImageNet, tiered-ImageNet, CIFAR-FS, FC100, CUB, folder) subclasses
``ImageDataset`` and implements one method, ``plan()``: find the files (one-line errors saying
which are missing, where, and how to get them), list the classes of each split, and say how to
write the images into the cache. Everything after that, the trainer's view of a dataset, is here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from metarun.checks import auto_or_bool, positive_int
from metarun.data.augment import build_augmentation
from metarun.data.image_cache import CachePlan, default_cache_dir, load_or_build
from metarun.data.images import (
    ClassRowsSampler,
    ClassSplit,
    DeviceImageRows,
    Normalize,
    RowBatchSampler,
)
from metarun.data.on_device import store_device
from metarun.errors import ConfigError

PHASES = ("train", "val", "test")
#: ImageNet's per-channel statistics (torchvision's), for datasets drawn from ImageNet-like photos.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ImageDataset:
    """Built by Hydra from ``dataset.*``; subclasses set ``name`` and implement ``plan``."""

    task_type = "classification"
    name = "images"
    default_mean: Sequence[float] = IMAGENET_MEAN
    default_std: Sequence[float] = IMAGENET_STD
    #: The cache's folder inside the data folder (when that is writable and no cache_dir is set).
    cache_subfolder = "cache"

    def __init__(
        self,
        root: str,
        cache_dir: str | None = None,
        download: bool = True,
        image_size: int = 84,
        channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        augment: object = None,
        in_memory: bool | None = None,
        on_device: object = "auto",
    ) -> None:
        self.on_device = auto_or_bool(on_device, "dataset.on_device")
        self.image_size = positive_int(image_size, "dataset.image_size")
        self.channels = positive_int(channels, "dataset.channels")
        if self.channels not in (1, 3):
            raise ConfigError(f"dataset.channels={channels} must be 1 (grayscale) or 3 (RGB)")
        self.input_shape = (self.channels, self.image_size, self.image_size)
        self.normalize = Normalize(*self._statistics(mean, std))
        self.augment = build_augmentation(augment)
        if in_memory is not None and not isinstance(in_memory, bool):
            raise ConfigError(f"dataset.in_memory={in_memory!r} must be true, false or null")
        self.download = download
        self.folder = self.data_folder(root)
        self.cache_dir = (Path(cache_dir).expanduser() if cache_dir
                          else default_cache_dir(self.folder, self.name, self.cache_subfolder))
        plan = self.plan()
        self.images, self.splits = load_or_build(plan, self.cache_dir, in_memory)

    def data_folder(self, root: str) -> Path:
        """Where this dataset's files are: ``<root>/<name>``; a user's folder overrides it."""
        return Path(root).expanduser() / self.name

    def plan(self) -> CachePlan:
        raise NotImplementedError

    # ------------------------------------------------------------------ what the trainer asks
    def place_on(self, device: torch.device) -> None:
        """The images on the run's ``device`` when ``on_device`` says so and they fit
        (``metarun.data.on_device``); called before any sampler is made."""
        if isinstance(self.images, DeviceImageRows):
            return
        target = store_device(self.on_device, math.prod(self.images.shape), device)
        if target is not None:
            self.images = self.images.to_device(target)

    def output_size(self, ways: int) -> int:
        return ways

    def num_classes(self, split_name: str) -> int:
        return len(self._split(split_name))

    def sampler(self, split_name: str, ways: int, shots: int, queries: int) -> ClassRowsSampler:
        """Checks the task shape against this split now, so a bad config fails before training;
        only the training split is augmented."""
        for key, value, minimum in (
            ("task.ways", ways, 2), ("task.shots", shots, 1), ("task.queries", queries, 1)
        ):
            if value < minimum:
                raise ConfigError(f"{key}={value} but it must be at least {minimum}")
        split = self._split(split_name)
        if ways > len(split):
            raise ConfigError(f"task.ways={ways} but the {split_name} split of {self.name} has "
                              f"only {len(split)} classes; lower task.ways")
        fewest, smallest = split.fewest
        if shots + queries > fewest:
            raise ConfigError(
                f"task.shots + task.queries = {shots + queries} but class {smallest} of the "
                f"{split_name} split of {self.name} has only {fewest} images; lower them"
            )
        augment = self.augment if split_name == "train" else None
        return ClassRowsSampler(self.images, split, ways, shots, queries, self.normalize, augment)

    def batch_sampler(self, split_name: str, batch_size: int) -> RowBatchSampler:
        """Labelled mini-batches over all images of a split, for pre-training (transfer
        baselines); labels are ``0 .. num_classes(split_name) - 1``."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch size {batch_size!r} must be an integer >= 1")
        augment = self.augment if split_name == "train" else None
        return RowBatchSampler(self.images, self._split(split_name), batch_size, self.normalize,
                               augment)

    def _split(self, split_name: str) -> ClassSplit:
        if split_name not in self.splits:
            raise ConfigError(f"unknown split {split_name!r}; choose one of "
                              f"{', '.join(self.splits)}")
        return self.splits[split_name]

    def _statistics(self, mean: Sequence[float] | None,
                    std: Sequence[float] | None) -> tuple[list[float], list[float]]:
        """Per-channel mean and std: the config's, else the dataset's (grayscale: their mean)."""
        values = []
        for key, given, default in (("mean", mean, self.default_mean),
                                    ("std", std, self.default_std)):
            chosen = list(given) if given is not None else list(default)
            if given is None and len(chosen) != self.channels:
                chosen = [sum(chosen) / len(chosen)] * self.channels
            if len(chosen) != self.channels or not all(
                isinstance(item, int | float) and not isinstance(item, bool) for item in chosen
            ):
                raise ConfigError(f"dataset.{key}={chosen} must be {self.channels} number(s), "
                                  f"one per channel")
            values.append([float(item) for item in chosen])
        if any(item <= 0 for item in values[1]):
            raise ConfigError(f"dataset.std={values[1]} must be positive")
        return values[0], values[1]
