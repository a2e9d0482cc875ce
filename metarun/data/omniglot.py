"""Omniglot (Lake et al. 2015): official archives -> one cached uint8 tensor -> class splits.

Files: ``<root>/omniglot/images_{background,evaluation}.zip`` (or the extracted
``images_<set>/`` folders; a zip wins when both exist), downloaded from the official repository
when missing. Every drawing is decoded once (grayscale, PIL LANCZOS resize to ``image_size``,
inverted so ink is 255 on a 0 background) into ``[characters, drawings, H, W]`` and cached in
``cache_dir`` (default ``<root>/omniglot/cache``, or ``$XDG_CACHE_HOME/metarun/omniglot`` when
the data folder is read-only) with a fingerprint of the sources; later runs load it in a fraction
of a second and rebuild it when the sources or the format change or the file is corrupt.

Splits (meta-train / meta-val / meta-test never share a character):

- ``vinyals`` (default; Vinyals et al. 2016, as in Prototypical Networks): the lists in
  ``<root>/omniglot/splits/vinyals/{train,val,test}.txt``, one class a line as
  ``Alphabet/characterNN/rotDDD``: the character turned DDD degrees counter-clockwise
  (``torch.rot90``), so 1623 characters give 4112 / 688 / 1692 classes.
- ``lake``: alphabets, no rotations. Meta-train is the background alphabets but the last
  ``LAKE_VAL_ALPHABETS`` in sorted order, which are meta-val; meta-test is the evaluation set.

Only the uint8 base images stay in memory (one byte a pixel: 32,460 x 28 x 28 bytes, about 25 MB,
at 28 px); a split is two index tensors. With ``on_device`` (``metarun.data.on_device``) they are
copied once to the training GPU, where episodes are then gathered.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch
from torch import Tensor

from metarun.checks import auto_or_bool
from metarun.data.download import download as fetch
from metarun.data.episodes import ClassImageBatchSampler, ClassImageSampler
from metarun.data.image_cache import default_cache_dir
from metarun.data.omniglot_files import Source, decode_sources, source_files
from metarun.data.on_device import store_device
from metarun.errors import ConfigError, DataError, short_reason

log = logging.getLogger(__name__)

SETS = ("background", "evaluation")
ARCHIVES = {
    "background": (
        "https://github.com/brendenlake/omniglot/raw/master/python/images_background.zip",
        "68d2efa1b9178cc56df9314c21c6e718",
    ),
    "evaluation": (
        "https://github.com/brendenlake/omniglot/raw/master/python/images_evaluation.zip",
        "6b91aef0f799c5bb55b94e3f2daec811",
    ),
}
SPLIT_LIST_URL = (
    "https://raw.githubusercontent.com/jakesnell/prototypical-networks/master/"
    "data/omniglot/splits/vinyals/{phase}.txt"
)
SPLIT_LIST_MD5 = {
    "train": "433d1fcc2b20dcee2983ceb524586f7f",
    "val": "78c535fa427b12b6596908376a0b3f34",
    "test": "43534e6d5f9e74acbb7de1b4874abad8",
}
SPLITS = ("vinyals", "lake")
PHASES = ("train", "val", "test")
LAKE_VAL_ALPHABETS = 5
CACHE_VERSION = 1
ROTATIONS = {"rot000": 0, "rot090": 1, "rot180": 2, "rot270": 3}


class Omniglot:
    """The dataset the trainer asks for episodes: built by Hydra from ``dataset.*`` keys."""

    task_type = "classification"

    def __init__(
        self,
        root: str,
        split: str = "vinyals",
        cache_dir: str | None = None,
        download: bool = True,
        image_size: int = 28,
        on_device: object = "auto",
    ) -> None:
        self.on_device = auto_or_bool(on_device, "dataset.on_device")
        if split not in SPLITS:
            raise ConfigError(f"dataset.split={split!r} is not an Omniglot split; choose one of "
                              f"{', '.join(SPLITS)}")
        if int(image_size) < 1:
            raise ConfigError(f"dataset.image_size={image_size} must be a positive pixel count")
        self.split = split
        self.image_size = int(image_size)
        self.input_shape = (1, self.image_size, self.image_size)
        self.folder = Path(root).expanduser() / "omniglot"
        self.cache_dir = (Path(cache_dir).expanduser() if cache_dir
                          else default_cache_dir(self.folder, "omniglot"))

        sources = self._find_sources(download)
        split_lists = self._find_split_lists(download) if split == "vinyals" else {}
        cache = _load_or_build(sources, self.cache_dir, self.image_size)
        self.images: Tensor = cache["images"]
        self.characters: list[str] = list(cache["characters"])
        self.character_sets: list[str] = list(cache["character_sets"])
        if split == "vinyals":
            self.classes = _vinyals_classes(split_lists, self.characters)
        else:
            self.classes = _lake_classes(self.characters, self.character_sets)

    def place_on(self, device: torch.device) -> None:
        """The images on the run's ``device`` when ``on_device`` says so (before any sampler is
        made: samplers keep the tensor they were given)."""
        target = store_device(self.on_device, self.images.numel(), device)
        if target is not None:
            self.images = self.images.to(target)

    def output_size(self, ways: int) -> int:
        return ways

    def num_classes(self, split_name: str) -> int:
        return self._split(split_name)[0].numel()

    def sampler(self, split_name: str, ways: int, shots: int, queries: int) -> ClassImageSampler:
        """Checks the task shape against this split now, so a bad config fails before training."""
        for key, value, minimum in (
            ("task.ways", ways, 2), ("task.shots", shots, 1), ("task.queries", queries, 1)
        ):
            if value < minimum:
                raise ConfigError(f"{key}={value} but it must be at least {minimum}")
        class_source, class_rotation = self._split(split_name)
        available = class_source.numel()
        if ways > available:
            raise ConfigError(
                f"task.ways={ways} but the {split_name} split of omniglot ({self.split}) has "
                f"only {available} classes; lower task.ways"
            )
        drawings = self.images.shape[1]
        if shots + queries > drawings:
            raise ConfigError(
                f"task.shots + task.queries = {shots + queries} but omniglot has only "
                f"{drawings} images per class; lower them"
            )
        return ClassImageSampler(self.images, class_source, class_rotation, ways, shots, queries)

    def batch_sampler(self, split_name: str, batch_size: int) -> ClassImageBatchSampler:
        """Labelled mini-batches over all classes of a split, for pre-training (transfer
        baselines); labels are ``0 .. num_classes(split_name) - 1``."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch size {batch_size!r} must be an integer >= 1")
        class_source, class_rotation = self._split(split_name)
        return ClassImageBatchSampler(self.images, class_source, class_rotation, batch_size)

    def _split(self, split_name: str) -> tuple[Tensor, Tensor]:
        if split_name not in self.classes:
            raise ConfigError(f"unknown split {split_name!r}; choose one of {', '.join(PHASES)}")
        return self.classes[split_name]

    def _find_sources(self, download: bool) -> list[Source]:
        sources, missing = [], []
        for set_name in SETS:
            archive = self.folder / f"images_{set_name}.zip"
            extracted = self.folder / f"images_{set_name}"
            if archive.is_file():
                sources.append(Source(set_name, archive, True))
            elif extracted.is_dir():
                sources.append(Source(set_name, extracted, False))
            else:
                missing.append(set_name)
        if missing and not download:
            names = " and ".join(f"images_{name}.zip" for name in missing)
            raise DataError(
                f"omniglot: {names} not found in {self.folder} and dataset.download=false; put the "
                f"official files (or their extracted folders) there or set dataset.download=true"
            )
        for position, set_name in enumerate(missing):
            url, md5 = ARCHIVES[set_name]
            archive = self.folder / f"images_{set_name}.zip"
            try:
                fetch(url, archive, md5, f"omniglot {set_name}")
            except DataError as error:
                still = [f"images_{name}.zip" for name in missing[position + 1:]]
                raise DataError(f"{error} ({' and '.join(still)} is missing too)" if still
                                else str(error)) from error
            sources.append(Source(set_name, archive, True))
        return sorted(sources, key=lambda source: SETS.index(source.set_name))

    def _find_split_lists(self, download: bool) -> dict[str, Path]:
        folder = self.folder / "splits" / "vinyals"
        paths = {phase: folder / f"{phase}.txt" for phase in PHASES}
        missing = [phase for phase, path in paths.items() if not path.is_file()]
        if missing and not download:
            names = " and ".join(f"{phase}.txt" for phase in missing)
            raise DataError(
                f"omniglot: split list {names} not found in {folder} and dataset.download=false; "
                f"put the Vinyals lists there (prototypical-networks data/omniglot/splits/"
                f"vinyals/) or set dataset.download=true"
            )
        for phase in missing:
            fetch(SPLIT_LIST_URL.format(phase=phase), paths[phase], SPLIT_LIST_MD5[phase],
                  f"omniglot split {phase}")
        return paths


def _load_or_build(sources: list[Source], cache_dir: Path, image_size: int) -> dict:
    """The cached tensors when they match the sources, else decode them and refresh the cache."""
    fingerprint = _fingerprint(sources)
    cache_path = cache_dir / f"omniglot-{image_size}px-v{CACHE_VERSION}.pt"
    cache, reason = _read_cache(cache_path, fingerprint, image_size)
    if cache is not None:
        return cache
    log.info("omniglot: building %s (%s)", cache_path, reason)
    started = time.perf_counter()
    characters, character_sets, images = decode_sources(sources, image_size)
    log.info("omniglot: decoded %d images in %.1f s", images.shape[0] * images.shape[1],
             time.perf_counter() - started)
    cache = {
        "version": CACHE_VERSION,
        "image_size": image_size,
        "fingerprint": fingerprint,
        "images": torch.from_numpy(images),
        "characters": characters,
        "character_sets": character_sets,
    }
    _write_cache(cache_path, cache)
    return cache


def _fingerprint(sources: list[Source]) -> str:
    """Changes when any source file is replaced or touched: path, size and mtime_ns of each."""
    entries = []
    for source in sources:
        for path, stat in source_files(source):
            entries.append([source.set_name, str(path), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def _read_cache(path: Path, fingerprint: str, image_size: int) -> tuple[dict | None, str]:
    if not path.is_file():
        return None, "no cache yet"
    try:
        cache = torch.load(path, map_location="cpu", weights_only=True)
        images = cache["images"]
        consistent = (
            images.dtype == torch.uint8
            and images.dim() == 4
            and len(cache["characters"]) == len(cache["character_sets"]) == images.shape[0]
        )
    except Exception as error:  # a torn or foreign file can fail in many ways; all mean rebuild
        return None, f"the old cache is unreadable: {short_reason(error)}"
    if cache.get("version") != CACHE_VERSION or cache.get("image_size") != image_size:
        return None, "cache format changed"
    if cache.get("fingerprint") != fingerprint:
        return None, "source files changed"
    if not consistent:
        return None, "inconsistent cache"
    return cache, "cached"


def _write_cache(path: Path, cache: dict) -> None:
    """Atomic, so a crash or a parallel run never leaves a torn cache; failure only costs time."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(temp, "wb") as file:
            torch.save(cache, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except OSError as error:
        temp.unlink(missing_ok=True)
        log.warning("omniglot: could not write the cache %s (%s); set dataset.cache_dir to a "
                    "writable folder to skip decoding next time", path, error.strerror or error)


def _vinyals_classes(lists: dict[str, Path], characters: list[str]) -> dict[str, tuple]:
    index = {name: position for position, name in enumerate(characters)}
    owner: dict[str, str] = {}
    classes = {}
    for phase in PHASES:
        path = lists[phase]
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as error:
            raise DataError(f"cannot read split list {path} ({error}); replace it") from error
        seen, sources, rotations = set(), [], []
        for number, line in enumerate(lines, start=1):
            line = line.strip()
            if not line:
                continue
            character, _, rotation = line.rpartition("/")
            where = f"{path}, line {number}"
            if rotation not in ROTATIONS or character.count("/") != 1:
                raise DataError(f"{where}: {line!r} is not Alphabet/characterNN/rotDDD with "
                                f"DDD one of 000, 090, 180, 270")
            if character not in index:
                raise DataError(f"{where}: class {line} names a character that is not in the "
                                f"omniglot images; the split list does not match the data")
            if owner.setdefault(character, phase) != phase:
                raise DataError(f"{where}: class {line} is a character of the {owner[character]} "
                                f"split too; splits must not share characters")
            if line in seen:
                raise DataError(f"{where}: class {line} is listed twice")
            seen.add(line)
            sources.append(index[character])
            rotations.append(ROTATIONS[rotation])
        if not sources:
            raise DataError(f"split list {path} has no classes; replace it")
        classes[phase] = (torch.tensor(sources), torch.tensor(rotations))
    return classes


def _lake_classes(characters: list[str], character_sets: list[str]) -> dict[str, tuple]:
    alphabets = [name.split("/")[0] for name in characters]
    background = sorted({alphabet for alphabet, set_name in zip(alphabets, character_sets,
                                                                 strict=True)
                         if set_name == "background"})
    if len(background) <= LAKE_VAL_ALPHABETS:
        raise DataError(f"the lake split holds out {LAKE_VAL_ALPHABETS} background alphabets for "
                        f"meta-val but images_background has only {len(background)}")
    held_out = set(background[-LAKE_VAL_ALPHABETS:])
    phases: dict[str, list[int]] = {phase: [] for phase in PHASES}
    for position, (alphabet, set_name) in enumerate(zip(alphabets, character_sets, strict=True)):
        if set_name == "evaluation":
            phases["test"].append(position)
        else:
            phases["val" if alphabet in held_out else "train"].append(position)
    return {phase: (torch.tensor(members, dtype=torch.long), torch.zeros(len(members)).long())
            for phase, members in phases.items()}
