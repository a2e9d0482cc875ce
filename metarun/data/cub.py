"""CUB-200-2011 (Wah et al. 2011): 200 bird species, the few-shot split of Chen et al. 2019.

Files: ``<root>/cub/CUB_200_2011/images/<NNN.Name>/*.jpg`` as the official archive extracts,
or the archive itself, ``<root>/cub/CUB_200_2011.tgz``, read in place (the folder wins when both
are there: it needs no decompression). The archive is downloaded with its md5 when neither is
there. Every image is decoded once, resized to ``image_size`` (84 by default), into the cache;
classes keep their own image counts (41 to 60).

The split is that of Chen et al. 2019 ("A Closer Look at Few-shot Classification",
``filelists/CUB/write_CUB_filelist.py``): the class folders sorted by name, class ``i`` goes to
meta-train when ``i % 2 == 0``, to meta-val when ``i % 4 == 1`` and to meta-test when
``i % 4 == 3``: 100 / 50 / 50 classes.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import tarfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from metarun.data.download import download
from metarun.data.image_cache import CachePlan, decode_parallel, fingerprint
from metarun.data.image_dataset import ImageDataset
from metarun.data.image_files import decode_image, is_image_file
from metarun.data.source_index import remembered
from metarun.errors import DataError, short_reason

log = logging.getLogger(__name__)

ARCHIVE_NAME = "CUB_200_2011.tgz"
ARCHIVE_URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz?download=1"
#: The md5 of the official archive, as in torchmeta's and pytorch-metric-learning's CUB loaders.
ARCHIVE_MD5 = "97eceeb196236b17998738112f37df78"
IMAGES = "CUB_200_2011/images"
SPECIES = 200
#: Bumped when what is read from the sources (the listing, the row order) changes.
FORMAT = "cub/v1"
#: Encoded images held at a time while the archive streams past (about 90 KB each).
ARCHIVE_BATCH = 2048


class CUB(ImageDataset):
    """CUB-200-2011 with the split of Chen et al. 2019; ImageNet's normalisation."""

    name = "cub"
    archive_url = ARCHIVE_URL
    archive_md5 = ARCHIVE_MD5

    def plan(self) -> CachePlan:
        images, archive = self.folder / IMAGES, self.folder / ARCHIVE_NAME
        if images.is_dir():
            listing = _list_folder(images)
            key = fingerprint([images / cls / member for cls, members in listing.items()
                               for member in members], FORMAT)
            fill = self._folder_fill(images, listing)
        else:
            if not archive.is_file():
                if not self.download:
                    raise DataError(
                        f"cub: neither {images}/ nor {archive} exists and dataset.download=false; "
                        f"put the official {ARCHIVE_NAME} ({self.archive_url}) there, extracted or "
                        f"not, or set dataset.download=true"
                    )
                download(self.archive_url, archive, self.archive_md5, "CUB-200-2011")
            key = fingerprint([archive], FORMAT)
            listing = remembered(self.cache_dir / "cub-sources.json", key,
                                 lambda: _list_archive(archive))
            fill = self._archive_fill(archive, listing)
        classes = sorted(listing)
        if len(classes) != SPECIES:
            log.warning("cub: %d classes, not the %d of CUB-200-2011: the split below is Chen et "
                        "al.'s rule over these classes, not their split", len(classes), SPECIES)
        return CachePlan(self.name, key, classes, [len(listing[cls]) for cls in classes],
                         chen_split(classes), self.input_shape, fill)

    def _folder_fill(self, images: Path,
                     listing: dict[str, list[str]]) -> Callable[[np.ndarray], None]:
        jobs = [(images / cls / member, f"{IMAGES}/{cls}/{member}")
                for cls in sorted(listing) for member in listing[cls]]

        def fill(out: np.ndarray) -> None:
            decode_parallel(out, jobs, lambda job: decode_image(job[0], job[1], self.image_size,
                                                                self.channels), "decoding cub")
        return fill

    def _archive_fill(self, archive: Path,
                      listing: dict[str, list[str]]) -> Callable[[np.ndarray], None]:
        rows, row = {}, 0
        for cls in sorted(listing):
            for member in listing[cls]:
                rows[f"{IMAGES}/{cls}/{member}"] = row
                row += 1

        def fill(out: np.ndarray) -> None:
            batch: list[tuple[int, str, bytes]] = []
            done = 0

            def flush() -> None:
                nonlocal done
                decoded = np.empty((len(batch), *out.shape[1:]), dtype=np.uint8)
                decode_parallel(decoded, batch, lambda job: decode_image(
                    job[2], f"{job[1]} in {archive}", self.image_size, self.channels),
                    f"decoding cub ({done + len(batch)}/{len(rows)})")
                out[[job[0] for job in batch]] = decoded
                done += len(batch)
                batch.clear()

            for info, read in _archive_members(archive):
                name = info.name.removeprefix("./")
                if name in rows:
                    batch.append((rows[name], name, read()))
                    if len(batch) == ARCHIVE_BATCH:
                        flush()
            if batch:
                flush()
            if done != len(rows):
                raise DataError(f"cub: {archive} changed while it was read ({done} of "
                                f"{len(rows)} images found); run again")
        return fill


def chen_split(classes: list[str]) -> dict[str, list[str]]:
    """Chen et al.'s rule over the classes sorted by name: 100 / 50 / 50 of CUB's 200."""
    ordered = sorted(classes)
    return {"train": [cls for i, cls in enumerate(ordered) if i % 2 == 0],
            "val": [cls for i, cls in enumerate(ordered) if i % 4 == 1],
            "test": [cls for i, cls in enumerate(ordered) if i % 4 == 3]}


def _list_folder(images: Path) -> dict[str, list[str]]:
    listing = {}
    for entry in sorted(os.scandir(images), key=lambda entry: entry.name):
        if entry.is_dir() and not entry.name.startswith("."):
            listing[entry.name] = sorted(name for name in os.listdir(entry.path)
                                         if is_image_file(Path(name)))
    return _checked(listing, f"{images}/")


def _list_archive(archive: Path) -> dict[str, list[str]]:
    listing: dict[str, list[str]] = {}
    for info, _ in _archive_members(archive):
        parts = info.name.removeprefix("./").rstrip("/").split("/")
        if "/".join(parts[:2]) != IMAGES or len(parts) not in (3, 4) or \
                parts[2].startswith(".") or (len(parts) == 3 and not info.isdir()):
            continue
        members_of = listing.setdefault(parts[2], [])  # a class folder, even an empty one
        if len(parts) == 4 and info.isfile() and is_image_file(Path(parts[3])):
            members_of.append(parts[3])
    return _checked({cls: sorted(members) for cls, members in listing.items()},
                    f"{IMAGES}/ in {archive}")


def _checked(listing: dict[str, list[str]], where: str) -> dict[str, list[str]]:
    if not listing:
        raise DataError(f"cub: no class folders in {where}: expected <NNN.Name>/<image>.jpg as "
                        f"in the official {ARCHIVE_NAME}")
    empty = [cls for cls, members in listing.items() if not members]
    if empty:
        raise DataError(f"cub: class folder {empty[0]} in {where} has no images; the data is "
                        f"incomplete, replace it with the official {ARCHIVE_NAME}")
    return listing


def _archive_members(archive: Path) -> Iterator[tuple[tarfile.TarInfo, Callable[[], bytes]]]:
    """``(member, read)`` pairs of a tar archive as it streams past; a read failure anywhere is
    a one-line error naming the archive."""
    failures = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError)

    def corrupt(error: BaseException) -> DataError:
        return DataError(f"cub: {archive} is not a readable tar.gz archive "
                         f"({short_reason(error)}): it is truncated or corrupt; delete it and "
                         f"download it again (dataset.download=true) or put the official file "
                         f"there")

    def read(tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes:
        try:
            return tar.extractfile(info).read()
        except failures as error:
            raise corrupt(error) from error

    try:
        with tarfile.open(archive, "r:*") as tar:
            for info in tar:
                yield info, functools.partial(read, tar, info)
    except failures as error:
        raise corrupt(error) from error
