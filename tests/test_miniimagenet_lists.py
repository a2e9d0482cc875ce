"""mini-ImageNet from images/ and Ravi & Larochelle's lists, written here in their exact format
(the real lists' header and names, fixture classes): the real loader, its cache, the lists'
download and its errors. The real lists are in ../shared/data; no real images are."""

from __future__ import annotations

import hashlib
import os
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from metarun.data import miniimagenet as mini_module
from metarun.data.download import md5sum
from metarun.data.image_dataset import PHASES
from metarun.data.miniimagenet import LIST_MD5, LIST_URL
from tests.miniimagenet_fixtures import (
    PIXELS,
    assert_classes,
    check_error,
    class_value,
    filename,
    load,
    red_levels,
    write_images,
    write_pickles,
)
from tests.test_download import closed_port_url, serve  # noqa: F401 - fixtures


@pytest.mark.parametrize("lists_in", [".", "splits/ravi"])
def test_images_and_lists_round_trip(tmp_path, lists_in):
    write_images(tmp_path / "miniimagenet", lists_in)
    data = load(tmp_path)
    assert_classes(data)
    for split in PHASES:  # JPEG and a resize from 96x80: the class's red level within 2
        for wnid, levels in red_levels(data, split).items():
            assert all(abs(level - class_value(wnid)) <= 2 for level in levels), wnid


def test_both_layouts_give_the_same_classes_and_images(tmp_path):
    write_pickles(tmp_path / "a" / "miniimagenet")
    write_images(tmp_path / "b" / "miniimagenet", size=(PIXELS, PIXELS))
    from_pickles, from_images = load(tmp_path / "a"), load(tmp_path / "b")
    assert from_pickles.splits["train"].names == from_images.splits["train"].names
    difference = (from_pickles.images.array.astype(int) - from_images.images.array).mean(axis=0)
    assert np.abs(difference).max() < 3  # JPEG at quality 95 against the exact pixels


def test_image_cache_is_reused_and_rebuilt_when_an_image_changes(tmp_path, monkeypatch):
    folder = tmp_path / "miniimagenet"
    write_images(folder)
    load(tmp_path)
    cache = folder / "cache" / "miniimagenet-3x84x84-v1.u8"
    stamp = cache.stat().st_mtime_ns
    decoded = Counter()
    real_decode = mini_module.decode_image

    def counting(*args, **kwargs):
        decoded["images"] += 1
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(mini_module, "decode_image", counting)
    load(tmp_path)
    assert cache.stat().st_mtime_ns == stamp and decoded["images"] == 0
    Image.fromarray(np.full((84, 84, 3), 240, np.uint8)).save(
        folder / "images" / filename("n01000002", 0))
    changed = load(tmp_path)
    assert decoded["images"] == 200
    assert 240 in red_levels(changed, "train")["n01000002"]


def test_real_ravi_lists_parse_into_the_published_split(shared_data_root):
    folder = shared_data_root / "miniimagenet" / "splits" / "ravi"
    if not folder.is_dir():
        pytest.skip(f"the Ravi lists are not under {folder}")
    classes = {phase: mini_module._read_list(folder / f"{phase}.csv") for phase in PHASES}
    assert {phase: len(found) for phase, found in classes.items()} == {
        "train": 64, "val": 16, "test": 20}
    assert all(len(files) == 600 for found in classes.values() for files in found.values())
    assert len(set().union(*classes.values())) == 100  # no class in two splits
    assert {phase: md5sum(folder / f"{phase}.csv") for phase in PHASES} == LIST_MD5
    assert LIST_URL.startswith("https://raw.githubusercontent.com/twitter/meta-learning-lstm/")


def test_missing_lists_are_downloaded_with_their_md5(tmp_path, serve, monkeypatch):  # noqa: F811
    lists = write_images(tmp_path / "published", lists_in=".")
    base = serve(tmp_path / "published")
    monkeypatch.setattr(mini_module, "LIST_URL", base + "/{phase}.csv")
    monkeypatch.setattr(mini_module, "LIST_MD5", {
        phase: hashlib.md5(path.read_bytes()).hexdigest() for phase, path in lists.items()})
    folder = tmp_path / "miniimagenet"
    folder.mkdir()
    os.symlink(tmp_path / "published" / "images", folder / "images")
    data = load(tmp_path, download=True)
    assert_classes(data)
    assert sorted(path.name for path in (folder / "splits" / "ravi").iterdir()) == [
        "test.csv", "train.csv", "val.csv"]


def test_missing_list_offline_is_one_line(tmp_path, closed_port_url, monkeypatch):  # noqa: F811
    folder = tmp_path / "miniimagenet"
    write_images(folder)
    (folder / "splits" / "ravi" / "val.csv").unlink()
    monkeypatch.setattr(mini_module, "LIST_URL", closed_port_url.rsplit("/", 1)[0] + "/{phase}.csv")
    check_error(tmp_path, r"^could not download val.csv from http://127.0.0.1:\d+/val.csv \(.*\); "
                          r"put the official file at .*val.csv", download=True)


# ---------------------------------------------------------------------------------- errors
def test_list_naming_a_missing_image(tmp_path):
    folder = tmp_path / "miniimagenet"
    write_images(folder)
    (folder / "images" / filename("n02000003", 7)).unlink()
    check_error(tmp_path, r"image n0200000300000008.jpg named in .*splits/ravi/val.csv is not in "
                          r".*miniimagenet/images; add it")


def test_unreadable_image(tmp_path):
    folder = tmp_path / "miniimagenet"
    write_images(folder)
    (folder / "images" / filename("n03000001", 4)).write_bytes(b"<html>not an image</html>")
    check_error(tmp_path, r"cannot read image .*images/n0300000100000005.jpg \(.*\); replace or "
                          r"remove it")


def test_missing_lists_without_download(tmp_path):
    folder = tmp_path / "miniimagenet"
    write_images(folder)
    (folder / "splits" / "ravi" / "test.csv").unlink()
    check_error(tmp_path, r"found images/ but the split list test.csv is in neither .* and "
                          r"dataset.download=false")


def test_lists_sharing_a_class(tmp_path):
    folder = tmp_path / "miniimagenet"
    lists = write_images(folder)
    with open(lists["test"], "a") as file:
        file.write(f"{filename('n01000001', 0)},n01000001\n")
    check_error(tmp_path, r"class n01000001 is in both train.csv and test.csv")


def test_list_without_the_header(tmp_path):
    folder = tmp_path / "miniimagenet"
    lists = write_images(folder)
    lists["val"].write_text("\n".join(lists["val"].read_text().splitlines()[1:]))
    check_error(tmp_path, r"val.csv starts with 'n0200000100000001.jpg,n02000001', not the header "
                          r"filename,label")
