"""Decode a dataset's images once into a raw uint8 file on disk; memory-map it on every later run.

A cache is two files in the cache folder: ``<name>-<C>x<H>x<W>-v<N>.u8`` (the images as
``[rows, C, H, W]``, rows grouped by class) and ``.json`` beside it (shape, classes in row order
and their image counts, and a fingerprint of the source files). Both are written under temporary
names and renamed into place, the images first and the description last, so a crash, a full disk
or two runs building at once never leave a cache that a later run would read: a cache is used
only when its description exists, matches the sources and the image file has exactly the size it
describes. Anything else is rebuilt, saying why.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import mmap
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from tqdm import tqdm

from metarun.data.images import ClassSplit, ImageRows
from metarun.errors import DataError

log = logging.getLogger(__name__)

CACHE_VERSION = 1
#: Stores up to this size keep the pages they touched (the whole dataset ends up in memory,
#: once); larger ones are read from the mapped file and release their pages after every gather.
RESIDENT_LIMIT_BYTES = 3 << 29  # 1.5 GiB
Job = TypeVar("Job")


@dataclass
class CachePlan:
    """What a dataset module hands over: where the images come from and how they are grouped.

    ``fill(out)`` writes every image into ``out`` (uint8 ``[sum(counts), C, H, W]``, a writable
    memory map) in class order: the rows of ``classes[0]`` first, ``counts[0]`` of them, then
    the next class's. It runs only when the cache must be (re)built.
    """

    name: str
    fingerprint: str
    classes: list[str]
    counts: list[int]
    splits: dict[str, list[str]]
    image_shape: tuple[int, int, int]
    fill: Callable[[np.ndarray], None]


def load_or_build(plan: CachePlan, cache_dir: Path,
                  resident: bool | None = None) -> tuple[ImageRows, dict[str, ClassSplit]]:
    """The images (memory-mapped) and the plan's splits as row ranges, building the cache first
    when it is missing, stale or torn."""
    channels, height, width = plan.image_shape
    stem = f"{plan.name}-{channels}x{height}x{width}-v{CACHE_VERSION}"
    data_path, description_path = cache_dir / f"{stem}.u8", cache_dir / f"{stem}.json"
    shape = (sum(plan.counts), channels, height, width)
    reason = _stale_reason(plan, shape, data_path, description_path)
    if reason is not None:
        log.info("%s: building %s (%s)", plan.name, data_path, reason)
        started = time.perf_counter()
        _build(plan, shape, data_path, description_path)
        log.info("%s: cached %d images in %.1f s", plan.name, shape[0],
                 time.perf_counter() - started)
    if resident is None:
        resident = math.prod(shape) <= RESIDENT_LIMIT_BYTES
    images = ImageRows.open(data_path, shape, resident)
    return images, class_splits(plan)


def class_splits(plan: CachePlan) -> dict[str, ClassSplit]:
    """Each split's classes as row ranges; a split naming an absent class is a data error."""
    starts = np.concatenate([[0], np.cumsum(plan.counts)[:-1]]).astype(np.int64)
    index = {name: position for position, name in enumerate(plan.classes)}
    splits = {}
    for split_name, names in plan.splits.items():
        absent = [name for name in names if name not in index]
        if absent:
            raise DataError(f"{plan.name}: the {split_name} split names {len(absent)} class(es) "
                            f"that are not in the images, e.g. {absent[0]!r}; the split list does "
                            f"not match the data")
        positions = torch.tensor([index[name] for name in names], dtype=torch.long)
        splits[split_name] = ClassSplit(names, torch.from_numpy(starts)[positions],
                                        torch.tensor(plan.counts, dtype=torch.long)[positions])
    return splits


def fingerprint(paths: Iterable[Path], *extra: object) -> str:
    """Changes when any source file is replaced or touched (path, size, mtime), or ``extra``
    (e.g. the image size or a split rule) changes."""
    entries: list[object] = [list(map(str, extra))]
    for path in paths:
        stat = path.stat()
        entries.append([str(path), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def decode_parallel(out: np.ndarray, jobs: Sequence[Job], decode: Callable[[Job], np.ndarray],
                    description: str, workers: int | None = None) -> None:
    """``out[i] = decode(jobs[i])`` on a thread pool with a progress bar.

    Threads, not processes: PIL's decoders and resampling release the GIL, and a thread pool
    cannot leave orphaned processes behind. ``decode`` raises ``DataError`` naming a bad image.
    """
    if len(jobs) != out.shape[0]:
        raise ValueError(f"{len(jobs)} jobs for {out.shape[0]} rows")
    workers = workers or max(1, min(8, len(os.sched_getaffinity(0))))
    chunk = 256
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="metarun-decode") as pool, \
            tqdm(total=len(jobs), desc=description, unit="img", dynamic_ncols=True,
                 mininterval=1.0) as bar:

        def decode_chunk(first: int) -> int:
            last = min(first + chunk, len(jobs))
            for row in range(first, last):
                out[row] = decode(jobs[row])
            return last - first

        for done in pool.map(decode_chunk, range(0, len(jobs), chunk)):
            bar.update(done)


def default_cache_dir(folder: Path, name: str, subfolder: str = "cache") -> Path:
    """``<folder>/<subfolder>``, unless the data folder is marked read-only (no write bit, which
    even root should respect: shared data must stay untouched); then the user's cache folder."""
    if not folder.is_dir() or (folder / subfolder).is_dir() or folder.stat().st_mode & 0o222:
        return folder / subfolder
    fallback = Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache").expanduser() / "metarun"
    log.info("%s: %s is read-only; caching in %s", name, folder, fallback / name)
    return fallback / name


def _stale_reason(plan: CachePlan, shape: tuple[int, ...], data_path: Path,
                  description_path: Path) -> str | None:
    if not description_path.is_file() or not data_path.is_file():
        return "no cache yet"
    try:
        description = json.loads(description_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        return f"the old cache description is unreadable ({type(error).__name__})"
    if description.get("version") != CACHE_VERSION or description.get("shape") != list(shape):
        return "cache format changed"
    if description.get("fingerprint") != plan.fingerprint:
        return "source files changed"
    if description.get("classes") != plan.classes or description.get("counts") != plan.counts:
        return "classes changed"
    if data_path.stat().st_size != math.prod(shape):
        return "the cached images are incomplete"
    return None


def _build(plan: CachePlan, shape: tuple[int, ...], data_path: Path,
           description_path: Path) -> None:
    suffix = f".{os.getpid()}.tmp"
    data_temp = data_path.with_name(f".{data_path.name}{suffix}")
    description_temp = description_path.with_name(f".{description_path.name}{suffix}")
    try:
        data_path.parent.mkdir(parents=True, exist_ok=True)
        description_path.unlink(missing_ok=True)  # a half-replaced pair must never look valid
        with open(data_temp, "w+b") as file:
            file.truncate(math.prod(shape))
            mapping = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_WRITE)
        try:
            out = _ReleasingRows.over(mapping, shape)
            plan.fill(out)
            del out
            mapping.flush()
        finally:
            with contextlib.suppress(BufferError):  # a view a loader kept: closed when collected
                mapping.close()
        _fsync(data_temp)
        os.replace(data_temp, data_path)
        description = {"version": CACHE_VERSION, "shape": list(shape),
                       "fingerprint": plan.fingerprint, "classes": plan.classes,
                       "counts": plan.counts}
        description_temp.write_text(json.dumps(description), encoding="utf-8")
        _fsync(description_temp)
        os.replace(description_temp, description_path)
    except OSError as error:
        raise DataError(f"{plan.name}: could not write the cache in {data_path.parent} "
                        f"({error.strerror or error}); free disk space or set dataset.cache_dir "
                        f"to a writable folder") from error
    finally:
        data_temp.unlink(missing_ok=True)
        description_temp.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    with open(path, "rb") as file:
        os.fsync(file.fileno())


class _ReleasingRows(np.ndarray):
    """The cache being built, as a writable array over a shared file mapping that hands the
    pages it wrote back to the kernel every ``RELEASE_BYTES``: the written images are safe in the
    page cache (and then on disk), and the build's resident memory stays the size of what a
    loader holds (one split's pickle, say) instead of growing by the whole cache."""

    RELEASE_BYTES = 64 << 20

    @classmethod
    def over(cls, mapping: mmap.mmap, shape: tuple[int, ...]) -> _ReleasingRows:
        rows = np.frombuffer(mapping, dtype=np.uint8).reshape(shape).view(cls)
        rows._release = _Release(mapping, cls.RELEASE_BYTES)
        return rows

    def __array_finalize__(self, parent: object) -> None:
        self._release = getattr(parent, "_release", None)

    def __setitem__(self, key: object, value: object) -> None:
        super().__setitem__(key, value)
        if self._release is not None:
            written = value if isinstance(value, np.ndarray) else self[key]
            self._release.wrote(np.asarray(written).nbytes)


class _Release:
    """Counts bytes written (from any thread) and releases the mapping's pages now and then."""

    def __init__(self, mapping: mmap.mmap, every: int) -> None:
        self.mapping = mapping
        self.every = every
        self.pending = 0
        self.lock = threading.Lock()

    def wrote(self, nbytes: int) -> None:
        with self.lock:
            self.pending += nbytes
            if self.pending < self.every:
                return
            self.pending = 0
        # A shared file mapping keeps its contents in the page cache: the pages come back from
        # there (or the file) if touched again, so releasing them loses nothing.
        self.mapping.madvise(mmap.MADV_DONTNEED)
