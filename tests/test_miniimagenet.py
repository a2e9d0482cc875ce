"""mini-ImageNet from the pickles learn2learn and torchmeta download, written here in their exact
format with a few classes: the real loader, its cache, its errors, and a run through the CLI.
No real mini-ImageNet is on this machine."""

from __future__ import annotations

import pickle
from collections import Counter

import numpy as np
import pytest
import torch

from metarun.data import miniimagenet as mini_module
from metarun.data.image_dataset import PHASES
from tests.miniimagenet_fixtures import (
    CLASSES,
    IMAGES,
    assert_classes,
    check_error,
    class_value,
    fixture_image,
    load,
    red_levels,
    write_images,
    write_pickles,
)
from tests.runs import check_ok, read_results, run_metarun


# ---------------------------------------------------------------------------------- pickles
@pytest.mark.parametrize(("val_name", "python2", "rows_as_arrays"), [
    ("val", False, False), ("validation", False, False), ("val", True, True),
], ids=["torchmeta", "learn2learn", "python2"])
def test_pickles_round_trip(tmp_path, val_name, python2, rows_as_arrays):
    folder = tmp_path / "miniimagenet"
    write_pickles(folder, val_name, python2, rows_as_arrays)
    data = load(tmp_path)
    assert_classes(data)
    # Exact pixels, grouped by class in the pickle's row order: class n02000002's images are
    # the val rows that class_dict names, in order (number 19 first: the rows are reversed).
    part = data.splits["val"]
    first = int(part.start[1])
    expected = np.stack([fixture_image("n02000002", number).transpose(2, 0, 1)
                         for number in reversed(range(IMAGES))])
    assert np.array_equal(data.images.array[first:first + IMAGES], expected)
    assert data.input_shape == (3, 84, 84) and data.task_type == "classification"


def test_pickles_resized_to_image_size(tmp_path):
    write_pickles(tmp_path / "miniimagenet")
    data = load(tmp_path, image_size=16)
    assert data.images.shape == (200, 3, 16, 16) and data.input_shape == (3, 16, 16)
    for split in PHASES:  # a constant red channel stays constant through the resize
        assert red_levels(data, split) == {wnid: {class_value(wnid)} for wnid in CLASSES[split]}
    gray = load(tmp_path, image_size=16, channels=1)
    assert gray.images.shape == (200, 1, 16, 16)


def test_sampler_draws_each_label_from_one_class_of_its_split(tmp_path):
    write_pickles(tmp_path / "miniimagenet")
    data = load(tmp_path)
    batch = data.sampler("test", 3, 2, 5).sample(4, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (4, 6, 3, 84, 84) and batch.query_x.shape == (4, 15, 3, 84, 84)
    mean = torch.tensor(mini_module.MEAN).view(3, 1, 1)
    std = torch.tensor(mini_module.STD).view(3, 1, 1)
    test_levels = {class_value(wnid) for wnid in CLASSES["test"]}
    for task in range(4):
        images = torch.cat([batch.support_x[task], batch.query_x[task]])
        labels = torch.cat([batch.support_y[task], batch.query_y[task]])
        red = ((images * std + mean) * 255)[:, 0].mean(dim=(1, 2)).round().int()
        levels = [set(red[labels == label].tolist()) for label in range(3)]
        assert all(len(level) == 1 for level in levels)  # one class per label
        assert set.union(*levels) <= test_levels and len(set.union(*levels)) == 3


def test_both_layouts_present_the_pickles_win(tmp_path):
    folder = tmp_path / "miniimagenet"
    write_pickles(folder)
    lists = write_images(folder)
    for image in (folder / "images").iterdir():
        image.unlink()  # the images layout would now fail: the pickles must be what is read
    data = load(tmp_path)
    assert_classes(data)
    assert lists["train"].is_file()


def test_pickle_cache_is_reused_without_reading_a_pickle(tmp_path, monkeypatch):
    write_pickles(tmp_path / "miniimagenet")
    first = load(tmp_path)
    cache = tmp_path / "miniimagenet" / "cache" / "miniimagenet-3x84x84-v1.u8"
    record = tmp_path / "miniimagenet" / "cache" / "miniimagenet-pickles.json"
    stamps = cache.stat().st_mtime_ns, record.stat().st_mtime_ns

    def no_reading(*args, **kwargs):
        raise AssertionError("a pickle was read although the cache is valid")

    monkeypatch.setattr(mini_module, "load_pickle", no_reading)
    second = load(tmp_path)
    assert (cache.stat().st_mtime_ns, record.stat().st_mtime_ns) == stamps
    assert np.array_equal(first.images.array, second.images.array)
    assert_classes(second)


def test_pickle_cache_is_rebuilt_when_a_pickle_changes(tmp_path):
    folder = tmp_path / "miniimagenet"
    write_pickles(folder)
    load(tmp_path)
    test_pickle = folder / "mini-imagenet-cache-test.pkl"
    data = pickle.loads(test_pickle.read_bytes())
    data["image_data"][data["class_dict"]["n03000003"]] = 7
    data["class_dict"]["n03000009"] = data["class_dict"].pop("n03000001")
    test_pickle.write_bytes(pickle.dumps(data, 4))
    rebuilt = load(tmp_path)
    assert rebuilt.splits["test"].names == ["n03000002", "n03000003", "n03000009"]
    levels = red_levels(rebuilt, "test")
    assert levels["n03000003"] == {7} and levels["n03000009"] == {class_value("n03000001")}


# ---------------------------------------------------------------------------------- errors
def test_neither_layout(tmp_path):
    check_error(tmp_path, r"neither mini-imagenet-cache-\{train,val,test\}.pkl nor images/ .* "
                          r"found in .*miniimagenet; mini-ImageNet cannot be downloaded "
                          r"automatically \(ImageNet's licence\): put the pickles .*learn2learn")


def test_some_pickles_missing(tmp_path):
    folder = tmp_path / "miniimagenet"
    write_pickles(folder)
    (folder / "mini-imagenet-cache-val.pkl").unlink()
    check_error(tmp_path, r"has mini-imagenet-cache-train.pkl, mini-imagenet-cache-test.pkl but "
                          r"not mini-imagenet-cache-val.pkl or mini-imagenet-cache-validation.pkl")


def test_truncated_pickle(tmp_path):
    folder = tmp_path / "miniimagenet"
    write_pickles(folder)
    path = folder / "mini-imagenet-cache-train.pkl"
    path.write_bytes(path.read_bytes()[:100_000])
    check_error(tmp_path, r"mini-imagenet-cache-train.pkl is corrupt or truncated \(.*\); "
                          r"download it again")


@pytest.mark.parametrize(("content", "pattern"), [
    ({"images": 1, "labels": 2}, r"is not a mini-ImageNet pickle .* but a dict with keys "
                                 r"\['images', 'labels'\]"),
    ([1, 2], r"is not a mini-ImageNet pickle .* but a list"),
    ({"image_data": np.zeros((2, 84, 84, 3), np.float32), "class_dict": {"n1": [0]}},
     r"image_data is float32 \[2, 84, 84, 3\], not uint8"),
    ({"image_data": np.zeros((2, 84, 84, 3), np.uint8), "class_dict": {"n1": [0, 2]}},
     r"class_dict\['n1'\] is not a list of row numbers of image_data \(0 to 1\)"),
    (Counter(), r"it asks to build collections.Counter, and metarun rebuilds only numpy arrays"),
], ids=["keys", "list", "dtype", "rows", "foreign"])
def test_pickle_of_the_wrong_structure(tmp_path, content, pattern):
    folder = tmp_path / "miniimagenet"
    write_pickles(folder)
    (folder / "mini-imagenet-cache-test.pkl").write_bytes(pickle.dumps(content))
    check_error(tmp_path, r"mini-imagenet-cache-test.pkl.*" + pattern)


def test_pickles_sharing_a_class(tmp_path):
    folder = tmp_path / "miniimagenet"
    write_pickles(folder)
    path = folder / "mini-imagenet-cache-val.pkl"
    data = pickle.loads(path.read_bytes())
    data["class_dict"]["n01000003"] = data["class_dict"].pop("n02000001")
    path.write_bytes(pickle.dumps(data))
    check_error(tmp_path, r"class n01000003 is in both mini-imagenet-cache-train.pkl and "
                          r"mini-imagenet-cache-val.pkl; splits must not share classes")


# ---------------------------------------------------------------------------------- end to end
def test_protonet_runs_on_miniimagenet_pickles(tmp_path):
    write_pickles(tmp_path / "data" / "miniimagenet")
    proc = run_metarun(
        "algo=protonet", "dataset=miniimagenet", f"dataset.root={tmp_path / 'data'}",
        "dataset.download=false", "dataset.image_size=16", "backbone.channels=8",
        "task.ways=3", "task.shots=1", "task.queries=4", "task.meta_batch_size=2",
        "trainer.max_iters=2", "trainer.val_every=2", "trainer.val_episodes=2",
        "trainer.test_episodes=2", "trainer.log_every=1", "trainer.eval_batch_size=2",
        "trainer.progress=false", "hydra.run.dir=run", cwd=tmp_path)
    check_ok(proc)
    results = read_results(tmp_path / "run")
    assert results["dataset"] == "miniimagenet" and results["meta_test"]["episodes"] == 2
    assert 0 <= results["meta_test"]["mean"] <= 1
    assert (tmp_path / "data" / "miniimagenet" / "cache" / "miniimagenet-3x16x16-v1.u8").is_file()
