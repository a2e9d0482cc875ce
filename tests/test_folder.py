"""dataset=folder: a user's own images in either layout, split three ways; real Omniglot drawings
end to end; one-line errors for every way a folder can be wrong."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metarun.algorithms.baseline import Baseline
from metarun.data.folder import FolderDataset
from metarun.errors import ConfigError, DataError
from metarun.models.conv4 import Conv4
from tests.runs import check_ok, read_results, run_metarun

#: Three background alphabets, 14 + 20 + 26 = 60 characters of 20 drawings each.
ALPHABETS = ("Blackfoot_(Canadian_Aboriginal_Syllabics)", "Alphabet_of_the_Magi", "Arcadian")
CHARACTERS = 60
TINY_RUN = ["task.meta_batch_size=2", "backbone.channels=8", "trainer.max_iters=2",
            "trainer.val_every=2", "trainer.val_episodes=2", "trainer.test_episodes=2",
            "trainer.eval_batch_size=2", "trainer.progress=false", "hydra.run.dir=run"]


@pytest.fixture(scope="module")
def omniglot_folder(shared_data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real drawings of three alphabets as ``<Alphabet>_<characterNN>/<png>``."""
    folder = tmp_path_factory.mktemp("omniglot-folder")
    with zipfile.ZipFile(shared_data_root / "omniglot" / "images_background.zip") as archive:
        for entry in archive.namelist():
            parts = entry.split("/")  # images_background/<Alphabet>/<characterNN>/<file>.png
            if len(parts) == 4 and parts[1] in ALPHABETS and parts[3].endswith(".png"):
                target = folder / f"{parts[1]}_{parts[2]}" / parts[3]
                target.parent.mkdir(exist_ok=True)
                target.write_bytes(archive.read(entry))
    return folder


@pytest.fixture(scope="module")
def omniglot(omniglot_folder: Path) -> FolderDataset:
    return FolderDataset(path=str(omniglot_folder), channels=1, image_size=28)


def write_image(path: Path, value: int, size: tuple[int, int] = (12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (value, 255 - value, value // 2)).save(path)


def write_classes(folder: Path, names: list[str], images: int = 3) -> None:
    """Flat-coloured images whose red value says which class and image they are."""
    for number, name in enumerate(names):
        for image in range(images):
            write_image(folder / name / f"{image:02d}.png", 10 * number + image)


# ---------------------------------------------------------------------------- the real drawings
def test_real_omniglot_split_by_ratios(omniglot):
    sizes = {phase: omniglot.num_classes(phase) for phase in ("train", "val", "test")}
    assert sizes == {"train": 38, "val": 10, "test": 12}  # round(60 * .64), round(60 * .8)
    names = [name for split in omniglot.splits.values() for name in split.names]
    assert len(set(names)) == CHARACTERS == len(names)
    assert all(split.count.eq(20).all() for split in omniglot.splits.values())
    assert omniglot.images.shape == (CHARACTERS * 20, 1, 28, 28)
    assert omniglot.input_shape == (1, 28, 28)
    assert omniglot.cache_dir == omniglot.path / ".metarun-cache"


def test_the_split_follows_the_documented_rule(omniglot, omniglot_folder):
    names = sorted(entry.name for entry in omniglot_folder.iterdir()
                   if not entry.name.startswith("."))
    shuffled = [names[i] for i in np.random.RandomState(0).permutation(len(names))]
    expected = {"train": shuffled[:38], "val": shuffled[38:48], "test": shuffled[48:]}
    assert {phase: split.names for phase, split in omniglot.splits.items()} == expected


def test_same_seed_same_split_other_seed_other_split_same_cache(omniglot, omniglot_folder):
    cached = next(omniglot.cache_dir.glob("*.u8"))
    built = cached.stat().st_mtime_ns
    again = FolderDataset(path=str(omniglot_folder), channels=1, image_size=28)
    other = FolderDataset(path=str(omniglot_folder), channels=1, image_size=28, split_seed=1)
    assert again.splits["train"].names == omniglot.splits["train"].names
    assert set(other.splits["train"].names) != set(omniglot.splits["train"].names)
    # The split is not in the cache: a new seed reads the same images, decoded once.
    assert cached.stat().st_mtime_ns == built and len(list(omniglot.cache_dir.glob("*.u8"))) == 1
    assert torch.equal(other.images.gather(torch.arange(40)), omniglot.images.gather(
        torch.arange(40)))


def test_images_are_the_drawings_decoded_by_pil(omniglot, omniglot_folder):
    split = omniglot.splits["val"]
    name = split.names[3]
    png = sorted((omniglot_folder / name).glob("*.png"))[7]
    with Image.open(png) as image:
        expected = np.asarray(image.convert("L").resize((28, 28), Image.Resampling.LANCZOS))
    decoded = omniglot.images.gather(split.start[3:4] + 7)[0, 0].numpy()
    assert np.array_equal(decoded, expected)
    # Black ink on white paper, as drawn (no inversion): mostly white, some dark strokes.
    pixels = omniglot.images.gather(torch.arange(0, CHARACTERS * 20, 37)).float()
    assert pixels.mean() > 200 and pixels.amin() < 60


def test_episodes_and_pretraining_batches_come_from_the_split(omniglot):
    batch = omniglot.sampler("train", 5, 1, 15).sample(2, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (2, 5, 1, 28, 28) and batch.query_x.shape == (2, 75, 1, 28, 28)
    # Default normalisation: (x - 0.5) / 0.5, so white paper is 1 and ink goes down to -1.
    assert batch.query_x.max() == 1.0 and batch.query_x.min() >= -1.0
    baseline = Baseline(Conv4(input_shape=(1, 28, 28), out_features=5, channels=8),
                        "classification", batch_size=16)
    labels = baseline.training_batches(omniglot, 5, 1, 15, 2)(torch.Generator()).y
    assert labels.shape == (16,) and labels.min() >= 0 and labels.max() < 38


# ------------------------------------------------------------------------- the other layouts
def test_train_val_test_folders_are_taken_as_they_are(tmp_path):
    for phase, classes in (("train", ["a", "b", "c"]), ("val", ["a", "d"]), ("test", ["e", "f"])):
        write_classes(tmp_path / phase, classes)
    data = FolderDataset(path=str(tmp_path), image_size=4)
    assert {phase: split.names for phase, split in data.splits.items()} == {
        "train": ["train/a", "train/b", "train/c"], "val": ["val/a", "val/d"],
        "test": ["test/e", "test/f"],
    }
    val_d = data.splits["val"]
    rows = data.images.gather(val_d.start[1] + torch.arange(3))
    assert rows.shape == (3, 3, 4, 4)
    assert rows[:, 0, 0, 0].tolist() == [10, 11, 12]  # class d is the 2nd of val/: 10 * 1 + image


def test_split_by_list_files_uses_only_listed_classes(tmp_path):
    images, lists = tmp_path / "images", tmp_path / "lists"
    write_classes(images, ["cat", "cow", "dog", "eel", "fox", "gnu", "unused"])
    (images / "unused" / "00.png").write_bytes(b"never decoded")
    lists.mkdir()
    for phase, names in (("train", "dog\ncat\n\n"), ("val", "eel\nfox"), ("test", "gnu\ncow\n")):
        (lists / f"{phase}.txt").write_text(names)
    data = FolderDataset(path=str(images), split_lists=str(lists), image_size=4, channels=1)
    assert {phase: split.names for phase, split in data.splits.items()} == {
        "train": ["dog", "cat"], "val": ["eel", "fox"], "test": ["gnu", "cow"]}
    assert data.images.shape == (18, 1, 4, 4)


def test_hidden_files_and_other_files_are_ignored(tmp_path):
    write_classes(tmp_path, [f"class{n}" for n in range(10)])
    (tmp_path / "class0" / "notes.txt").write_text("not an image")
    (tmp_path / "class0" / ".hidden.png").write_bytes(b"not read")
    (tmp_path / ".git").mkdir()
    (tmp_path / "README.md").write_text("about my images")
    data = FolderDataset(path=str(tmp_path), image_size=4)
    assert sum(len(split) for split in data.splits.values()) == 10
    assert data.images.shape[0] == 30


def test_two_folders_never_share_a_cache(tmp_path):
    write_classes(tmp_path / "one", [f"c{n}" for n in range(10)])
    write_classes(tmp_path / "two", [f"c{n}" for n in range(10)], images=4)
    cache = tmp_path / "cache"
    one = FolderDataset(path=str(tmp_path / "one"), cache_dir=str(cache), image_size=4)
    two = FolderDataset(path=str(tmp_path / "two"), cache_dir=str(cache), image_size=4)
    assert len(list(cache.glob("*.u8"))) == 2
    assert one.images.shape[0] == 30 and two.images.shape[0] == 40


def test_a_read_only_folder_is_cached_in_the_user_cache(tmp_path, monkeypatch):
    folder = tmp_path / "shared"
    write_classes(folder, [f"c{n}" for n in range(6)])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    folder.chmod(0o555)
    try:
        data = FolderDataset(path=str(folder), image_size=4, split_ratios=[0.34, 0.33, 0.33])
    finally:
        folder.chmod(0o755)
    assert data.cache_dir == tmp_path / "user-cache" / "metarun" / "folder"
    assert not (folder / ".metarun-cache").exists()


# ---------------------------------------------------------------------------------- errors
def broken_folder(tmp_path: Path, problem: str) -> dict:
    """A folder with one problem, and the keys that load it."""
    keys: dict = {"path": str(tmp_path / "images"), "image_size": 4}
    names = [f"class{n}" for n in range(10)]
    if problem != "no classes":
        write_classes(tmp_path / "images", names)
    (tmp_path / "images").mkdir(exist_ok=True)
    if problem == "empty class":
        (tmp_path / "images" / "class7" / "none").mkdir()
        for image in (tmp_path / "images" / "class7").glob("*.png"):
            image.unlink()
    elif problem == "bad image":
        (tmp_path / "images" / "class4" / "01.png").write_bytes(b"\x89PNG broken")
    elif problem in ("absent class", "class twice"):
        lists = tmp_path / "lists"
        lists.mkdir()
        second = "class0" if problem == "class twice" else "class9\nkoala"
        for phase, listed in (("train", "class0\nclass1"), ("val", f"class2\n{second}"),
                              ("test", "class3\nclass4")):
            (lists / f"{phase}.txt").write_text(listed)
        keys["split_lists"] = str(lists)
    elif problem == "no val folder":
        write_classes(tmp_path / "images" / "train", ["a", "b"])
        write_classes(tmp_path / "images" / "test", ["a", "b"])
    return keys


@pytest.mark.parametrize(("problem", "overrides", "error", "message"), [
    ("none", {"path": None}, ConfigError, r"^dataset.path is not set; point it at a folder of "
     r"images laid out as <dir>/<class>/<images> or <dir>/\{train,val,test\}/<class>/<images>$"),
    ("none", {"path": "/no/such/folder"}, DataError,
     r"^dataset.path=/no/such/folder is not a folder; .* <dir>/<class>/<images> or"),
    ("no classes", {}, DataError, r"^folder: no class folders found in .*images; expected <dir>"),
    ("none", {"split_ratios": [0.9, 0.1, 0.0]}, ConfigError,
     r"gives the val split 1 of the 10 classes in .*images but a split needs at least 2; raise "
     r"its ratio or add class folders$"),
    ("none", {"split_ratios": [0.7, 0.2, 0.2]}, ConfigError,
     r"^dataset.split_ratios=\[0.7, 0.2, 0.2\] must be three numbers >= 0 .* that sum to 1"),
    ("none", {"split_ratios": [1.2, -0.4, 0.2]}, ConfigError, r"must be three numbers >= 0"),
    ("none", {"split_ratios": [0.5, 0.5]}, ConfigError, r"must be three numbers >= 0"),
    ("absent class", {}, DataError,
     r"^folder: .*lists/val.txt, line 3: class 'koala' is not a class folder of .*images; fix "
     r"the list or add the folder$"),
    ("class twice", {}, DataError,
     r"val.txt, line 2: class 'class0' is listed in train.txt already"),
    ("empty class", {}, DataError,
     r"^folder: class folder .*images/class7 has no images \(files ending in .*\.jpg.*\); add "
     r"images or remove the folder$"),
    ("bad image", {}, DataError, r"^cannot read image .*images/class4/01.png \(.*\); replace or "
     r"remove it$"),
    ("no val folder", {}, DataError, r"has train/, test/ but no val/; the split layout needs all "
     r"three"),
])
def test_each_problem_is_one_line_that_says_what_to_do(tmp_path, problem, overrides, error,
                                                       message):
    keys = {**broken_folder(tmp_path, problem), **overrides}
    with pytest.raises(error, match=message) as raised:
        FolderDataset(**keys)
    assert "\n" not in str(raised.value)


def test_split_lists_with_split_folders_is_refused(tmp_path):
    for phase in ("train", "val", "test"):
        write_classes(tmp_path / phase, ["a", "b"])
    with pytest.raises(ConfigError, match="is split into train/ val/ test/ already; unset "
                                          "dataset.split_lists"):
        FolderDataset(path=str(tmp_path), split_lists=str(tmp_path))


def test_baseline_refusal_names_the_image_datasets():
    class EpisodesOnly:  # a dataset that can give episodes but no labelled mini-batches
        task_type = "classification"

    baseline = Baseline(Conv4(input_shape=(1, 28, 28), out_features=5, channels=8),
                        "classification")
    with pytest.raises(ConfigError, match=r"use an image dataset \(omniglot, .* or folder\)$"):
        baseline.training_batches(EpisodesOnly(), 5, 1, 15, 2)


# --------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("algo", ["protonet", "maml"])
def test_metarun_runs_on_a_folder_of_real_drawings(tmp_path, omniglot, omniglot_folder, algo):
    proc = run_metarun(f"algo={algo}", "dataset=folder", f"dataset.path={omniglot_folder}",
                       "dataset.channels=1", "dataset.image_size=28", *TINY_RUN, cwd=tmp_path)
    check_ok(proc)
    results = read_results(tmp_path / "run")
    assert results["dataset"] == "folder" and results["algo"] == algo
    assert results["meta_test"]["metric"] == "accuracy"
    assert 0.0 <= results["meta_test"]["mean"] <= 1.0


def test_metarun_without_a_path_fails_in_one_line(tmp_path):
    proc = run_metarun("dataset=folder", *TINY_RUN, cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "dataset.path is not set" in proc.stderr and "Traceback" not in proc.stderr
