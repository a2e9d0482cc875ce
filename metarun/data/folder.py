"""A user's own images: ``dataset.path=<dir>``, in either of two layouts, any format PIL reads.

- ``<dir>/<class>/<images>``: the classes are split into meta-train / val / test either
  - by ``dataset.split_ratios`` and ``dataset.split_seed`` (the default): class names sorted,
    shuffled by ``numpy.random.RandomState(seed).permutation`` (a stream numpy keeps fixed across
    versions), then cut where the cumulative ratios fall, ``round(n * r_train)`` and
    ``round(n * (r_train + r_val))`` (Python's round); the same folder and seed always give the
    same split; or
  - by ``dataset.split_lists=<list dir>`` holding ``train.txt``, ``val.txt`` and ``test.txt``,
    one class folder name a line (classes listed nowhere are not used).
- ``<dir>/{train,val,test}/<class>/<images>``: taken as it is, detected when any of the three
  folders exists (so ``train``, ``val`` and ``test`` cannot be class names of the first layout).

A class is a direct sub-folder holding images; hidden files and folders, and files whose suffix
is not an image's (``image_files.IMAGE_SUFFIXES``), are ignored. Images are decoded once, resized
to ``dataset.image_size`` and converted to ``dataset.channels``, into a cache in
``<dir>/.metarun-cache`` (or the user's cache folder when ``<dir>`` is read-only, or
``dataset.cache_dir``). The cache holds images in class order, not the split: changing the split
reuses it. Its name carries a digest of the folder's absolute path and the split's mode, so two
folders never share one; its fingerprint covers every image file.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from metarun.data.image_cache import CachePlan, decode_parallel, fingerprint
from metarun.data.image_dataset import PHASES, ImageDataset
from metarun.data.image_files import IMAGE_SUFFIXES, decode_image, is_image_file
from metarun.errors import ConfigError, DataError

LAYOUTS = "<dir>/<class>/<images> or <dir>/{train,val,test}/<class>/<images>"
MIN_CLASSES = 2


class FolderDataset(ImageDataset):
    """Built by Hydra from ``dataset.*``; ``root`` and ``download`` are accepted and ignored."""

    name = "folder"
    # No statistics are known for a user's images: (x - 0.5) / 0.5 maps [0, 1] to [-1, 1].
    default_mean = (0.5, 0.5, 0.5)
    default_std = (0.5, 0.5, 0.5)
    cache_subfolder = ".metarun-cache"

    def __init__(
        self,
        path: str | None = None,
        split_ratios: Sequence[float] = (0.64, 0.16, 0.20),
        split_seed: int = 0,
        split_lists: str | None = None,
        root: str = "",
        **common: Any,
    ) -> None:
        """``common``: ImageDataset's keys (cache_dir, image_size, channels, mean, std, ...)."""
        self.path = _data_path(path)
        self.split_ratios = _checked_ratios(split_ratios)
        if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
            raise ConfigError(f"dataset.split_seed must be an integer >= 0, got {split_seed!r}")
        self.split_seed = split_seed
        self.split_lists = Path(split_lists).expanduser().resolve() if split_lists else None
        super().__init__(root=root, **common)

    def data_folder(self, root: str) -> Path:
        return self.path

    def plan(self) -> CachePlan:
        mode, splits, folders = self._find_splits()
        classes = sorted(folders)
        files = [_class_images(folders[name]) for name in classes]
        rows = [file for class_files in files for file in class_files]
        size, channels = self.image_size, self.channels

        def fill(out: np.ndarray) -> None:
            decode_parallel(out, rows, lambda file: decode_image(file, str(file), size, channels),
                            f"folder {self.path}")

        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", self.path.name)[:40] or "root"
        digest = hashlib.sha256(f"{self.path}\n{mode}".encode()).hexdigest()[:10]
        return CachePlan(
            name=f"folder-{slug}-{digest}",
            fingerprint=fingerprint(rows, mode),
            classes=classes,
            counts=[len(class_files) for class_files in files],
            splits=splits,
            image_shape=self.input_shape,
            fill=fill,
        )

    # ------------------------------------------------------------------ the three ways to split
    def _find_splits(self) -> tuple[str, dict[str, list[str]], dict[str, Path]]:
        """The split's mode, each phase's class names and each class's folder."""
        present = [phase for phase in PHASES if (self.path / phase).is_dir()]
        if present:
            return self._phase_folders(present)
        folders = {folder.name: folder for folder in _class_folders(self.path)}
        if not folders:
            raise DataError(f"folder: no class folders found in {self.path}; expected {LAYOUTS}")
        if self.split_lists is not None:
            splits = self._listed(folders)
            listed = {name: folders[name] for names in splits.values() for name in names}
            return "lists", splits, listed
        return "ratios", self._cut(sorted(folders)), folders

    def _phase_folders(self, present: list[str]) -> tuple[str, dict, dict]:
        if len(present) < len(PHASES):
            absent = [f"{phase}/" for phase in PHASES if phase not in present]
            raise DataError(f"folder: {self.path} has {', '.join(p + '/' for p in present)} but "
                            f"no {', '.join(absent)}; the split layout needs all three (expected "
                            f"{LAYOUTS})")
        if self.split_lists is not None:
            raise ConfigError(f"dataset.split_lists={self.split_lists} is for the <dir>/<class>/ "
                              f"layout, but {self.path} is split into train/ val/ test/ already; "
                              f"unset dataset.split_lists")
        splits, folders = {}, {}
        for phase in PHASES:
            names = []
            for folder in _class_folders(self.path / phase):
                names.append(f"{phase}/{folder.name}")
                folders[names[-1]] = folder
            if len(names) < MIN_CLASSES:
                raise DataError(f"folder: {self.path / phase} has {len(names)} class folder(s) "
                                f"but a split needs at least {MIN_CLASSES}; add class folders")
            splits[phase] = names
        return "phase-folders", splits, folders

    def _cut(self, names: list[str]) -> dict[str, list[str]]:
        order = np.random.RandomState(self.split_seed).permutation(len(names))
        shuffled = [names[position] for position in order]
        train_end = round(len(names) * self.split_ratios[0])
        val_end = round(len(names) * (self.split_ratios[0] + self.split_ratios[1]))
        splits = {"train": shuffled[:train_end], "val": shuffled[train_end:val_end],
                  "test": shuffled[val_end:]}
        for phase, members in splits.items():
            if len(members) < MIN_CLASSES:
                raise ConfigError(
                    f"folder: dataset.split_ratios={list(self.split_ratios)} gives the {phase} "
                    f"split {len(members)} of the {len(names)} classes in {self.path} but a split "
                    f"needs at least {MIN_CLASSES}; raise its ratio or add class folders"
                )
        return splits

    def _listed(self, folders: dict[str, Path]) -> dict[str, list[str]]:
        owner: dict[str, str] = {}
        splits = {}
        for phase in PHASES:
            list_file = self.split_lists / f"{phase}.txt"
            try:
                lines = list_file.read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as error:
                raise DataError(f"folder: cannot read split list {list_file} "
                                f"({type(error).__name__}); dataset.split_lists must hold "
                                f"train.txt, val.txt and test.txt, one class name a line") from None
            names = []
            for number, line in enumerate(lines, start=1):
                name = line.strip()
                if not name:
                    continue
                where = f"{list_file}, line {number}"
                if name not in folders:
                    raise DataError(f"folder: {where}: class {name!r} is not a class folder of "
                                    f"{self.path}; fix the list or add the folder")
                if name in owner:
                    raise DataError(f"folder: {where}: class {name!r} is listed in "
                                    f"{owner[name]}.txt already; a class belongs to one split")
                owner[name] = phase
                names.append(name)
            if len(names) < MIN_CLASSES:
                raise DataError(f"folder: {list_file} lists {len(names)} class(es) but a split "
                                f"needs at least {MIN_CLASSES}; list more classes")
            splits[phase] = names
        return splits


def _data_path(path: str | None) -> Path:
    if path is None or not str(path).strip():
        raise ConfigError(f"dataset.path is not set; point it at a folder of images laid out as "
                          f"{LAYOUTS}")
    folder = Path(str(path)).expanduser().resolve()
    if not folder.is_dir():
        raise DataError(f"dataset.path={path} is not a folder; point it at a folder of images "
                        f"laid out as {LAYOUTS}")
    return folder


def _checked_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    try:
        values = [] if isinstance(ratios, str) else list(ratios)
    except TypeError:
        values = []
    numbers = all(isinstance(value, int | float) and not isinstance(value, bool)
                  and math.isfinite(value) for value in values)
    if len(values) != len(PHASES) or not numbers or min(values) < 0 \
            or not math.isclose(sum(values), 1.0, abs_tol=1e-6):
        raise ConfigError(f"dataset.split_ratios={values or ratios!r} must be three numbers >= 0 "
                          f"(train, val, test) that sum to 1, e.g. [0.64, 0.16, 0.2]")
    return float(values[0]), float(values[1]), float(values[2])


def _class_folders(folder: Path) -> list[Path]:
    return sorted(entry for entry in folder.iterdir()
                  if entry.is_dir() and not entry.name.startswith("."))


def _class_images(folder: Path) -> list[Path]:
    images = sorted(entry for entry in folder.iterdir() if is_image_file(entry) and entry.is_file())
    if not images:
        raise DataError(f"folder: class folder {folder} has no images (files ending in "
                        f"{', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove the folder")
    return images
