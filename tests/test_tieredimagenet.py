"""tiered-ImageNet from Ren et al.'s files ({split}_images_png.pkl or {split}_images.npz, and
{split}_labels.pkl), written here in their exact formats with a few classes: the real loader, its
cache and its errors. No real tiered-ImageNet files are on this machine."""

from __future__ import annotations

import io
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metarun.data import tieredimagenet as tiered_module
from metarun.data.image_dataset import PHASES
from metarun.data.tieredimagenet import TieredImageNet
from metarun.errors import DataError
from tests.py2_pickle import python2_pickle
from tests.runs import check_ok, read_results, run_metarun

#: label_specific_str per split. "crane" is in two splits (ImageNet has two classes of that
#: name); train's "kite" has no images.
NAMES = {
    "train": ["house finch", "crane", "robin", "jay", "kite"],
    "val": ["tabby", "lynx", "cougar"],
    "test": ["crane", "cab", "jeep"],
}
USED = {"train": 4, "val": 3, "test": 3}
IMAGES = 20
CACHE_NAMES = {
    "train": ["house finch", "crane [train 1]", "robin", "jay"],
    "val": ["tabby", "lynx", "cougar"],
    "test": ["crane [test 0]", "cab", "jeep"],
}


def red_level(phase: str, label: int) -> int:
    return 20 + 20 * (sum(USED[earlier] for earlier in PHASES[:PHASES.index(phase)]) + label)


def fixture_labels(phase: str) -> np.ndarray:
    """Each class's images scattered over the split (a fixed shuffle)."""
    labels = np.repeat(np.arange(USED[phase]), IMAGES)
    return np.random.default_rng(PHASES.index(phase)).permutation(labels).astype(np.int32)


def fixture_images(phase: str) -> np.ndarray:
    """uint8 [N, 84, 84, 3] RGB: red = the class, green = the row, blue = a gradient."""
    labels = fixture_labels(phase)
    images = np.empty((len(labels), 84, 84, 3), dtype=np.uint8)
    for row, label in enumerate(labels):
        images[row, ..., 0] = red_level(phase, int(label))
        images[row, ..., 1] = row
        images[row, ..., 2] = (np.arange(84) * 3)[None, :]
    return images


def png(image: np.ndarray) -> np.ndarray:
    """PNG bytes as the uint8 [n, 1] array cv2.imencode returns."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8).reshape(-1, 1)


def write_tiered(folder: Path, form: str = "python2") -> None:
    """Ren et al.'s files: ``python2`` (the originals: Python 2 protocol-2 pickles, a list),
    ``python3`` (re-saved copies: protocol 4, a numpy object array) or ``npz`` (BGR arrays)."""
    folder.mkdir(parents=True, exist_ok=True)
    for phase in PHASES:
        labels = fixture_labels(phase)
        label_data = {
            "label_specific": labels,
            "label_general": (labels // 2).astype(np.int32),
            "label_specific_str": NAMES[phase],
            "label_general_str": {0: "birds", 1: "more birds"},
        }
        images = fixture_images(phase)
        if form == "npz":
            np.savez(folder / f"{phase}_images.npz", images=images[..., ::-1])
            encoded = None
        elif form == "python2":
            encoded = python2_pickle([png(image) for image in images])
        else:
            sequence = np.empty(len(images), dtype=object)
            sequence[:] = [png(image) for image in images]
            encoded = pickle.dumps(sequence, 4)
        if encoded is not None:
            (folder / f"{phase}_images_png.pkl").write_bytes(encoded)
        (folder / f"{phase}_labels.pkl").write_bytes(
            python2_pickle(label_data) if form != "python3" else pickle.dumps(label_data, 4))


def load(root: Path, **kwargs) -> TieredImageNet:
    return TieredImageNet(root=str(root), download=False, **kwargs)


def expected_cache(phase: str) -> np.ndarray:
    """The split's images grouped by class, each class's rows in file order, as [C, H, W]."""
    order = np.argsort(fixture_labels(phase), kind="stable")
    return fixture_images(phase)[order].transpose(0, 3, 1, 2)


def split_rows(data: TieredImageNet, phase: str) -> np.ndarray:
    start = int(data.splits[phase].start[0])
    return data.images.array[start:start + int(data.splits[phase].count.sum())]


@pytest.mark.parametrize("form", ["python2", "python3", "npz"])
def test_round_trip(tmp_path, form):
    write_tiered(tmp_path / "tieredimagenet", form)
    data = load(tmp_path)
    assert {split: data.splits[split].names for split in PHASES} == CACHE_NAMES
    assert {split: data.num_classes(split) for split in PHASES} == USED
    assert data.images.shape == (200, 3, 84, 84)
    assert all(data.splits[split].count.tolist() == [IMAGES] * USED[split] for split in PHASES)
    for phase in PHASES:  # exact pixels (PNG is lossless; npz BGR turned back to RGB)
        assert np.array_equal(split_rows(data, phase), expected_cache(phase)), phase


def test_python2_pickles_need_latin1(tmp_path):
    """The fixture is a real Python 2 pickle: a plain Python 3 load fails on it."""
    write_tiered(tmp_path / "tieredimagenet")
    with pytest.raises(UnicodeDecodeError):
        pickle.loads((tmp_path / "tieredimagenet" / "val_images_png.pkl").read_bytes())


def test_png_pickle_is_used_when_a_split_also_has_an_npz(tmp_path):
    folder = tmp_path / "tieredimagenet"
    write_tiered(folder)
    (folder / "test_images.npz").write_bytes(b"not an archive")
    data = load(tmp_path)
    assert np.array_equal(split_rows(data, "test"), expected_cache("test"))


@pytest.mark.parametrize("form", ["python2", "npz"])
def test_resized_to_image_size(tmp_path, form):
    write_tiered(tmp_path / "tieredimagenet", form)
    data = load(tmp_path, image_size=16)
    assert data.images.shape == (200, 3, 16, 16)
    for phase in PHASES:  # a constant red channel stays constant through the resize
        red = split_rows(data, phase)[:, 0].reshape(-1, 256)
        assert (red.min(1) == red.max(1)).all()
        assert red[::IMAGES, 0].tolist() == [red_level(phase, k) for k in range(USED[phase])]


def test_sampler_draws_each_label_from_one_class_of_its_split(tmp_path):
    write_tiered(tmp_path / "tieredimagenet")
    data = load(tmp_path, in_memory=False)  # read from the mapped file per episode
    assert not data.images.resident
    batch = data.sampler("val", 3, 1, 4).sample(3, torch.Generator().manual_seed(1))
    mean = torch.tensor(tiered_module.MEAN).view(3, 1, 1)
    std = torch.tensor(tiered_module.STD).view(3, 1, 1)
    for task in range(3):
        images = torch.cat([batch.support_x[task], batch.query_x[task]])
        labels = torch.cat([batch.support_y[task], batch.query_y[task]])
        red = ((images * std + mean) * 255)[:, 0].mean(dim=(1, 2)).round().int()
        levels = [set(red[labels == label].tolist()) for label in range(3)]
        assert all(len(level) == 1 for level in levels)
        assert set.union(*levels) == {red_level("val", k) for k in range(3)}


def test_cache_is_reused_and_rebuilt_when_a_file_changes(tmp_path, monkeypatch):
    folder = tmp_path / "tieredimagenet"
    write_tiered(folder)
    first = load(tmp_path)
    cache = folder / "cache" / "tieredimagenet-3x84x84-v1.u8"
    stamp = cache.stat().st_mtime_ns
    decoded = Counter()
    real = tiered_module._decode_pngs

    def counting(*args, **kwargs):
        decoded["splits"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(tiered_module, "_decode_pngs", counting)
    second = load(tmp_path)
    assert cache.stat().st_mtime_ns == stamp and decoded["splits"] == 0
    assert np.array_equal(first.images.array, second.images.array)
    path = folder / "val_images_png.pkl"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 5_000_000_000))
    load(tmp_path)
    load(tmp_path)
    assert decoded["splits"] == 3  # one rebuild: every split, once


# ---------------------------------------------------------------------------------- errors
def check_error(root: Path, pattern: str) -> None:
    with pytest.raises(DataError, match=pattern) as error:
        load(root)
    assert "\n" not in str(error.value)


def test_missing_files(tmp_path):
    folder = tmp_path / "tieredimagenet"
    write_tiered(folder)
    (folder / "val_labels.pkl").unlink()
    (folder / "test_images_png.pkl").unlink()
    check_error(tmp_path, r"tieredimagenet: val_labels.pkl, test_images_png.pkl not found in "
                          r".*tieredimagenet; tiered-ImageNet cannot be downloaded automatically "
                          r"\(ImageNet's licence\): put Ren et al.'s")


def test_truncated_png_pickle(tmp_path):
    folder = tmp_path / "tieredimagenet"
    write_tiered(folder)
    path = folder / "train_images_png.pkl"
    path.write_bytes(path.read_bytes()[:3000])
    check_error(tmp_path, r"train_images_png.pkl is corrupt or truncated \(.*\); download Ren")


@pytest.mark.parametrize(("content", "pattern"), [
    ({"labels": [0, 1]}, r"test_labels.pkl is not a tiered-ImageNet labels pickle .* but a dict "
                         r"with keys \['labels'\]"),
    ({"label_specific": np.array([0, 5]), "label_specific_str": ["a", "b"]},
     r"test_labels.pkl: label_specific is not one class number \(0 to 1\) per image"),
], ids=["keys", "range"])
def test_labels_of_the_wrong_structure(tmp_path, content, pattern):
    folder = tmp_path / "tieredimagenet"
    write_tiered(folder)
    (folder / "test_labels.pkl").write_bytes(python2_pickle(content))
    check_error(tmp_path, pattern)


def test_unreadable_png(tmp_path):
    folder = tmp_path / "tieredimagenet"
    write_tiered(folder)
    items = [png(image) for image in fixture_images("val")]
    items[5] = np.frombuffer(b"\x89PNG broken", dtype=np.uint8).reshape(-1, 1)
    (folder / "val_images_png.pkl").write_bytes(python2_pickle(items))
    check_error(tmp_path, r"cannot read image val_images_png.pkl item 5 \(.*\); replace or "
                          r"remove it")


def test_images_and_labels_of_different_lengths(tmp_path):
    folder = tmp_path / "tieredimagenet"
    write_tiered(folder)
    items = [png(image) for image in fixture_images("val")][:-1]
    (folder / "val_images_png.pkl").write_bytes(python2_pickle(items))
    check_error(tmp_path, r"val_images_png.pkl holds 59 images but val_labels.pkl labels 60; the "
                          r"two files do not belong together")


@pytest.mark.parametrize(("write", "pattern"), [
    (lambda path, images: np.savez_compressed(path, images=images),
     r"test_images.npz is compressed \(np.savez_compressed\)"),
    (lambda path, images: np.savez(path, images=images[:-1]),
     r"test_images.npz holds 59 images but test_labels.pkl labels 60"),
    (lambda path, images: np.savez(path, images=images.astype(np.float32)),
     r"test_images.npz: images is float32 \[60, 84, 84, 3\], not uint8"),
    (lambda path, images: np.savez(path, pixels=images), r"test_images.npz has no images array"),
    (lambda path, images: path.write_bytes(b"PK\x03\x04 cut short"),
     r"test_images.npz is corrupt or truncated"),
], ids=["compressed", "length", "dtype", "key", "torn"])
def test_bad_npz(tmp_path, write, pattern):
    folder = tmp_path / "tieredimagenet"
    write_tiered(folder, "npz")
    write(folder / "test_images.npz", fixture_images("test")[..., ::-1])
    check_error(tmp_path, pattern)


def test_truncated_npz(tmp_path):
    folder = tmp_path / "tieredimagenet"
    write_tiered(folder, "npz")
    path = folder / "train_images.npz"
    with open(path, "r+b") as file:
        file.truncate(path.stat().st_size - 5000)
    check_error(tmp_path, r"train_images.npz is (corrupt or )?truncated")


# ---------------------------------------------------------------------------------- end to end
def test_protonet_runs_on_tieredimagenet(tmp_path):
    write_tiered(tmp_path / "data" / "tieredimagenet")
    proc = run_metarun(
        "algo=protonet", "dataset=tieredimagenet", f"dataset.root={tmp_path / 'data'}",
        "dataset.image_size=16", "backbone.channels=8", "task.ways=3", "task.shots=1",
        "task.queries=4", "task.meta_batch_size=2", "trainer.max_iters=2", "trainer.val_every=2",
        "trainer.val_episodes=2", "trainer.test_episodes=2", "trainer.log_every=1",
        "trainer.eval_batch_size=2", "trainer.progress=false", "hydra.run.dir=run", cwd=tmp_path)
    check_ok(proc)
    results = read_results(tmp_path / "run")
    assert results["dataset"] == "tieredimagenet" and results["meta_test"]["episodes"] == 2
    assert 0 <= results["meta_test"]["mean"] <= 1
