"""Omniglot: official layout -> cached tensors -> non-overlapping splits, and clear errors."""

from __future__ import annotations

import os
import shutil
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from metarun.data import omniglot as omniglot_module
from metarun.data import omniglot_files
from metarun.data.omniglot import Omniglot
from metarun.errors import ConfigError, DataError
from tests.conftest import FAKE_ALPHABETS, fake_drawing


def load(root: Path, **kwargs) -> Omniglot:
    kwargs.setdefault("download", False)  # tests never touch the network unless they mean to
    return Omniglot(root=str(root), **kwargs)


def expected_image(character: str, drawing: int) -> np.ndarray:
    """At 105 px there is no resize, so the decoded image must be exactly the inverted ink."""
    ink = np.asarray(fake_drawing(character, drawing).convert("L"))
    return 255 - ink


@pytest.mark.parametrize("form", ["zip", "folder"])
def test_fake_round_trip(tmp_path, make_fake_omniglot, form):
    make_fake_omniglot(tmp_path, form=form)
    data = load(tmp_path, image_size=105)

    names = [f"{a}/character{n:02d}" for s in ("background", "evaluation")
             for a in sorted(FAKE_ALPHABETS[s]) for n in (1, 2)]
    assert data.characters == names
    assert data.character_sets == ["background"] * 6 + ["evaluation"] * 4
    assert data.images.shape == (10, 20, 105, 105) and data.images.dtype == torch.uint8
    for index in (0, 7):
        for drawing in (0, 19):
            decoded = data.images[index, drawing].numpy()
            assert np.array_equal(decoded, expected_image(names[index], drawing + 1))
    # Ink is bright on a dark background: most pixels are background.
    assert data.images.float().mean() < 80
    assert {split: data.num_classes(split) for split in ("train", "val", "test")} == {
        "train": 16, "val": 8, "test": 16
    }
    assert data.input_shape == (1, 105, 105) and data.output_size(5) == 5
    assert data.task_type == "classification"


def test_zip_and_folder_give_the_same_tensors(tmp_path, make_fake_omniglot):
    make_fake_omniglot(tmp_path / "a", form="zip")
    make_fake_omniglot(tmp_path / "b", form="folder")
    from_zip, from_folder = load(tmp_path / "a"), load(tmp_path / "b")
    assert from_zip.images.shape == (10, 20, 28, 28)
    assert torch.equal(from_zip.images, from_folder.images)
    assert from_zip.characters == from_folder.characters


def test_parallel_decode_matches_inline(tmp_path, make_fake_omniglot, monkeypatch):
    make_fake_omniglot(tmp_path)
    inline = load(tmp_path, cache_dir=str(tmp_path / "inline"))
    monkeypatch.setattr(omniglot_files, "CHUNK_IMAGES", 16)
    parallel = load(tmp_path, cache_dir=str(tmp_path / "parallel"))
    assert torch.equal(inline.images, parallel.images)


def test_missing_files_without_download_name_them(tmp_path):
    with pytest.raises(DataError, match=r"images_background.zip and images_evaluation.zip not "
                                        r"found in .*omniglot and dataset.download=false"):
        load(tmp_path)


def test_not_a_zip(tmp_path, make_fake_omniglot):
    folder = make_fake_omniglot(tmp_path)
    (folder / "images_background.zip").write_bytes(b"<html>rate limited</html>")
    with pytest.raises(DataError, match=r"images_background.zip is not a readable zip archive"):
        load(tmp_path)


def test_truncated_zip(tmp_path, make_fake_omniglot):
    folder = make_fake_omniglot(tmp_path)
    archive = folder / "images_evaluation.zip"
    archive.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    with pytest.raises(DataError, match=r"images_evaluation.zip is not a readable zip.*truncated"):
        load(tmp_path)


def test_wrong_layout(tmp_path, make_fake_omniglot):
    folder = make_fake_omniglot(tmp_path)
    with zipfile.ZipFile(folder / "images_background.zip", "w") as archive:
        archive.writestr("background/Alpha/character01/0001_01.png", b"")
    with pytest.raises(DataError, match=r"images_background.zip does not have the Omniglot "
                                        r"layout: expected images_background/<Alphabet>"):
        load(tmp_path)


def test_empty_character_folder(tmp_path, make_fake_omniglot):
    folder = make_fake_omniglot(tmp_path, form="folder")
    for png in (folder / "images_evaluation" / "Delta" / "character02").iterdir():
        png.unlink()
    with pytest.raises(DataError, match=r"images_evaluation/Delta/character02/ has no PNG"):
        load(tmp_path)


def test_unequal_drawing_counts(tmp_path, make_fake_omniglot):
    folder = make_fake_omniglot(tmp_path, form="folder")
    (folder / "images_background" / "Beta" / "character01" / "0003_20.png").unlink()
    with pytest.raises(DataError, match=r"Beta/character01 has 19 drawings but .* has 20"):
        load(tmp_path)


@pytest.mark.parametrize("chunk", [10_000, 16], ids=["inline", "workers"])
def test_unreadable_image(tmp_path, make_fake_omniglot, monkeypatch, chunk):
    monkeypatch.setattr(omniglot_files, "CHUNK_IMAGES", chunk)
    folder = make_fake_omniglot(tmp_path, form="folder")
    (folder / "images_background" / "Gamma" / "character01" / "0005_07.png").write_bytes(b"junk")
    with pytest.raises(DataError, match=r"cannot decode images_background/Gamma/character01/"
                                        r"0005_07.png .*corrupt"):
        load(tmp_path)


def test_split_list_naming_a_missing_class(tmp_path, make_fake_omniglot):
    folder = make_fake_omniglot(tmp_path)
    train = folder / "splits" / "vinyals" / "train.txt"
    lines = train.read_text().splitlines()
    train.write_text("\n".join(lines + ["Klingon/character07/rot090"]) + "\n")
    with pytest.raises(DataError, match=rf"train.txt, line {len(lines) + 1}: class "
                                        r"Klingon/character07/rot090 names a character"):
        load(tmp_path)


def test_split_lists_that_share_a_character_are_rejected(tmp_path, make_fake_omniglot):
    folder = make_fake_omniglot(tmp_path)
    val = folder / "splits" / "vinyals" / "val.txt"
    val.write_text(val.read_text() + "Alpha/character01/rot000\n")
    with pytest.raises(DataError, match=r"val.txt, line 9: .*train split too"):
        load(tmp_path)


def test_missing_split_list_without_download(tmp_path, make_fake_omniglot):
    folder = make_fake_omniglot(tmp_path)
    (folder / "splits" / "vinyals" / "test.txt").unlink()
    with pytest.raises(DataError, match=r"split list test.txt not found"):
        load(tmp_path)


def test_unknown_split(tmp_path, make_fake_omniglot):
    make_fake_omniglot(tmp_path)
    with pytest.raises(ConfigError, match=r"dataset.split='bogus'.*vinyals, lake"):
        load(tmp_path, split="bogus")


def test_lake_split_holds_out_the_last_five_background_alphabets(tmp_path, make_fake_omniglot):
    background = [f"Script{i}" for i in range(1, 8)]
    make_fake_omniglot(tmp_path, alphabets={"background": background, "evaluation": ["Zed"]},
                       characters=1, split_lists=False)
    data = load(tmp_path, split="lake")
    alphabets = {split: {data.characters[i].split("/")[0] for i in data.classes[split][0]}
                 for split in ("train", "val", "test")}
    assert alphabets == {"train": {"Script1", "Script2"}, "val": set(background[2:]),
                         "test": {"Zed"}}
    assert all(int(data.classes[s][1].abs().sum()) == 0 for s in ("train", "val", "test"))


def test_lake_split_needs_more_than_five_background_alphabets(tmp_path, make_fake_omniglot):
    make_fake_omniglot(tmp_path, split_lists=False)
    with pytest.raises(DataError, match=r"holds out 5 background alphabets .* only 3"):
        load(tmp_path, split="lake")


@pytest.mark.parametrize(
    ("split", "ways", "shots", "queries", "message"),
    [
        ("val", 9, 1, 1, r"task.ways=9 but the val split of omniglot \(vinyals\) has only 8 "
                         r"classes; lower task.ways"),
        ("train", 5, 10, 15, r"task.shots \+ task.queries = 25 but omniglot has only 20 images "
                             r"per class; lower them"),
        ("train", 1, 1, 1, r"task.ways=1 but it must be at least 2"),
        ("train", 5, 0, 1, r"task.shots=0 but it must be at least 1"),
        ("train", 5, 1, 0, r"task.queries=0 but it must be at least 1"),
    ],
)
def test_impossible_task_shapes(tmp_path, make_fake_omniglot, split, ways, shots, queries,
                                message):
    make_fake_omniglot(tmp_path)
    with pytest.raises(ConfigError, match=message):
        load(tmp_path).sampler(split, ways, shots, queries)


def test_sampler_draws_only_from_its_split(tmp_path, make_fake_omniglot):
    make_fake_omniglot(tmp_path)
    data = load(tmp_path)
    val_sources = set(data.classes["val"][0].tolist())
    sampler = data.sampler("val", 8, 1, 19)
    assert set(sampler.class_source.tolist()) == val_sources
    batch = sampler.sample(3, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (3, 8, 1, 28, 28) and batch.query_x.shape == (3, 152, 1, 28, 28)


def test_cache_is_written_atomically_and_loads_with_weights_only(tmp_path, make_fake_omniglot):
    folder = make_fake_omniglot(tmp_path)
    data = load(tmp_path)  # default cache_dir: <root>/omniglot/cache
    cache_files = list((folder / "cache").iterdir())
    assert [path.name for path in cache_files] == ["omniglot-28px-v1.pt"]
    cache = torch.load(cache_files[0], weights_only=True)
    assert torch.equal(cache["images"], data.images)
    assert cache["characters"] == data.characters


def test_cache_is_reused(tmp_path, make_fake_omniglot, monkeypatch):
    make_fake_omniglot(tmp_path)
    first = load(tmp_path)

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again although the cache is valid")

    monkeypatch.setattr(omniglot_module, "decode_sources", no_decoding)
    second = load(tmp_path)
    assert torch.equal(first.images, second.images)


def count_decodes(monkeypatch) -> list[int]:
    calls = []
    real = omniglot_module.decode_sources

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(omniglot_module, "decode_sources", counting)
    return calls


def test_cache_is_rebuilt_when_a_source_changes(tmp_path, make_fake_omniglot, monkeypatch):
    folder = make_fake_omniglot(tmp_path)
    load(tmp_path)
    calls = count_decodes(monkeypatch)
    archive = folder / "images_evaluation.zip"
    stat = archive.stat()
    os.utime(archive, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    load(tmp_path)
    load(tmp_path)
    assert len(calls) == 1


def test_cache_is_rebuilt_when_a_folder_image_changes(tmp_path, make_fake_omniglot, monkeypatch):
    folder = make_fake_omniglot(tmp_path, form="folder")
    first = load(tmp_path, image_size=105)
    calls = count_decodes(monkeypatch)
    png = folder / "images_background" / "Alpha" / "character01" / "0001_01.png"
    shutil.copyfile(folder / "images_background" / "Alpha" / "character02" / "0002_01.png", png)
    second = load(tmp_path, image_size=105)
    assert len(calls) == 1
    assert torch.equal(second.images[0, 0], first.images[1, 0])


def test_corrupt_cache_is_rebuilt(tmp_path, make_fake_omniglot, monkeypatch, caplog):
    folder = make_fake_omniglot(tmp_path)
    first = load(tmp_path)
    cache = folder / "cache" / "omniglot-28px-v1.pt"
    cache.write_bytes(cache.read_bytes()[:1000])
    calls = count_decodes(monkeypatch)
    with caplog.at_level("INFO"):
        second = load(tmp_path)
    assert len(calls) == 1 and torch.equal(first.images, second.images)
    assert "unreadable" in caplog.text
    assert torch.equal(torch.load(cache, weights_only=True)["images"], first.images)


def test_real_omniglot_vinyals(shared_data_root, omniglot_cache_dir):
    started = time.perf_counter()
    data = load(shared_data_root, cache_dir=str(omniglot_cache_dir))
    print(f"\nwarm Omniglot load (vinyals): {time.perf_counter() - started:.3f} s")
    assert data.images.shape == (1623, 20, 28, 28)
    assert {split: data.num_classes(split) for split in ("train", "val", "test")} == {
        "train": 4112, "val": 688, "test": 1692
    }
    assert_disjoint(data)
    assert data.images.float().mean() < 64  # ink bright on a dark background


def test_real_omniglot_lake(shared_data_root, omniglot_cache_dir):
    data = load(shared_data_root, cache_dir=str(omniglot_cache_dir), split="lake")
    assert data.num_classes("test") == 659
    assert data.num_classes("train") + data.num_classes("val") == 964
    assert_disjoint(data)


def assert_disjoint(data: Omniglot) -> None:
    characters = {split: set(data.classes[split][0].tolist()) for split in ("train", "val", "test")}
    assert not characters["train"] & characters["val"]
    assert not characters["train"] & characters["test"]
    assert not characters["val"] & characters["test"]


def test_read_only_data_folder_is_never_written(tmp_path, make_fake_omniglot, monkeypatch):
    folder = make_fake_omniglot(tmp_path / "data")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    folder.chmod(0o555)  # marked read-only like the shared data (root ignores it unless we don't)
    try:
        load(tmp_path / "data")
    finally:
        folder.chmod(0o755)
    assert not (folder / "cache").exists()
    assert (tmp_path / "xdg" / "metarun" / "omniglot" / "omniglot-28px-v1.pt").is_file()
