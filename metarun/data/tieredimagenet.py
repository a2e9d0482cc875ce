"""tiered-ImageNet (Ren et al. 2018): 608 ImageNet classes of 34 categories, split by category
into 351 / 97 / 160 classes (448,695 / 124,261 / 206,209 images; 779,165 in all), 84x84 RGB.

Files in ``<root>/tieredimagenet/``, for each split ``{train,val,test}``, as Ren et al.
distribute them (few-shot-ssl-public; learn2learn's ``TieredImagenet`` downloads the same files
into its ``tiered-imagenet/`` folder):

- ``{split}_labels.pkl``: a dict with ``label_specific`` (each image's class, integers),
  ``label_general`` (its category) and their names ``label_specific_str`` and
  ``label_general_str``, as few-shot-ssl-public's ``fewshot/data/tiered_imagenet.py`` writes and
  reads them. Pickled under Python 2, so read with latin1 strings (as MetaOptNet's loader does);
  only the ``label_specific`` pair is used here.
- ``{split}_images_png.pkl``: a sequence (list or numpy object array) of PNG-encoded images, each
  a uint8 array from ``cv2.imencode`` (few-shot-ssl-public's
  ``fewshot/data/compress_tiered_imagenet.py``; learn2learn opens each item with PIL the same
  way). Decoded with PIL on a thread pool, resized to ``dataset.image_size`` when that is not 84.
- or, instead, ``{split}_images.npz`` (key ``images``, uint8 ``[N, 84, 84, 3]``), as that
  script's ``decompress`` and few-shot-ssl-public's loader write it (``np.savez``,
  uncompressed). Those arrays come from OpenCV and so are in BGR order; they are turned to RGB, so
  that both formats give the same pixels. The array is memory-mapped inside the archive, never
  loaded whole. The png pickle is used when a split has both.

The classes are the ``label_specific`` classes that have images, named by ``label_specific_str``
(a name that occurs more than once gets ``[<split> <label>]`` appended, so each class keeps its
own); a split's images go into the cache grouped by class (a stable sort of its rows by label).
Memory holds one split's encoded pickle at a time while the cache is built; the cache itself
(about 16.5 GB at 84 px) is memory-mapped and read from disk per episode. tiered-ImageNet cannot
be downloaded here (ImageNet's licence). Normalisation: mini-ImageNet's statistics, as in
MetaOptNet's tiered-ImageNet loader.
"""

from __future__ import annotations

import math
import struct
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

from metarun.data.image_cache import CachePlan, decode_parallel, fingerprint
from metarun.data.image_dataset import PHASES, ImageDataset
from metarun.data.image_files import decode_image
from metarun.data.miniimagenet import MEAN, STD
from metarun.data.pickled_images import image_from_array, load_pickle, string_keys
from metarun.errors import DataError, short_reason

REMEDY = "download Ren et al.'s tiered-ImageNet files again"
LABELS_HOLDS = ("a tiered-ImageNet labels pickle (a dict with label_specific and "
                "label_specific_str)")
PNGS_HOLDS = "a tiered-ImageNet image pickle (a sequence of PNG-encoded uint8 arrays)"
HOW_TO_GET = (
    "tiered-ImageNet cannot be downloaded automatically (ImageNet's licence): put Ren et al.'s "
    "{train,val,test}_images_png.pkl (or _images.npz) and {train,val,test}_labels.pkl there "
    "(see github.com/renmengye/few-shot-ssl-public; learn2learn's TieredImagenet(download=True) "
    "saves the same files in its tiered-imagenet/ folder)"
)


class TieredImageNet(ImageDataset):
    """``dataset=tieredimagenet``."""

    name = "tieredimagenet"
    default_mean = MEAN
    default_std = STD

    def plan(self) -> CachePlan:
        sources = self._sources()
        labels = {phase: _read_labels(sources[phase][0]) for phase in PHASES}
        present = {phase: np.unique(label, return_counts=True)
                   for phase, (label, _) in labels.items()}
        occurrences = Counter(labels[phase][1][k] for phase in PHASES for k in present[phase][0])
        splits, counts = {}, []
        for phase in PHASES:
            names = labels[phase][1]
            splits[phase] = [names[k] if occurrences[names[k]] == 1 else f"{names[k]} [{phase} {k}]"
                             for k in present[phase][0].tolist()]
            counts += present[phase][1].tolist()
        npz_images = {phase: _npz_images(images, len(labels[phase][0]), labels_path)
                      for phase, (labels_path, images) in sources.items()
                      if images.suffix == ".npz"}
        stamp = fingerprint([path for pair in sources.values() for path in pair], "tiered")
        size, channels = self.image_size, self.channels

        def fill(out: np.ndarray) -> None:
            offset = 0
            for phase in PHASES:
                label = labels[phase][0]
                rows = np.argsort(label, kind="stable").tolist()
                target = out[offset:offset + len(rows)]
                labels_path, images_path = sources[phase]
                description = f"tieredimagenet {phase}"
                if phase in npz_images:
                    _copy_arrays(target, npz_images[phase], rows, images_path.name, size,
                                 channels, description)
                else:
                    _decode_pngs(target, images_path, len(label), labels_path.name, rows, size,
                                 channels, description)
                offset += len(rows)

        classes = [name for phase in PHASES for name in splits[phase]]
        return CachePlan(self.name, stamp, classes, counts, splits, self.input_shape, fill)

    def _sources(self) -> dict[str, tuple[Path, Path]]:
        """``{phase: (labels, images)}``; one error naming every missing file."""
        sources, missing = {}, []
        for phase in PHASES:
            labels = self.folder / f"{phase}_labels.pkl"
            images = next((self.folder / name for name in (f"{phase}_images_png.pkl",
                                                           f"{phase}_images.npz")
                           if (self.folder / name).is_file()), None)
            if not labels.is_file():
                missing.append(labels.name)
            if images is None:
                missing.append(f"{phase}_images_png.pkl")
            sources[phase] = (labels, images)
        if missing:
            raise DataError(f"tieredimagenet: {', '.join(missing)} not found in {self.folder}; "
                            f"{HOW_TO_GET}")
        return sources  # type: ignore[return-value]


def _read_labels(path: Path) -> tuple[np.ndarray, list[str]]:
    """Each image's class (int64) and the class names, checked."""
    data = load_pickle(path, LABELS_HOLDS, REMEDY)
    if isinstance(data, dict):
        data = string_keys(data)
    if not isinstance(data, dict) or not {"label_specific", "label_specific_str"} <= set(data):
        found = (f"a dict with keys {sorted(map(str, data))}" if isinstance(data, dict)
                 else f"a {type(data).__name__}")
        raise DataError(f"{path} is not {LABELS_HOLDS} but {found}; {REMEDY}")
    label = np.asarray(data["label_specific"])
    names = [name.decode("latin1") if isinstance(name, bytes) else name
             for name in data["label_specific_str"]]
    if not all(isinstance(name, str) for name in names):
        raise DataError(f"{path}: label_specific_str is not a list of class names; {REMEDY}")
    if (label.ndim != 1 or label.size == 0 or label.dtype.kind not in "iu" or label.min() < 0
            or label.max() >= len(names)):
        raise DataError(f"{path}: label_specific is not one class number (0 to "
                        f"{len(names) - 1}) per image; {REMEDY}")
    return label.astype(np.int64), names


def _decode_pngs(out: np.ndarray, path: Path, expected: int, labels_name: str, rows: list[int],
                 size: int, channels: int, description: str) -> None:
    encoded = load_pickle(path, PNGS_HOLDS, REMEDY)
    if not (isinstance(encoded, list | tuple)
            or (isinstance(encoded, np.ndarray) and encoded.ndim == 1)):
        raise DataError(f"{path} is not {PNGS_HOLDS} but a {type(encoded).__name__}; {REMEDY}")
    if len(encoded) != expected:
        raise DataError(f"{path} holds {len(encoded)} images but {labels_name} labels "
                        f"{expected}; the two files do not belong together: {REMEDY}")

    def decode(row: int) -> np.ndarray:
        item = encoded[row]
        if isinstance(item, np.ndarray) and item.dtype == np.uint8:
            item = item.tobytes()
        if not isinstance(item, bytes | bytearray):
            raise DataError(f"{path.name} item {row} is a {type(item).__name__}, not PNG bytes; "
                            f"{REMEDY}")
        return decode_image(bytes(item), f"{path.name} item {row}", size, channels)

    decode_parallel(out, rows, decode, description)


def _copy_arrays(out: np.ndarray, images: np.ndarray, rows: list[int], source: str, size: int,
                 channels: int, description: str) -> None:
    """Rows of a BGR ``[N, H, W, 3]`` array into the cache, as RGB."""
    decode_parallel(out, rows, lambda row: image_from_array(images[row, :, :, ::-1],
                                                            f"{source} row {row}", size, channels),
                    description)


def _npz_images(path: Path, expected: int, labels_path: Path) -> np.ndarray:
    """The ``images`` array of an uncompressed ``.npz``, memory-mapped where it lies in the zip."""
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.namelist()
            if "images.npy" not in members:
                raise DataError(f"{path} has no images array (it holds {members}); {REMEDY}")
            info = archive.getinfo("images.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            raise DataError(f"{path} is compressed (np.savez_compressed), which cannot be read "
                            f"without loading it whole; use {path.name[:-4]}_png.pkl or save "
                            f"it with np.savez")
        with open(path, "rb") as file:
            file.seek(info.header_offset)
            local = file.read(30)
            if len(local) != 30 or local[:4] != b"PK\x03\x04":
                raise ValueError("bad local file header")
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            file.seek(info.header_offset + 30 + name_length + extra_length)
            version = np.lib.format.read_magic(file)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"npy format {version}")
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran_order, dtype = read_header(file)
            start = file.tell()
    except (zipfile.BadZipFile, OSError, ValueError, struct.error) as error:
        raise DataError(f"{path} is corrupt or truncated ({short_reason(error)}); "
                        f"{REMEDY}") from error
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or fortran_order:
        raise DataError(f"{path}: images is {dtype} {list(shape)}, not uint8 [N, H, W, 3]; "
                        f"{REMEDY}")
    if shape[0] != expected:
        raise DataError(f"{path} holds {shape[0]} images but {labels_path.name} labels "
                        f"{expected}; the two files do not belong together: {REMEDY}")
    if path.stat().st_size < start + math.prod(shape):
        raise DataError(f"{path} is truncated (shorter than its {shape[0]} images); {REMEDY}")
    return np.memmap(path, dtype=np.uint8, mode="r", offset=start, shape=tuple(shape))
