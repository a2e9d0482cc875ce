"""CUB-200-2011 from a small tree (and .tgz) in the official layout, split as Chen et al. 2019.

Twelve classes named as the first twelve real ones, three to five JPEGs each of different sizes;
every image is one colour that says which class (red) and which image of it (green) it is.
"""

from __future__ import annotations

import io
import logging
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metarun.data import cub as cub_module
from metarun.data.cub import CUB, chen_split
from metarun.data.download import md5sum
from metarun.errors import ConfigError, DataError
from tests.runs import check_ok, read_results, run_metarun

CLASSES = [
    "001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross",
    "004.Groove_billed_Ani", "005.Crested_Auklet", "006.Least_Auklet", "007.Parakeet_Auklet",
    "008.Rhinoceros_Auklet", "009.Brewer_Blackbird", "010.Red_winged_Blackbird",
    "011.Rusty_Blackbird", "012.Yellow_headed_Blackbird",
]
SIZE = 16


def image_count(class_index: int) -> int:
    return 3 + class_index % 3


def jpeg(class_index: int, image_index: int, blue: int = 128) -> bytes:
    colour = (20 * class_index + 10, 40 * image_index + 20, blue)
    size = (30 + 7 * image_index, 24 + 5 * class_index)  # no two shapes alike: all get resized
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def tree_files(blue: int = 128) -> dict[str, bytes]:
    """``CUB_200_2011/...`` member name -> bytes, as in the official archive."""
    files = {"CUB_200_2011/classes.txt": "".join(f"{i + 1} {name}\n"
                                                 for i, name in enumerate(CLASSES)).encode()}
    for class_index, name in enumerate(CLASSES):
        bird = name.split(".", 1)[1]
        for image_index in range(image_count(class_index)):
            image = f"{bird}_{image_index + 1:04d}_{7000 + image_index}.jpg"
            files[f"CUB_200_2011/images/{name}/{image}"] = jpeg(class_index, image_index, blue)
    return files


def write_tree(root: Path, blue: int = 128) -> Path:
    for member, blob in tree_files(blue).items():
        path = root / "cub" / member
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
    return root / "cub" / "CUB_200_2011" / "images"


def write_archive(path: Path, files: dict[str, bytes] | None = None) -> Path:
    """A .tgz with folder entries and the ``._`` files a Mac leaves, which must be skipped."""
    files = tree_files() if files is None else files
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        folders = sorted({str(Path(member).parent) for member in files})
        for folder in ["attributes", *folders]:
            info = tarfile.TarInfo(folder)
            info.type = tarfile.DIRTYPE
            archive.addfile(info)
        extra = {"attributes.txt": b"1 has_bill_shape::curved\n"}
        if f"CUB_200_2011/images/{CLASSES[0]}" in folders:
            extra[f"CUB_200_2011/images/{CLASSES[0]}/._Black_footed_Albatross_0001.jpg"] = b"\0"
        for member, blob in reversed([*files.items(), *extra.items()]):  # not in sorted order
            info = tarfile.TarInfo(member)
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))
    return path


def load(root: Path, **kwargs) -> CUB:
    kwargs.setdefault("download", False)
    kwargs.setdefault("image_size", SIZE)
    return CUB(root=str(root), **kwargs)


def check_images(data: CUB) -> None:
    """Every class's rows: its images, in sorted file order, and no other class's."""
    for split in data.splits.values():
        for position, name in enumerate(split.names):
            start, count = int(split.start[position]), int(split.count[position])
            class_index = CLASSES.index(name)
            assert count == image_count(class_index)
            rows = data.images.array[start:start + count].astype(int)
            assert np.abs(rows[:, 0] - (20 * class_index + 10)).max() <= 3
            for image_index in range(count):
                assert np.abs(rows[image_index, 1] - (40 * image_index + 20)).max() <= 3


def test_chen_split_of_the_real_200_classes():
    classes = [f"{i:03d}.Bird_{i}" for i in range(200, 0, -1)]
    split = chen_split(classes)
    assert [len(split[phase]) for phase in ("train", "val", "test")] == [100, 50, 50]
    assert split["train"][:2] == ["001.Bird_1", "003.Bird_3"]
    assert split["val"][:2] == ["002.Bird_2", "006.Bird_6"]
    assert split["test"][:2] == ["004.Bird_4", "008.Bird_8"]
    assert sorted(sum(split.values(), [])) == sorted(classes)


def test_folder_layout(tmp_path, caplog):
    write_tree(tmp_path)
    with caplog.at_level(logging.WARNING, logger="metarun.data.cub"):
        data = load(tmp_path)
    assert "12 classes, not the 200 of CUB-200-2011" in caplog.text
    assert data.images.shape == (sum(map(image_count, range(12))), 3, SIZE, SIZE)
    assert data.splits["train"].names == CLASSES[0::2]
    assert data.splits["val"].names == CLASSES[1::4]
    assert data.splits["test"].names == CLASSES[3::4]
    check_images(data)
    assert data.normalize.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])


def test_archive_equals_folder_and_episodes_hold_their_classes(tmp_path):
    write_tree(tmp_path / "tree")
    write_archive(tmp_path / "archive" / "cub" / "CUB_200_2011.tgz")
    from_tree, from_archive = load(tmp_path / "tree"), load(tmp_path / "archive")
    assert np.array_equal(from_tree.images.array, from_archive.images.array)
    assert from_tree.splits["test"].names == from_archive.splits["test"].names
    check_images(from_archive)

    batch = from_archive.sampler("train", 3, 1, 2).sample(16, torch.Generator().manual_seed(0))
    mean, std = from_archive.normalize.mean, from_archive.normalize.std
    images = torch.cat([batch.support_x.view(16, 3, 1, 3, SIZE, SIZE),
                        batch.query_x.view(16, 3, 2, 3, SIZE, SIZE)], dim=2)
    red = ((images * std + mean) * 255)[:, :, :, 0, SIZE // 2, SIZE // 2]  # [task, way, image]
    classes = ((red - 10) / 20).round().long()
    train = {CLASSES.index(name) for name in CLASSES[0::2]}
    for task in range(16):
        assert (classes[task] == classes[task, :, :1]).all()
        assert set(classes[task, :, 0].tolist()) <= train and len(set(classes[task, :, 0])) == 3


def test_folder_wins_over_archive(tmp_path):
    write_tree(tmp_path)
    (tmp_path / "cub" / "CUB_200_2011.tgz").write_bytes(b"not read")
    assert load(tmp_path).num_classes("train") == 6


def test_archive_listing_and_cache_are_reused_then_rebuilt(tmp_path, monkeypatch):
    archive = write_archive(tmp_path / "cub" / "CUB_200_2011.tgz")
    first = load(tmp_path)
    monkeypatch.setattr(cub_module, "_archive_members",
                        lambda *a: pytest.fail("the archive was read again"))
    second = load(tmp_path)
    assert np.array_equal(first.images.array, second.images.array)
    monkeypatch.undo()
    write_archive(archive, tree_files(blue=30))
    os.utime(archive, ns=(1, 1))
    third = load(tmp_path)
    assert np.abs(third.images.array[:, 2].astype(int) - 30).max() <= 3


def test_folder_cache_is_reused_then_rebuilt_with_a_new_image(tmp_path, monkeypatch):
    images = write_tree(tmp_path)
    load(tmp_path)
    monkeypatch.setattr(cub_module, "decode_image", lambda *a: pytest.fail("decoded again"))
    assert load(tmp_path).splits["val"].count.tolist() == [4, 5, 3]
    monkeypatch.undo()
    (images / CLASSES[1] / "Laysan_Albatross_0005_9.jpg").write_bytes(jpeg(1, 4))
    assert load(tmp_path).splits["val"].count.tolist() == [5, 5, 3]


def test_classes_keep_their_image_counts(tmp_path):
    write_tree(tmp_path)
    data = load(tmp_path)
    assert data.splits["train"].count.tolist() == [3, 5, 4, 3, 5, 4]
    with pytest.raises(ConfigError, match=r"task.shots \+ task.queries = 4 but class "
                                          r"001.Black_footed_Albatross of the train split of cub "
                                          r"has only 3 images; lower them"):
        data.sampler("train", 5, 1, 3)


def test_missing_files_without_download(tmp_path):
    with pytest.raises(DataError, match=(
            r"^cub: neither \S+/cub/CUB_200_2011/images/ nor \S+/cub/CUB_200_2011.tgz exists and "
            r"dataset.download=false; put the official CUB_200_2011.tgz \(https://data.caltech.edu"
            r"/\S+\) there, extracted or not, or set dataset.download=true$")):
        load(tmp_path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_archive(tmp_path, damage):
    archive = write_archive(tmp_path / "cub" / "CUB_200_2011.tgz")
    blob = archive.read_bytes()
    archive.write_bytes(b"\x1f\x8b junk" if damage == "garbage" else blob[:len(blob) * 2 // 3])
    with pytest.raises(DataError, match=r"^cub: \S+/CUB_200_2011.tgz is not a readable tar.gz "
                                        r"archive \(.*\): it is truncated or corrupt; delete it"):
        load(tmp_path)


def test_archive_without_images(tmp_path):
    write_archive(tmp_path / "cub" / "CUB_200_2011.tgz", {"CUB_200_2011/README": b"hello"})
    with pytest.raises(DataError, match=r"^cub: no class folders in CUB_200_2011/images/ in "
                                        r"\S+CUB_200_2011.tgz: expected <NNN.Name>/<image>.jpg"):
        load(tmp_path)


def test_empty_class_folder(tmp_path):
    images = write_tree(tmp_path)
    (images / "013.Bobolink").mkdir()
    with pytest.raises(DataError, match=r"class folder 013.Bobolink in \S+/images/ has no images"):
        load(tmp_path)


def test_unreadable_image_is_named(tmp_path):
    images = write_tree(tmp_path)
    (images / CLASSES[2] / "Sooty_Albatross_0002_7001.jpg").write_bytes(b"\xff\xd8 junk")
    with pytest.raises(DataError, match=r"^cannot read image CUB_200_2011/images/"
                                        r"003.Sooty_Albatross/Sooty_Albatross_0002_7001.jpg "
                                        r"\(.*\); replace or remove it$"):
        load(tmp_path)


def test_unreadable_image_in_the_archive_is_named(tmp_path):
    files = tree_files()
    member = f"CUB_200_2011/images/{CLASSES[5]}/Least_Auklet_0001_7000.jpg"
    files[member] = b"GIF89a junk"
    write_archive(tmp_path / "cub" / "CUB_200_2011.tgz", files)
    with pytest.raises(DataError, match=rf"^cannot read image {member} in \S+CUB_200_2011.tgz"):
        load(tmp_path)


def test_download_is_checked_against_its_md5(tmp_path, monkeypatch):
    published = write_archive(tmp_path / "published" / "CUB_200_2011.tgz")
    monkeypatch.setattr(CUB, "archive_url", published.as_uri())
    monkeypatch.setattr(CUB, "archive_md5", "f" * 32)
    with pytest.raises(DataError, match=r"downloaded CUB_200_2011.tgz from file:\S+ but its md5 "
                                        r"is [0-9a-f]{32}, expected f{32}"):
        load(tmp_path / "root", download=True)
    assert list((tmp_path / "root" / "cub").iterdir()) == []
    monkeypatch.setattr(CUB, "archive_md5", md5sum(published))
    assert load(tmp_path / "root", download=True).num_classes("test") == 3
    assert (tmp_path / "root" / "cub" / "CUB_200_2011.tgz").is_file()


def test_metarun_runs_on_it(tmp_path):
    write_archive(tmp_path / "data" / "cub" / "CUB_200_2011.tgz")
    proc = run_metarun(
        "algo=protonet", "dataset=cub", f"dataset.root={tmp_path / 'data'}",
        "dataset.download=false", f"dataset.image_size={SIZE}", "task.ways=3",
        "task.queries=2", "task.meta_batch_size=2", "backbone.channels=8",
        # specialize/protonet_cub.yaml may set the paper's training episodes; too big here.
        "algo.train_ways=3", "algo.train_shots=1", "algo.train_queries=2",
        "trainer.max_iters=2", "trainer.val_every=2", "trainer.val_episodes=2",
        "trainer.test_episodes=2", "trainer.eval_batch_size=2", "trainer.log_every=1",
        "trainer.progress=false", "hydra.run.dir=run", cwd=tmp_path,
    )
    check_ok(proc)
    results = read_results(tmp_path / "run")
    assert results["dataset"] == "cub" and results["task"]["ways"] == 3
    assert results["meta_test"]["metric"] == "accuracy"
    assert 0.0 <= results["meta_test"]["mean"] <= 1.0
