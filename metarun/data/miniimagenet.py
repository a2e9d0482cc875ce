"""mini-ImageNet (Vinyals et al. 2016) with the split of Ravi & Larochelle (2017): 64 / 16 / 20
ImageNet classes of 600 images each, 84x84 RGB.

Files in ``<root>/miniimagenet/``, in either layout people have:

- pickles, as learn2learn and torchmeta download them: ``mini-imagenet-cache-{train,val,test}.pkl``
  (learn2learn names the middle one ``-validation.pkl``; either is read). Each is a dict with
  ``image_data``, uint8 ``[N, 84, 84, 3]`` RGB, and ``class_dict``, ``{wnid: [row, ...]}``: the
  format few-shot-ssl-public's ``fewshot/data/mini_imagenet.py`` (Ren et al. 2018) writes (RGB,
  lists of row numbers) and learn2learn's ``vision/datasets/mini_imagenet.py`` reads.
  Resized to ``dataset.image_size`` when that is not their size, as image files are.
- images: ``images/<filename>`` (any size, resized to ``dataset.image_size``) named in Ravi &
  Larochelle's lists ``{train,val,test}.csv`` (header ``filename,label``, rows like
  ``n0153282900000005.jpg,n01532829``), read from the folder itself or from ``splits/ravi/``; a
  missing list is downloaded with its md5 from their repository into ``splits/ravi/``.

The pickles win when both layouts are present: they are already 84x84 and need no decoding. The
images themselves cannot be downloaded (ImageNet's licence); the error for a folder with neither
layout says where people get them.

The cache holds the train classes, then val, then test, each split's classes sorted by wnid, so
both layouts give the same class order. With pickles, the classes of each split are known only
from inside the file, so they are recorded in ``miniimagenet-pickles.json`` in the cache folder
(keyed by the pickles' fingerprint): a warm start reads no pickle at all, and a build reads each
pickle twice (listing, then copying), one at a time, so memory holds one split's pixels at most.

Normalisation: the mini-ImageNet pixel statistics of MetaOptNet and FEAT.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from metarun.data.download import download as fetch
from metarun.data.image_cache import CachePlan, decode_parallel, fingerprint
from metarun.data.image_dataset import PHASES, ImageDataset
from metarun.data.image_files import decode_image
from metarun.data.pickled_images import image_from_array, load_pickle, string_keys
from metarun.data.source_index import remembered
from metarun.errors import DataError, short_reason

PICKLES = {
    "train": ("mini-imagenet-cache-train.pkl",),
    "val": ("mini-imagenet-cache-val.pkl", "mini-imagenet-cache-validation.pkl"),
    "test": ("mini-imagenet-cache-test.pkl",),
}
LIST_URL = ("https://raw.githubusercontent.com/twitter/meta-learning-lstm/master/data/"
            "miniImagenet/{phase}.csv")
LIST_MD5 = {
    "train": "9525e1538f67719f18f1936bf8d0782d",
    "val": "ce315ce99b41fbf84fa6acd69315d918",
    "test": "5b89df877c6cbe5d291e43118a2a9591",
}
LIST_HEADER = ["filename", "label"]
MEAN = tuple(value / 255 for value in (120.39586422, 115.59361427, 104.54012653))
STD = tuple(value / 255 for value in (70.68188272, 68.27635443, 72.54505529))
PICKLE_HOLDS = ("a mini-ImageNet pickle (a dict with image_data, uint8 [N, H, W, 3], and "
                "class_dict, {wnid: [rows]})")
PICKLE_REMEDY = "download it again (learn2learn's or torchmeta's mini-imagenet-cache-*.pkl)"
HOW_TO_GET = (
    "mini-ImageNet cannot be downloaded automatically (ImageNet's licence): put the pickles "
    "mini-imagenet-cache-{train,val,test}.pkl there (learn2learn's MiniImagenet(download=True) or "
    "torchmeta fetch them), or ImageNet's images named as in Ravi & Larochelle's lists in "
    "images/ (e.g. made with github.com/yaoyao-liu/mini-imagenet-tools)"
)


class MiniImageNet(ImageDataset):
    """``dataset=miniimagenet``."""

    name = "miniimagenet"
    default_mean = MEAN
    default_std = STD

    def plan(self) -> CachePlan:
        pickles = {phase: _first_file(self.folder, names) for phase, names in PICKLES.items()}
        if all(pickles.values()):
            return self._pickle_plan(pickles)  # type: ignore[arg-type]
        if (self.folder / "images").is_dir():
            return self._image_plan(self._split_lists())
        found = [path.name for path in pickles.values() if path]
        if found:
            absent = " and ".join(" or ".join(PICKLES[phase]) for phase, path in pickles.items()
                                  if path is None)
            raise DataError(f"miniimagenet: {self.folder} has {', '.join(found)} but not "
                            f"{absent}, and no images/ folder; put the missing pickle there")
        raise DataError(f"miniimagenet: neither mini-imagenet-cache-{{train,val,test}}.pkl nor "
                        f"images/ with the Ravi lists {{train,val,test}}.csv found in "
                        f"{self.folder}; {HOW_TO_GET}")

    # ------------------------------------------------------------------ pickles
    def _pickle_plan(self, pickles: dict[str, Path]) -> CachePlan:
        stamp = fingerprint(pickles.values(), "pickles")
        listing = remembered(self.cache_dir / f"{self.name}-pickles.json", stamp,
                             lambda: _list_pickles(pickles))
        splits = {phase: [wnid for wnid, _ in listing[phase]] for phase in PHASES}
        _check_disjoint(splits, {phase: path.name for phase, path in pickles.items()})
        size, channels = self.image_size, self.channels

        def fill(out: np.ndarray) -> None:
            offset = 0
            for phase in PHASES:
                path = pickles[phase]
                image_data, class_rows = _read_pickle(path)
                if [[wnid, len(rows)] for wnid, rows in class_rows.items()] != listing[phase]:
                    raise DataError(f"miniimagenet: {path} changed while the cache was built; "
                                    f"run again")
                jobs = [row for rows in class_rows.values() for row in rows]
                _copy_rows(out[offset:offset + len(jobs)], image_data, jobs, path.name, size,
                           channels, f"miniimagenet {phase}")
                offset += len(jobs)
                del image_data, class_rows  # one split's pixels in memory at a time

        classes = [wnid for phase in PHASES for wnid in splits[phase]]
        counts = [count for phase in PHASES for _, count in listing[phase]]
        return CachePlan(self.name, stamp, classes, counts, splits, self.input_shape, fill)

    # ------------------------------------------------------------------ images + lists
    def _image_plan(self, lists: dict[str, Path]) -> CachePlan:
        images = self.folder / "images"
        listed = {phase: _read_list(lists[phase]) for phase in PHASES}
        splits = {phase: sorted(listed[phase]) for phase in PHASES}
        _check_disjoint(splits, {phase: lists[phase].name for phase in PHASES})
        classes = [wnid for phase in PHASES for wnid in splits[phase]]
        counts = [len(listed[phase][wnid]) for phase in PHASES for wnid in splits[phase]]
        files, named_by = [], {}
        for phase in PHASES:
            for wnid in splits[phase]:
                for filename in listed[phase][wnid]:
                    path = images / filename
                    if str(path) in named_by:
                        raise DataError(f"miniimagenet: {filename} is listed twice (in "
                                        f"{named_by[str(path)].name} and {lists[phase].name}); "
                                        f"replace the lists")
                    named_by[str(path)] = lists[phase]
                    files.append(path)
        try:
            stamp = fingerprint([*lists.values(), *files], "images")
        except FileNotFoundError as error:
            missing = Path(error.filename)
            raise DataError(f"miniimagenet: image {missing.name} named in "
                            f"{named_by.get(str(missing), 'a split list')}"
                            f" is not in {images}; add it or use lists that match your "
                            f"images") from error
        size, channels = self.image_size, self.channels

        def fill(out: np.ndarray) -> None:
            decode_parallel(out, files, lambda path: decode_image(path, str(path), size, channels),
                            "miniimagenet images")

        return CachePlan(self.name, stamp, classes, counts, splits, self.input_shape, fill)

    def _split_lists(self) -> dict[str, Path]:
        places = (self.folder, self.folder / "splits" / "ravi")
        lists = {phase: _first_file(places[0], (f"{phase}.csv",))
                 or _first_file(places[1], (f"{phase}.csv",)) for phase in PHASES}
        missing = [phase for phase, path in lists.items() if path is None]
        if missing and not self.download:
            names = " and ".join(f"{phase}.csv" for phase in missing)
            raise DataError(f"miniimagenet: found images/ but the split list {names} is in "
                            f"neither {places[0]} nor {places[1]} and dataset.download=false; put "
                            f"Ravi & Larochelle's lists there (twitter/meta-learning-lstm, "
                            f"data/miniImagenet/) or set dataset.download=true")
        for phase in missing:
            lists[phase] = fetch(LIST_URL.format(phase=phase), places[1] / f"{phase}.csv",
                                 LIST_MD5[phase], f"miniimagenet {phase}.csv")
        return lists  # type: ignore[return-value]


def _read_pickle(path: Path) -> tuple[np.ndarray, dict[str, list[int]]]:
    """``image_data`` and ``{wnid: rows}`` (wnids sorted), checked."""
    data = load_pickle(path, PICKLE_HOLDS, PICKLE_REMEDY)
    keys = sorted(map(str, string_keys(data))) if isinstance(data, dict) else None
    if keys is None or not {"image_data", "class_dict"} <= set(keys):
        found = f"a dict with keys {keys}" if keys is not None else f"a {type(data).__name__}"
        raise DataError(f"{path} is not {PICKLE_HOLDS} but {found}; {PICKLE_REMEDY}")
    data = string_keys(data)
    image_data, class_dict = data["image_data"], data["class_dict"]
    if not (isinstance(image_data, np.ndarray) and image_data.dtype == np.uint8
            and image_data.ndim == 4 and image_data.shape[3] == 3):
        what = (f"{image_data.dtype} {list(image_data.shape)}"
                if isinstance(image_data, np.ndarray) else type(image_data).__name__)
        raise DataError(f"{path}: image_data is {what}, not uint8 [N, H, W, 3]; {PICKLE_REMEDY}")
    if not isinstance(class_dict, dict) or not class_dict:
        raise DataError(f"{path}: class_dict is not a non-empty dict {{wnid: [rows]}}; "
                        f"{PICKLE_REMEDY}")
    rows_of = {}
    for wnid, members in string_keys(class_dict).items():
        rows = np.asarray(members)
        if (not isinstance(wnid, str) or rows.ndim != 1 or rows.size == 0
                or rows.dtype.kind not in "iu" or rows.min() < 0
                or rows.max() >= image_data.shape[0]):
            raise DataError(f"{path}: class_dict[{wnid!r}] is not a list of row numbers of "
                            f"image_data (0 to {image_data.shape[0] - 1}); {PICKLE_REMEDY}")
        rows_of[wnid] = rows.tolist()
    return image_data, dict(sorted(rows_of.items()))


def _copy_rows(out: np.ndarray, image_data: np.ndarray, rows: list[int], source: str, size: int,
               channels: int, description: str) -> None:
    decode_parallel(out, rows, lambda row: image_from_array(image_data[row], f"{source} row {row}",
                                                            size, channels), description)


def _read_list(path: Path) -> dict[str, list[str]]:
    """``{wnid: [filename, ...]}`` in the list's order."""
    try:
        with open(path, newline="", encoding="utf-8") as file:
            rows = list(csv.reader(file))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"cannot read split list {path} ({short_reason(error)}); "
                        f"replace it") from error
    if not rows or [cell.strip() for cell in rows[0]] != LIST_HEADER:
        first = ",".join(rows[0]) if rows else "empty"
        raise DataError(f"{path} starts with {first!r}, not the header filename,label of Ravi & "
                        f"Larochelle's lists; replace it")
    classes: dict[str, list[str]] = {}
    for number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != 2 or not row[0].strip() or not row[1].strip():
            raise DataError(f"{path}, line {number}: {','.join(row)!r} is not filename,label; "
                            f"replace the list")
        classes.setdefault(row[1].strip(), []).append(row[0].strip())
    if not classes:
        raise DataError(f"split list {path} names no images; replace it")
    return classes


def _check_disjoint(splits: dict[str, list[str]], sources: dict[str, str]) -> None:
    owner: dict[str, str] = {}
    for phase, classes in splits.items():
        for wnid in classes:
            if owner.setdefault(wnid, phase) != phase:
                raise DataError(f"miniimagenet: class {wnid} is in both {sources[owner[wnid]]} "
                                f"and {sources[phase]}; splits must not share classes")


def _first_file(folder: Path, names: Iterable[str]) -> Path | None:
    return next((folder / name for name in names if (folder / name).is_file()), None)


def _list_pickles(pickles: dict[str, Path]) -> dict[str, list]:
    """``{phase: [[wnid, images], ...]}``, reading one pickle at a time."""
    listing = {}
    for phase in PHASES:
        image_data, class_rows = _read_pickle(pickles[phase])
        listing[phase] = [[wnid, len(rows)] for wnid, rows in class_rows.items()]
        del image_data, class_rows
    return listing
