"""CIFAR-100's python version on disk: the official archive (read in place) or its folder -> arrays.

The archive holds three pickles, ``cifar-100-python/{train,test,meta}``: ``train`` and ``test``
are dicts with ``data`` (uint8 ``[N, 3072]``: the red, green and blue 32x32 planes of an image,
row-major, i.e. already ``[3, 32, 32]``), ``fine_labels`` and ``coarse_labels``; ``meta`` names
them (``fine_label_names``, ``coarse_label_names``). The archive is read member by member as
it streams past, never extracted, and the pickles are loaded by an unpickler that builds numpy
arrays and nothing else: a foreign pickle fails with a one-line error instead of running code.
"""

from __future__ import annotations

import gzip
import io
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metarun.data.download import download
from metarun.data.pickled_images import string_keys, unpickle_arrays
from metarun.errors import DataError, short_reason

ARCHIVE_NAME = "cifar-100-python.tar.gz"
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
#: torchvision's CIFAR100.tgz_md5, the md5 of the official file.
ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
TOP = "cifar-100-python"
#: CIFAR's own train and test sets; the few-shot splits pool them (500 + 100 images a class).
PARTS = ("train", "test")
MEMBERS = ("meta", *PARTS)
IMAGE_SHAPE = (3, 32, 32)


@dataclass(frozen=True)
class CifarSource:
    """The official archive, or the ``cifar-100-python/`` folder it extracts to."""

    path: Path
    is_archive: bool

    def files(self) -> list[Path]:
        """What must invalidate the cache when it changes."""
        if self.is_archive:
            return [self.path]
        return [self.path / member for member in MEMBERS if (self.path / member).is_file()]

    def where(self, member: str) -> str:
        """How an error names one of the three pickles."""
        if self.is_archive:
            return f"{TOP}/{member} in {self.path}"
        return str(self.path / member)


@dataclass
class Cifar100:
    """All 60,000 images, CIFAR's train set first, and their labels."""

    images: np.ndarray  # uint8 [N, 3, 32, 32]
    fine: np.ndarray  # int64 [N], an index into fine_names
    coarse: np.ndarray  # int64 [N], an index into coarse_names
    fine_names: list[str]
    coarse_names: list[str]


def find_source(name: str, folders: list[Path], allow_download: bool, url: str = ARCHIVE_URL,
                md5: str = ARCHIVE_MD5) -> CifarSource:
    """The first of ``folders`` holding the archive (or else its extracted folder); downloaded
    into the first folder when none does and downloading is allowed."""
    for folder in folders:
        if (folder / ARCHIVE_NAME).is_file():
            return CifarSource(folder / ARCHIVE_NAME, True)
        if (folder / TOP).is_dir():
            return CifarSource(folder / TOP, False)
    if not allow_download:
        where = " or ".join(str(folder) for folder in folders)
        raise DataError(
            f"{name}: {ARCHIVE_NAME} not found in {where} and dataset.download=false; put the "
            f"official archive ({url}) or its extracted {TOP}/ folder there, or set "
            f"dataset.download=true"
        )
    return CifarSource(download(url, folders[0] / ARCHIVE_NAME, md5, "CIFAR-100"), True)


def read_cifar100(source: CifarSource, name: str) -> Cifar100:
    """The images and labels of both parts, checked for the official format."""
    loaded = {}
    for member, blob in _members(source, name):
        loaded[member] = _unpickle(blob, source.where(member), name)
    meta = loaded["meta"]
    fine_names = _names(meta, "fine_label_names", source, name)
    coarse_names = _names(meta, "coarse_label_names", source, name)
    images, fine, coarse = [], [], []
    for part in PARTS:
        data, part_fine, part_coarse = _part(loaded.pop(part), len(fine_names),
                                             len(coarse_names), source.where(part), name)
        images.append(data)
        fine.append(part_fine)
        coarse.append(part_coarse)
    return Cifar100(np.concatenate(images).reshape(-1, *IMAGE_SHAPE), np.concatenate(fine),
                    np.concatenate(coarse), fine_names, coarse_names)


def _members(source: CifarSource, name: str) -> list[tuple[str, bytes]]:
    if not source.is_archive:
        found = []
        for member in MEMBERS:
            path = source.path / member
            if not path.is_file():
                raise DataError(f"{name}: {source.path} has no {member} file; extract the official "
                                f"{ARCHIVE_NAME} ({ARCHIVE_URL}) again")
            found.append((member, path.read_bytes()))
        return found
    wanted = {f"{TOP}/{member}": member for member in MEMBERS}
    found = []
    try:
        with tarfile.open(source.path, "r:*") as archive:
            for info in archive:
                member = wanted.get(info.name.removeprefix("./"))
                if member is not None and info.isfile():
                    found.append((member, archive.extractfile(info).read()))
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError) as error:
        raise DataError(
            f"{name}: {source.path} is not a readable tar.gz archive ({short_reason(error)}): it "
            f"is truncated or corrupt; delete it and download it again (dataset.download=true) or "
            f"put the official file there"
        ) from error
    missing = [member for member in MEMBERS if member not in dict(found)]
    if missing:
        raise DataError(f"{name}: {source.path} has no {TOP}/{missing[0]}: it is not the official "
                        f"CIFAR-100 python archive; replace it with {ARCHIVE_URL}")
    return found


def _unpickle(blob: bytes, where: str, name: str) -> dict:
    try:
        value = unpickle_arrays(io.BytesIO(blob))
    except Exception as error:  # a torn or foreign pickle fails in many ways; all mean replace it
        raise DataError(f"{name}: {where} is not a CIFAR-100 pickle ({short_reason(error)}); "
                        f"replace it with the official file ({ARCHIVE_URL})") from error
    if not isinstance(value, dict):
        raise DataError(f"{name}: {where} holds a {type(value).__name__}, not CIFAR-100's dict; "
                        f"replace it with the official file ({ARCHIVE_URL})")
    return string_keys(value)


def _names(meta: dict, key: str, source: CifarSource, name: str) -> list[str]:
    names = meta.get(key)
    if not isinstance(names, list) or not names or not all(isinstance(item, str | bytes)
                                                           for item in names):
        raise DataError(f"{name}: {source.where('meta')} has no {key} list; replace it with the "
                        f"official file ({ARCHIVE_URL})")
    return [item.decode("latin1") if isinstance(item, bytes) else item for item in names]


def _part(part: dict, fine_classes: int, coarse_classes: int, where: str,
          name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    data = part.get("data")
    pixels = int(np.prod(IMAGE_SHAPE))
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or \
            data.shape[1] != pixels:
        shown = (f"{data.dtype} {list(data.shape)}" if isinstance(data, np.ndarray)
                 else type(data).__name__)
        raise DataError(f"{name}: the data of {where} is {shown}, not uint8 [N, {pixels}]; "
                        f"replace it with the official file ({ARCHIVE_URL})")
    labels = []
    for key, classes in (("fine_labels", fine_classes), ("coarse_labels", coarse_classes)):
        try:
            values = np.asarray(part.get(key), dtype=np.int64)
        except (TypeError, ValueError):
            values = np.empty(0, dtype=np.int64)
        if values.shape != (data.shape[0],) or (values.size and (
                values.min() < 0 or values.max() >= classes)):
            raise DataError(f"{name}: the {key} of {where} are not {data.shape[0]} labels in "
                            f"0..{classes - 1}; replace it with the official file "
                            f"({ARCHIVE_URL})")
        labels.append(values)
    return data, labels[0], labels[1]
