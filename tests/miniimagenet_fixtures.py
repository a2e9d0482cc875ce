"""mini-ImageNet's two layouts, written in their exact formats with a few classes (the pickles
learn2learn and torchmeta download; images/ with Ravi & Larochelle's lists), and what the tests
of both layouts share."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metarun.data.image_dataset import PHASES
from metarun.data.miniimagenet import MiniImageNet
from metarun.errors import DataError
from tests.py2_pickle import python2_pickle

#: Fixture classes (wnid-like, sorted within each split) and images per class.
CLASSES = {
    "train": ["n01000001", "n01000002", "n01000003", "n01000004"],
    "val": ["n02000001", "n02000002", "n02000003"],
    "test": ["n03000001", "n03000002", "n03000003"],
}
ALL_CLASSES = [wnid for phase in PHASES for wnid in CLASSES[phase]]
IMAGES = 20
PIXELS = 84


def class_value(wnid: str) -> int:
    """The red level every image of a class has: recognisable after the sampler's round trip."""
    return 20 + 20 * ALL_CLASSES.index(wnid)


def fixture_image(wnid: str, number: int, size: tuple[int, int] = (PIXELS, PIXELS)) -> np.ndarray:
    """uint8 [H, W, 3]: red = the class, green = the image, blue = a gradient (not flat)."""
    height, width = size
    image = np.empty((height, width, 3), dtype=np.uint8)
    image[..., 0] = class_value(wnid)
    image[..., 1] = 5 * number
    image[..., 2] = (np.arange(width) * 2 % 200)[None, :]
    return image


def filename(wnid: str, number: int) -> str:
    return f"{wnid}{number + 1:08d}.jpg"  # Ravi & Larochelle's names: wnid + 8-digit number


def shuffled_rows(phase: str) -> list[tuple[str, int]]:
    """(wnid, number) in a fixed interleaved order, so grouping by class is really tested."""
    rows = [(wnid, number) for number in range(IMAGES) for wnid in CLASSES[phase]]
    return rows[::-1]


def write_pickles(folder: Path, val_name: str = "val", python2: bool = False,
                  rows_as_arrays: bool = False) -> None:
    """``mini-imagenet-cache-<phase>.pkl`` as learn2learn downloads them (protocol 4 of a dict;
    ``python2``: as Python 2 wrote the originals)."""
    folder.mkdir(parents=True, exist_ok=True)
    for phase in PHASES:
        rows = shuffled_rows(phase)
        image_data = np.stack([fixture_image(wnid, number) for wnid, number in rows])
        class_dict: dict[str, list] = {}
        for index, (wnid, _) in enumerate(rows):
            class_dict.setdefault(wnid, []).append(index)
        if rows_as_arrays:
            class_dict = {wnid: np.array(members) for wnid, members in class_dict.items()}
        data = {"image_data": image_data, "class_dict": class_dict}
        name = f"mini-imagenet-cache-{val_name if phase == 'val' else phase}.pkl"
        (folder / name).write_bytes(python2_pickle(data) if python2 else pickle.dumps(data, 4))


def write_images(folder: Path, lists_in: str = "splits/ravi", size=(96, 80)) -> dict[str, Path]:
    """``images/`` (JPEG, not 84x84, as ImageNet's) and the three lists in Ravi's format."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    lists_folder = folder / lists_in
    lists_folder.mkdir(parents=True, exist_ok=True)
    lists = {}
    for phase in PHASES:
        lines = ["filename,label"]
        for wnid in CLASSES[phase]:
            for number in range(IMAGES):
                Image.fromarray(fixture_image(wnid, number, size)).save(
                    folder / "images" / filename(wnid, number), quality=95)
                lines.append(f"{filename(wnid, number)},{wnid}")
        lists[phase] = lists_folder / f"{phase}.csv"
        lists[phase].write_text("\n".join(lines) + "\n")
    return lists


def load(root: Path, **kwargs) -> MiniImageNet:
    kwargs.setdefault("download", False)
    return MiniImageNet(root=str(root), **kwargs)


def red_levels(data: MiniImageNet, split: str) -> dict[str, set[int]]:
    """Each class of a split -> the red levels of its cached images."""
    part = data.splits[split]
    return {name: set(data.images.array[start:start + count, 0].reshape(count, -1).mean(1)
                      .round().astype(int).tolist())
            for name, start, count in zip(part.names, part.start.tolist(), part.count.tolist(),
                                          strict=True)}


def assert_classes(data: MiniImageNet) -> None:
    assert {split: data.num_classes(split) for split in PHASES} == {"train": 4, "val": 3,
                                                                    "test": 3}
    assert {split: data.splits[split].names for split in PHASES} == CLASSES
    assert data.images.shape == (10 * IMAGES, 3, PIXELS, PIXELS)
    assert data.splits["test"].count.tolist() == [IMAGES] * 3


def check_error(root: Path, pattern: str, **kwargs) -> None:
    with pytest.raises(DataError, match=pattern) as error:
        load(root, **kwargs)
    assert "\n" not in str(error.value)
