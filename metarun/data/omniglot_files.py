"""Omniglot on disk: the official zips or their extracted folders -> uint8 drawings.

Decoding runs in forked worker processes (its time for all 32,460 images: docs/PERFORMANCE.md,
"Data", "Omniglot ready, cold"); the result is cached by `metarun.data.omniglot`, so this runs
once per machine.
"""

from __future__ import annotations

import io
import multiprocessing
import os
import zipfile
import zlib
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from metarun.errors import DataError, short_reason

#: Images per worker task: big enough to amortise the hand-off, small enough to balance 2 cores.
CHUNK_IMAGES = 512


@dataclass(frozen=True)
class Source:
    """One image set on disk: the official zip, or the ``images_<set>/`` folder it extracts to."""

    set_name: str
    path: Path
    is_zip: bool


def source_files(source: Source) -> list[tuple[str, os.stat_result]]:
    """The files whose change must invalidate the cache: the zip, or every file in the folder."""
    root = source.path.resolve()
    if source.is_zip:
        return [(str(root), root.stat())]
    found = []
    for folder, subfolders, names in os.walk(root):
        subfolders.sort()
        found.extend((os.path.join(folder, name), os.stat(os.path.join(folder, name)))
                     for name in sorted(names))
    return found


def decode_sources(sources: list[Source], image_size: int) -> tuple[list, list, np.ndarray]:
    """Character names, their set, and uint8 images ``[characters, drawings, size, size]``."""
    characters, character_sets, jobs = [], [], []
    drawings_per_character, first, seen = None, "", set()
    for source in sources:
        members = []
        for character, drawings in sorted(_list_characters(source).items()):
            if character in seen:
                raise DataError(f"{source.path}: character {character} is in two image sets")
            if drawings_per_character is None:
                drawings_per_character, first = len(drawings), character
            elif len(drawings) != drawings_per_character:
                raise DataError(
                    f"{source.path}: {character} has {len(drawings)} drawings but {first} has "
                    f"{drawings_per_character}; every character needs the same number"
                )
            characters.append(character)
            seen.add(character)
            character_sets.append(source.set_name)
            members.extend(sorted(drawings))
        jobs.append((str(source.path), source.is_zip, members))
    total = len(characters) * drawings_per_character
    images = np.empty((total, image_size, image_size), dtype=np.uint8)
    _decode_all(jobs, image_size, images)
    return characters, character_sets, images.reshape(len(characters), -1, image_size, image_size)


def _list_characters(source: Source) -> dict[str, list[str]]:
    """``Alphabet/characterNN`` -> member names ``images_<set>/Alphabet/characterNN/x.png``."""
    top = f"images_{source.set_name}"
    if source.is_zip:
        try:
            with zipfile.ZipFile(source.path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, EOFError) as error:
            raise DataError(
                f"{source.path} is not a readable zip archive ({short_reason(error)}): it is "
                "truncated or corrupt; delete it and download it again (or put the official "
                "file there)"
            ) from error
    else:
        names = []
        for folder, _, files in os.walk(source.path):
            relative = Path(folder).relative_to(source.path.parent).as_posix()
            names.append(relative + "/")
            names.extend(f"{relative}/{name}" for name in files)
    characters: dict[str, list[str]] = {}
    for name in names:
        parts = name.split("/")
        if len(parts) == 4 and parts[0] == top:
            drawings = characters.setdefault(f"{parts[1]}/{parts[2]}", [])
            if parts[3].lower().endswith(".png"):
                drawings.append(name)
    if not characters:
        raise DataError(
            f"{source.path} does not have the Omniglot layout: expected "
            f"{top}/<Alphabet>/<characterNN>/<drawing>.png inside, found no alphabets"
        )
    for character, drawings in characters.items():
        if not drawings:
            raise DataError(f"{source.path}: character folder {top}/{character}/ has no PNG "
                            f"drawings; the data is incomplete, replace it with the official file")
    return characters


def _decode_all(jobs: list[tuple[str, bool, list[str]]], image_size: int, out: np.ndarray) -> None:
    """Fill ``out`` in member order, in worker processes when there is enough work to share."""
    chunks, offset = [], 0
    for path, is_zip, members in jobs:
        for start in range(0, len(members), CHUNK_IMAGES):
            chunks.append((offset + start, (path, is_zip, members[start:start + CHUNK_IMAGES])))
        offset += len(members)
    # A daemonic process (some launchers run jobs in one) may not start workers of its own.
    daemonic = multiprocessing.current_process().daemon
    workers = 1 if daemonic else min(os.cpu_count() or 1, len(chunks))
    with tqdm(total=len(out), unit="img", desc="decoding omniglot", disable=None,
              leave=False) as progress:
        if workers <= 1:
            try:
                for start, args in chunks:
                    block = _decode_chunk(*args, image_size)
                    out[start:start + len(block)] = block
                    progress.update(len(block))
            finally:
                _close_archives()
            return
        pool = ProcessPoolExecutor(workers, mp_context=_process_context())
        try:
            futures = {pool.submit(_decode_chunk, *args, image_size): start
                       for start, args in chunks}
            for future in as_completed(futures):
                block = future.result()
                out[futures[future]:futures[future] + len(block)] = block
                progress.update(len(block))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)


_OPEN_ARCHIVES: dict[str, zipfile.ZipFile] = {}


def _decode_chunk(path: str, is_zip: bool, members: list[str], image_size: int) -> np.ndarray:
    """Grayscale, LANCZOS resize (anti-aliased, as torchvision-based loaders do), ink -> 255."""
    out = np.empty((len(members), image_size, image_size), dtype=np.uint8)
    for position, member in enumerate(members):
        try:
            if is_zip:
                if path not in _OPEN_ARCHIVES:  # one open per process, not per chunk
                    _OPEN_ARCHIVES[path] = zipfile.ZipFile(path)
                stream = io.BytesIO(_OPEN_ARCHIVES[path].read(member))
            else:
                stream = os.path.join(os.path.dirname(path), member)
            with Image.open(stream) as image:
                gray = image.convert("L").resize((image_size, image_size), Image.Resampling.LANCZOS)
            out[position] = 255 - np.asarray(gray, dtype=np.uint8)
        except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error,
                Image.DecompressionBombError) as error:
            raise DataError(
                f"cannot decode {member} in {path} ({short_reason(error)}): the file is corrupt; "
                "replace it with the official one"
            ) from None
    return out


def _close_archives() -> None:
    """Forked workers must not share the parent's open zip (and its file offset)."""
    while _OPEN_ARCHIVES:
        _OPEN_ARCHIVES.popitem()[1].close()


def _process_context() -> multiprocessing.context.BaseContext:
    """Fork where available: workers start at once instead of re-importing torch."""
    if "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()
