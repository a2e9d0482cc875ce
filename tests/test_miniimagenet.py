"""mini-ImageNet from both layouts people have (learn2learn/torchmeta pickles; images + Ravi lists),
written here in their exact formats with a few classes: the real loader, its cache and its errors.
No real mini-ImageNet images are on this machine; the real Ravi lists are (../shared/data)."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metarun.data import miniimagenet as mini_module
from metarun.data.download import md5sum
from metarun.data.image_dataset import PHASES
from metarun.data.miniimagenet import LIST_MD5, LIST_URL, MiniImageNet
from metarun.errors import DataError
from tests.py2_pickle import python2_pickle
from tests.runs import check_ok, read_results, run_metarun
from tests.test_download import closed_port_url, serve  # noqa: F401 - fixtures

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


# ---------------------------------------------------------------------------------- images + lists
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
def check_error(root: Path, pattern: str, **kwargs) -> None:
    with pytest.raises(DataError, match=pattern) as error:
        load(root, **kwargs)
    assert "\n" not in str(error.value)


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


def test_real_list_format_round_trips_through_csv(tmp_path):
    """The fixture lists are what the csv module reads from the real ones: same dialect."""
    lists = write_images(tmp_path / "miniimagenet")
    rows = list(csv.reader(io.StringIO(lists["train"].read_text())))
    assert rows[0] == ["filename", "label"] and rows[1] == ["n0100000100000001.jpg", "n01000001"]


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
