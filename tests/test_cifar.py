"""CIFAR-FS and FC100 from a small archive in the official cifar-100-python format.

The fixture has every real CIFAR-100 class and superclass name but four images a class (three in
CIFAR's train set, one in its test set), whose pixels say which class and image they are: the red
plane is the fine label, the green one the image's number within its class, the blue one the
part (200: train, 201: test).
"""

from __future__ import annotations

import io
import os
import pickle
import random
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from metarun.data import cifar as cifar_module
from metarun.data.cifar import CIFARFS, FC100, SPLITS_DIR, read_split_list
from metarun.errors import ConfigError, DataError
from tests.runs import check_ok, read_results, run_metarun

#: CIFAR-100's superclasses and their classes (the dataset's web page, Krizhevsky 2009).
SUPERCLASSES = {
    "aquatic_mammals": ["beaver", "dolphin", "otter", "seal", "whale"],
    "fish": ["aquarium_fish", "flatfish", "ray", "shark", "trout"],
    "flowers": ["orchid", "poppy", "rose", "sunflower", "tulip"],
    "food_containers": ["bottle", "bowl", "can", "cup", "plate"],
    "fruit_and_vegetables": ["apple", "mushroom", "orange", "pear", "sweet_pepper"],
    "household_electrical_devices": ["clock", "keyboard", "lamp", "telephone", "television"],
    "household_furniture": ["bed", "chair", "couch", "table", "wardrobe"],
    "insects": ["bee", "beetle", "butterfly", "caterpillar", "cockroach"],
    "large_carnivores": ["bear", "leopard", "lion", "tiger", "wolf"],
    "large_man-made_outdoor_things": ["bridge", "castle", "house", "road", "skyscraper"],
    "large_natural_outdoor_scenes": ["cloud", "forest", "mountain", "plain", "sea"],
    "large_omnivores_and_herbivores": ["camel", "cattle", "chimpanzee", "elephant", "kangaroo"],
    "medium_mammals": ["fox", "porcupine", "possum", "raccoon", "skunk"],
    "non-insect_invertebrates": ["crab", "lobster", "snail", "spider", "worm"],
    "people": ["baby", "boy", "girl", "man", "woman"],
    "reptiles": ["crocodile", "dinosaur", "lizard", "snake", "turtle"],
    "small_mammals": ["hamster", "mouse", "rabbit", "shrew", "squirrel"],
    "trees": ["maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"],
    "vehicles_1": ["bicycle", "bus", "motorcycle", "pickup_truck", "train"],
    "vehicles_2": ["lawn_mower", "rocket", "streetcar", "tank", "tractor"],
}
SUPERCLASS_OF = {fine: coarse for coarse, fines in SUPERCLASSES.items() for fine in fines}
FINE = sorted(SUPERCLASS_OF)  # the official meta lists both sets of names sorted
COARSE = sorted(SUPERCLASSES)
PER_PART = {"train": 3, "test": 1}
PER_CLASS = sum(PER_PART.values())


def part_rows(part: str, drop: tuple[str, ...] = ()) -> list[tuple[int, int]]:
    """(fine label, image number within its class) of each image of a part, in file order."""
    first = 0 if part == "train" else PER_PART["train"]
    rows = [(fine, first + image) for fine in range(len(FINE)) if FINE[fine] not in drop
            for image in range(PER_PART[part])]
    random.Random(part).shuffle(rows)
    return rows


class AsPython2Wrote:
    """An array that pickles as in the official files, written by Python 2's numpy: through
    ``numpy.core.multiarray._reconstruct``, its pixels a str (what ``encoding="latin1"`` reads)."""

    def __init__(self, array: np.ndarray) -> None:
        self.array = array

    def __reduce__(self):
        rebuild, arguments, (version, shape, dtype, fortran, raw) = self.array.__reduce__()
        return rebuild, arguments, (version, shape, dtype, fortran, raw.decode("latin1"))


def dumps(value: dict) -> bytes:
    blob = pickle.dumps(value, protocol=2)
    return blob.replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def pickles(drop: tuple[str, ...] = (), blue: int = 200,
            coarse_names: list[str] | None = None) -> dict[str, bytes]:
    """The three members as the official (Python 2) files hold them, their images in a shuffled
    order as in the real parts."""
    blobs = {"meta": dumps({"fine_label_names": FINE,
                            "coarse_label_names": coarse_names or COARSE})}
    for part_index, part in enumerate(PER_PART):
        rows = part_rows(part, drop)
        data = np.empty((len(rows), 3, 32, 32), dtype=np.uint8)
        for row, (fine, image) in enumerate(rows):
            data[row] = np.array([fine, image, blue + part_index], dtype=np.uint8)[:, None, None]
        blobs[part] = dumps({
            "batch_label": f"{part} batch 1 of 1",
            "filenames": [f"{FINE[fine]}_s_{image:06d}.png" for fine, image in rows],
            "fine_labels": [fine for fine, _ in rows],
            "coarse_labels": [COARSE.index(SUPERCLASS_OF[FINE[fine]]) for fine, _ in rows],
            "data": AsPython2Wrote(data.reshape(len(rows), -1)),
        })
    return blobs


def write_archive(path: Path, blobs: dict[str, bytes] | None = None) -> Path:
    blobs = pickles() if blobs is None else blobs
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        folder = tarfile.TarInfo("cifar-100-python")
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
        for member in ("file.txt~", *blobs):
            blob = blobs.get(member, b"")
            info = tarfile.TarInfo(f"cifar-100-python/{member}")
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))
    return path


def write_folder(folder: Path, blobs: dict[str, bytes] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for member, blob in (pickles() if blobs is None else blobs).items():
        (folder / member).write_bytes(blob)
    return folder


def load(cls, root: Path, **kwargs):
    kwargs.setdefault("download", False)
    return cls(root=str(root), **kwargs)


def class_rows(dataset, name: str) -> np.ndarray:
    split = next(split for split in dataset.splits.values() if name in split.names)
    position = split.names.index(name)
    start, count = int(split.start[position]), int(split.count[position])
    return dataset.images.array[start:start + count]


def test_shipped_split_lists_are_the_papers_sizes_disjoint_and_real_names():
    cifarfs = {phase: read_split_list(SPLITS_DIR / "cifarfs" / f"{phase}.txt")
               for phase in ("train", "val", "test")}
    fc100 = {phase: read_split_list(SPLITS_DIR / "fc100" / f"{phase}.txt")
             for phase in ("train", "val", "test")}
    assert [len(names) for names in cifarfs.values()] == [64, 16, 20]
    assert [len(names) for names in fc100.values()] == [12, 4, 4]
    for lists, universe in ((cifarfs, FINE), (fc100, COARSE)):
        every = [name for names in lists.values() for name in names]
        assert len(set(every)) == len(every)  # disjoint
        assert sorted(every) == universe  # together, every class (superclass) once
    # TADAM's class_split over the coarse labels (datasets/create_dataset_cifar100.py).
    assert [COARSE.index(name) for name in fc100["val"]] == [8, 11, 13, 16]
    assert [COARSE.index(name) for name in fc100["test"]] == [0, 7, 12, 14]


def test_cifarfs_from_the_archive(tmp_path):
    write_archive(tmp_path / "cifarfs" / "cifar-100-python.tar.gz")
    data = load(CIFARFS, tmp_path)
    assert data.input_shape == (3, 32, 32) and data.images.shape == (400, 3, 32, 32)
    for phase, size in (("train", 64), ("val", 16), ("test", 20)):
        assert data.num_classes(phase) == size
        assert data.splits[phase].names == read_split_list(SPLITS_DIR / "cifarfs" / f"{phase}.txt")
        assert data.splits[phase].count.tolist() == [PER_CLASS] * size
    for name in ("apple", "whale", "beaver", "worm"):
        rows = class_rows(data, name)
        assert (rows[:, 0] == FINE.index(name)).all()  # every image of its class, no other
        in_file_order = [image for part in PER_PART for fine, image in part_rows(part)
                         if fine == FINE.index(name)]
        assert rows[:, 1, 0, 0].tolist() == in_file_order  # CIFAR's train set first
        assert rows[:, 2, 0, 0].tolist() == [200, 200, 200, 201]
    assert data.normalize.mean.flatten().tolist() == pytest.approx([0.5071, 0.4865, 0.4409])
    assert data.normalize.std.flatten().tolist() == pytest.approx([0.2673, 0.2564, 0.2762])
    assert sorted(p.name for p in (tmp_path / "cifarfs" / "cache").iterdir()) == [
        "cifarfs-3x32x32-v1.json", "cifarfs-3x32x32-v1.u8", "cifarfs-sources.json"]


def test_episodes_hold_images_of_their_split_classes(tmp_path):
    write_archive(tmp_path / "cifarfs" / "cifar-100-python.tar.gz")
    data = load(CIFARFS, tmp_path)
    val = {FINE.index(name) for name in data.splits["val"].names}
    batch = data.sampler("val", 5, 1, 3).sample(8, torch.Generator().manual_seed(0))
    mean, std = data.normalize.mean, data.normalize.std
    raw = ((torch.cat([batch.support_x.view(8, 5, 1, 3, 32, 32),
                       batch.query_x.view(8, 5, 3, 3, 32, 32)], dim=2) * std + mean) * 255).round()
    for task in range(8):
        labels = raw[task, :, :, 0, 0, 0]  # [way, image]: the red plane, the fine label
        assert (labels == labels[:, :1]).all() and len(set(labels[:, 0].tolist())) == 5
        assert set(labels[:, 0].long().tolist()) <= val
        for way in range(5):
            assert len(set(raw[task, way, :, 1, 0, 0].tolist())) == 4  # four distinct images
    with pytest.raises(ConfigError, match=r"task.shots \+ task.queries = 5 but class .* of the "
                                          r"train split of cifarfs has only 4 images; lower them"):
        data.sampler("train", 5, 2, 3)


def test_fc100_splits_by_superclass(tmp_path):
    write_archive(tmp_path / "fc100" / "cifar-100-python.tar.gz")
    data = load(FC100, tmp_path)
    for phase, size in (("train", 60), ("val", 20), ("test", 20)):
        superclasses = read_split_list(SPLITS_DIR / "fc100" / f"{phase}.txt")
        names = data.splits[phase].names
        assert len(names) == size
        assert sorted(names) == sorted(fine for coarse in superclasses
                                       for fine in SUPERCLASSES[coarse])
        for name in names[:3]:
            assert (class_rows(data, name)[:, 0] == FINE.index(name)).all()
    assert {"baby", "whale", "bee"} <= set(data.splits["test"].names)


def test_archive_in_cifar100_is_shared_and_folder_equals_archive(tmp_path):
    write_archive(tmp_path / "shared" / "cifar100" / "cifar-100-python.tar.gz")
    write_folder(tmp_path / "extracted" / "cifarfs" / "cifar-100-python")
    from_archive = load(CIFARFS, tmp_path / "shared")
    assert load(FC100, tmp_path / "shared").num_classes("train") == 60
    from_folder = load(CIFARFS, tmp_path / "extracted")
    assert np.array_equal(from_archive.images.array, from_folder.images.array)
    assert from_archive.splits["test"].names == from_folder.splits["test"].names


def test_other_sizes_and_grayscale_resize(tmp_path):
    write_archive(tmp_path / "cifarfs" / "cifar-100-python.tar.gz")
    data = load(CIFARFS, tmp_path, image_size=16, channels=1)
    assert data.images.shape == (400, 1, 16, 16)
    rows = class_rows(data, "whale")
    red, green, blue = FINE.index("whale"), np.arange(4), np.array([200, 200, 200, 201])
    gray = (red * 299 + green * 587 + blue * 114) / 1000  # PIL's RGB -> L
    assert np.abs(rows[:, 0].astype(float) - gray[:, None, None]).max() <= 1


def test_cache_and_listing_are_reused_then_rebuilt_when_the_archive_changes(tmp_path, monkeypatch):
    archive = write_archive(tmp_path / "cifarfs" / "cifar-100-python.tar.gz")
    first = load(CIFARFS, tmp_path)
    assert class_rows(first, "apple")[:, 2, 0, 0].tolist() == [200, 200, 200, 201]
    real_read = cifar_module.read_cifar100
    reads = []

    def counting(*args, **kwargs):
        reads.append(1)
        return real_read(*args, **kwargs)

    monkeypatch.setattr(cifar_module, "read_cifar100", counting)
    monkeypatch.setattr(cifar_module, "_fill", lambda *a: pytest.fail("cache rebuilt"))
    second = load(CIFARFS, tmp_path)
    assert reads == [] and np.array_equal(first.images.array, second.images.array)

    monkeypatch.undo()
    write_archive(archive, pickles(blue=100))
    os.utime(archive, ns=(1, 1))  # a different mtime even on a coarse clock
    third = load(CIFARFS, tmp_path)
    assert class_rows(third, "apple")[:, 2, 0, 0].tolist() == [100, 100, 100, 101]


def test_missing_files_without_download(tmp_path):
    with pytest.raises(DataError, match=(
            r"^cifarfs: cifar-100-python.tar.gz not found in \S+/cifarfs or \S+/cifar100 and "
            r"dataset.download=false; put the official archive \(https://www.cs.toronto.edu/"
            r"~kriz/cifar-100-python.tar.gz\) or its extracted cifar-100-python/ folder there, "
            r"or set dataset.download=true$")):
        load(CIFARFS, tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_archive(tmp_path, damage):
    archive = write_archive(tmp_path / "fc100" / "cifar-100-python.tar.gz")
    blob = archive.read_bytes()
    archive.write_bytes(b"<html>rate limited</html>" if damage == "garbage"
                        else blob[:len(blob) // 2])
    with pytest.raises(DataError, match=r"^fc100: \S+/fc100/cifar-100-python.tar.gz is not a "
                                        r"readable tar.gz archive \(.*\): it is truncated or "
                                        r"corrupt; delete it and download it again"):
        load(FC100, tmp_path)


def test_archive_without_a_member(tmp_path):
    blobs = pickles()
    del blobs["meta"]
    write_archive(tmp_path / "cifarfs" / "cifar-100-python.tar.gz", blobs)
    with pytest.raises(DataError, match=r"cifar-100-python.tar.gz has no cifar-100-python/meta: "
                                        r"it is not the official CIFAR-100 python archive"):
        load(CIFARFS, tmp_path)


def test_a_foreign_pickle_is_refused_not_run(tmp_path):
    blobs = pickles()
    blobs["train"] = pickle.dumps(eval, protocol=2)  # would hand back a callable
    write_folder(tmp_path / "cifarfs" / "cifar-100-python", blobs)
    with pytest.raises(DataError, match=r"^cifarfs: \S+/cifarfs/cifar-100-python/train is not a "
                                        r"CIFAR-100 pickle \(it asks to build __builtin__.eval\); "
                                        r"replace it with the official file"):
        load(CIFARFS, tmp_path)


def test_split_list_naming_a_class_without_images(tmp_path):
    write_archive(tmp_path / "cifarfs" / "cifar-100-python.tar.gz", pickles(drop=("whale",)))
    with pytest.raises(DataError, match=r"^cifarfs: the test split list \S+/splits/cifarfs/"
                                        r"test.txt names 1 class\(es\) that \S+ has no images "
                                        r"of, e.g. 'whale'; it is not the official CIFAR-100"):
        load(CIFARFS, tmp_path)


def test_split_list_naming_an_absent_superclass(tmp_path):
    renamed = [name if name != "people" else "persons" for name in COARSE]
    write_archive(tmp_path / "fc100" / "cifar-100-python.tar.gz", pickles(coarse_names=renamed))
    with pytest.raises(DataError, match=r"^fc100: the test split list \S+/splits/fc100/test.txt "
                                        r"names 1 superclass\(es\) that .* e.g. 'people'"):
        load(FC100, tmp_path)


def test_download_is_checked_against_its_md5(tmp_path, monkeypatch):
    published = write_archive(tmp_path / "published" / "cifar-100-python.tar.gz")
    monkeypatch.setattr(CIFARFS, "archive_url", published.as_uri())
    monkeypatch.setattr(CIFARFS, "archive_md5", "0" * 32)
    with pytest.raises(DataError, match=r"downloaded cifar-100-python.tar.gz from file:\S+ but "
                                        r"its md5 is [0-9a-f]{32}, expected 0{32}"):
        load(CIFARFS, tmp_path / "root", download=True)
    assert list((tmp_path / "root" / "cifarfs").iterdir()) == []  # nothing half-downloaded

    from metarun.data.download import md5sum

    monkeypatch.setattr(CIFARFS, "archive_md5", md5sum(published))
    data = load(CIFARFS, tmp_path / "root", download=True)
    assert (tmp_path / "root" / "cifarfs" / "cifar-100-python.tar.gz").is_file()
    assert data.num_classes("val") == 16


@pytest.mark.parametrize("name", ["cifarfs", "fc100"])
def test_metarun_runs_on_it(tmp_path, name):
    write_archive(tmp_path / "data" / "cifar100" / "cifar-100-python.tar.gz")
    proc = run_metarun(
        "algo=protonet", f"dataset={name}", f"dataset.root={tmp_path / 'data'}",
        "dataset.download=false", "task.queries=3", "task.meta_batch_size=2",
        # whatever a specialize/ file says about training episodes, they must fit four images
        "algo.train_ways=5", "algo.train_shots=1", "algo.train_queries=3",
        "backbone.channels=8", "trainer.max_iters=2", "trainer.val_every=2",
        "trainer.val_episodes=2", "trainer.test_episodes=2", "trainer.eval_batch_size=2",
        "trainer.log_every=1", "trainer.progress=false", "hydra.run.dir=run", cwd=tmp_path,
    )
    check_ok(proc)
    results = read_results(tmp_path / "run")
    assert results["dataset"] == name
    assert results["meta_test"]["metric"] == "accuracy"
    assert 0.0 <= results["meta_test"]["mean"] <= 1.0
