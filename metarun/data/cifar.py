"""CIFAR-FS and FC100: few-shot splits of CIFAR-100's classes, from the official archive.

Both read ``cifar-100-python.tar.gz`` (https://www.cs.toronto.edu/~kriz/cifar.html) in
``<root>/<name>/`` or ``<root>/cifar100/`` (or its extracted ``cifar-100-python/`` folder there),
downloading it with its md5 into ``<root>/<name>/`` when missing. CIFAR's train and test sets are
pooled, 600 images per class, 32x32 RGB (another ``image_size`` resizes with LANCZOS, as every
other image dataset). Every split is a set of the 100 fine classes; the lists ship with metarun
in ``metarun/data/splits/<name>/{train,val,test}.txt`` and say where they come from:

- ``cifarfs`` (Bertinetto et al. 2019, "Meta-learning with differentiable closed-form solvers"):
  64 / 16 / 20 classes, listed by name.
- ``fc100`` (Oreshkin et al. 2018, "TADAM"): 12 / 4 / 4 superclasses, listed by name, so that no
  superclass spans two splits: 60 / 20 / 20 classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from metarun.data import cifar_files
from metarun.data.cifar_files import Cifar100, CifarSource, find_source, read_cifar100
from metarun.data.image_cache import CachePlan, decode_parallel, fingerprint
from metarun.data.image_dataset import PHASES, ImageDataset
from metarun.data.source_index import remembered
from metarun.errors import DataError

#: CIFAR-100's per-channel statistics over its training images.
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
SPLITS_DIR = Path(__file__).with_name("splits")
#: Bumped when what is read from the sources (the listing, the row order) changes.
FORMAT = "cifar-100-python/v1"
#: Images copied into the cache at a time (32x32 RGB, no resize): bounds the copy's memory.
COPY_ROWS = 4096


class CifarFewShot(ImageDataset):
    """What CIFAR-FS and FC100 share; a subclass says what its split lists name (``groups``)."""

    default_mean = CIFAR100_MEAN
    default_std = CIFAR100_STD
    archive_url = cifar_files.ARCHIVE_URL
    archive_md5 = cifar_files.ARCHIVE_MD5
    #: What one line of a split list names, for errors.
    list_kind = "class"
    _parsed: Cifar100 | None = None

    def __init__(self, root: str, cache_dir: str | None = None, download: bool = True,
                 image_size: int = 32, **kwargs: object) -> None:
        try:
            super().__init__(root, cache_dir, download, image_size, **kwargs)
        finally:
            self._parsed = None  # the archive's arrays, once the cache holds them

    def plan(self) -> CachePlan:
        folders = [self.folder]
        if self.folder.name != "cifar100":
            folders.append(self.folder.parent / "cifar100")
        source = find_source(self.name, folders, self.download, self.archive_url,
                             self.archive_md5)
        key = fingerprint(source.files(), FORMAT)
        listing = remembered(self.cache_dir / f"{self.name}-sources.json", key,
                             lambda: self._listing(source))
        present = [index for index, count in enumerate(listing["counts"]) if count > 0]
        classes = [listing["fine_names"][index] for index in present]
        splits = self._splits(listing, source)

        def fill(out: np.ndarray) -> None:
            parsed, self._parsed = self._parsed or read_cifar100(source, self.name), None
            _fill(out, parsed, self.name)

        return CachePlan(self.name, key, classes, [listing["counts"][i] for i in present],
                         splits, self.input_shape, fill)

    def _listing(self, source: CifarSource) -> dict:
        """Class names, image counts and each class's superclass; keeps the images read for the
        fill, so a first run reads the archive once."""
        parsed = self._parsed = read_cifar100(source, self.name)
        counts = np.bincount(parsed.fine, minlength=len(parsed.fine_names))
        coarse_of = []
        for index, fine_name in enumerate(parsed.fine_names):
            owners = np.unique(parsed.coarse[parsed.fine == index])
            if owners.size > 1:
                raise DataError(f"{self.name}: {source.path}: class {fine_name} has images in "
                                f"{owners.size} superclasses; replace it with the official file "
                                f"({self.archive_url})")
            coarse_of.append(int(owners[0]) if owners.size else -1)
        return {"fine_names": parsed.fine_names, "coarse_names": parsed.coarse_names,
                "counts": counts.tolist(), "coarse_of": coarse_of}

    def _splits(self, listing: dict, source: CifarSource) -> dict[str, list[str]]:
        fine_names, counts = listing["fine_names"], listing["counts"]
        groups = self.groups(listing)
        owner: dict[str, str] = {}
        splits = {}
        for phase in PHASES:
            path = SPLITS_DIR / self.name / f"{phase}.txt"
            names = read_split_list(path)
            absent = [item for item in names
                      if not any(counts[fine] for fine in groups.get(item, []))]
            if absent:
                raise DataError(
                    f"{self.name}: the {phase} split list {path} names {len(absent)} "
                    f"{self.list_kind}(es) that {source.path} has no images of, e.g. "
                    f"{absent[0]!r}; it is not the official CIFAR-100, replace it with "
                    f"{self.archive_url}"
                )
            for item in names:
                if owner.setdefault(item, phase) != phase:
                    raise DataError(f"{self.name}: {item!r} is in the {owner[item]} and {phase} "
                                    f"split lists ({SPLITS_DIR / self.name}); splits must not "
                                    f"share classes")
            splits[phase] = [fine_names[fine] for item in names for fine in groups[item]
                             if counts[fine]]
        return splits

    def groups(self, listing: dict) -> dict[str, list[int]]:
        """What a split list can name -> the fine labels it stands for."""
        raise NotImplementedError


class CIFARFS(CifarFewShot):
    """CIFAR-FS (Bertinetto et al. 2019): 64 / 16 / 20 CIFAR-100 classes."""

    name = "cifarfs"
    list_kind = "class"

    def groups(self, listing: dict) -> dict[str, list[int]]:
        return {name: [fine] for fine, name in enumerate(listing["fine_names"])}


class FC100(CifarFewShot):
    """FC100 (Oreshkin et al. 2018): 12 / 4 / 4 CIFAR-100 superclasses (60 / 20 / 20 classes)."""

    name = "fc100"
    list_kind = "superclass"

    def groups(self, listing: dict) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = {name: [] for name in listing["coarse_names"]}
        for fine, coarse in enumerate(listing["coarse_of"]):
            if coarse >= 0:  # -1: a class without images
                groups[listing["coarse_names"][coarse]].append(fine)
        return groups


def read_split_list(path: Path) -> list[str]:
    """One name a line; blank lines and ``#`` comments (the list's source) are skipped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"cannot read split list {path} ({error}); reinstall metarun") from error
    names = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    if not names or len(set(names)) != len(names):
        raise DataError(f"split list {path} is empty or names a class twice; reinstall metarun")
    return names


def _fill(out: np.ndarray, parsed: Cifar100, name: str) -> None:
    """Rows in class order (fine label), each class's images in file order, train before test."""
    order = np.argsort(parsed.fine, kind="stable")
    if tuple(out.shape[1:]) == cifar_files.IMAGE_SHAPE:
        for first in range(0, len(order), COPY_ROWS):
            out[first:first + COPY_ROWS] = parsed.images[order[first:first + COPY_ROWS]]
        return
    channels, size = out.shape[1], out.shape[2]

    def resize(row: int) -> np.ndarray:
        image = Image.fromarray(parsed.images[row].transpose(1, 2, 0))
        image = image.convert("RGB" if channels == 3 else "L")
        if size != image.size[0]:
            image = image.resize((size, size), Image.Resampling.LANCZOS)
        array = np.asarray(image, dtype=np.uint8)
        return array[None] if channels == 1 else array.transpose(2, 0, 1)

    decode_parallel(out, order.tolist(), resize, f"resizing {name}")
