"""The image datasets' shared core: cache, class-grouped samplers, normalisation, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metarun.data.augment import Augmentation, build_augmentation
from metarun.data.image_cache import CachePlan, load_or_build
from metarun.data.image_dataset import ImageDataset
from metarun.data.images import ClassRowsSampler, ClassSplit, ImageRows, Normalize
from metarun.errors import ConfigError, DataError

COUNTS = [5, 7, 6, 9, 8]
CLASSES = ["a", "b", "c", "d", "e"]
SPLITS = {"train": ["a", "b", "c"], "val": ["d", "e"], "test": ["e", "c"]}


def _value(class_index: int, image_index: int) -> int:
    """Every pixel of image ``image_index`` of class ``class_index``: names its row."""
    return class_index * 20 + image_index


class Fixture(ImageDataset):
    """A dataset whose pixels say which class and image they are."""

    name = "fixture"
    fills = 0
    counts = COUNTS

    def plan(self) -> CachePlan:
        counts = list(self.counts)

        def fill(out: np.ndarray) -> None:
            Fixture.fills += 1
            row = 0
            for class_index, count in enumerate(counts):
                for image_index in range(count):
                    out[row] = _value(class_index, image_index)
                    row += 1

        return CachePlan(self.name, "sources-v1", CLASSES[:len(counts)], counts, SPLITS,
                         self.input_shape, fill)


def _raw(dataset: ImageDataset, images: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation: the uint8 pixel values the sampler read."""
    mean = dataset.normalize.mean
    std = dataset.normalize.std
    return ((images * std + mean) * 255).round()


@pytest.fixture
def dataset(tmp_path):
    Fixture.fills = 0
    return Fixture(str(tmp_path), image_size=4)


def test_episodes_hold_distinct_images_of_distinct_classes_of_the_split(dataset):
    sampler = dataset.sampler("train", 3, 2, 3)
    batch = sampler.sample(64, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (64, 6, 3, 4, 4) and batch.query_x.shape == (64, 9, 3, 4, 4)
    pixels = torch.cat([_raw(dataset, batch.support_x).view(64, 3, 2, 48)[..., 0],
                        _raw(dataset, batch.query_x).view(64, 3, 3, 48)[..., 0]], dim=2)
    classes, images = pixels.div(20, rounding_mode="floor"), pixels.remainder(20)
    train = {CLASSES.index(name) for name in SPLITS["train"]}
    for task in range(64):
        task_classes = classes[task, :, 0].tolist()
        assert len(set(task_classes)) == 3 and set(task_classes) <= train
        for way in range(3):
            assert (classes[task, way] == classes[task, way, 0]).all()  # one class per label
            drawn = images[task, way].tolist()
            assert len(set(drawn)) == 5  # no image twice in a task
            assert max(drawn) < COUNTS[int(classes[task, way, 0])]  # never past the class's end
    assert batch.support_y[0].tolist() == [0, 0, 1, 1, 2, 2]
    assert batch.query_y[0].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_every_image_of_a_class_gets_drawn_uniformly(dataset):
    """The largest class's last images are drawn as often as its first (no truncation at the
    smallest class's count)."""
    sampler = dataset.sampler("val", 2, 1, 1)  # classes d (9 images) and e (8)
    batch = sampler.sample(4000, torch.Generator().manual_seed(1))
    pixels = _raw(dataset, torch.cat([batch.support_x, batch.query_x], 1))[:, :, 0, 0, 0]
    of_d = pixels[pixels.div(20, rounding_mode="floor") == 3].remainder(20).long()
    frequency = torch.bincount(of_d, minlength=9).float() / of_d.numel()
    assert frequency.shape == (9,)
    assert torch.allclose(frequency, torch.full((9,), 1 / 9), atol=0.02)


def test_same_seed_same_tasks_and_in_memory_equals_read_from_disk(tmp_path):
    resident = Fixture(str(tmp_path), image_size=4, in_memory=True)
    mapped = Fixture(str(tmp_path), image_size=4, in_memory=False)
    assert resident.images.resident and not mapped.images.resident
    first = resident.sampler("train", 3, 1, 2).sample(8, torch.Generator().manual_seed(3))
    second = mapped.sampler("train", 3, 1, 2).sample(8, torch.Generator().manual_seed(3))
    assert torch.equal(first.support_x, second.support_x)
    assert torch.equal(first.query_x, second.query_x)


def test_pretraining_batches_label_images_by_class_within_the_split(dataset):
    batch = dataset.batch_sampler("test", 500).sample(torch.Generator().manual_seed(0))
    pixels = _raw(dataset, batch.x)[:, 0, 0, 0]
    names = [CLASSES[int(value) // 20] for value in pixels]
    assert [SPLITS["test"][label] for label in batch.y.tolist()] == names
    assert {int(value) % 20 for value in pixels if int(value) // 20 == 4} == set(range(8))


def test_the_cache_is_built_once_and_rebuilt_when_torn(tmp_path):
    Fixture.fills = 0
    Fixture(str(tmp_path), image_size=4)
    Fixture(str(tmp_path), image_size=4)
    assert Fixture.fills == 1
    (data_file,) = (tmp_path / "fixture" / "cache").glob("*.u8")
    with open(data_file, "r+b") as file:  # a torn copy: shorter than its description says
        file.truncate(data_file.stat().st_size - 1)
    dataset = Fixture(str(tmp_path), image_size=4)
    assert Fixture.fills == 2
    assert int(dataset.images.gather(torch.tensor([COUNTS[0]]))[0, 0, 0, 0]) == _value(1, 0)
    description = next((tmp_path / "fixture" / "cache").glob("*.json"))
    description.unlink()  # images written but never described: a half-built cache
    Fixture(str(tmp_path), image_size=4)
    assert Fixture.fills == 3
    assert not list((tmp_path / "fixture" / "cache").glob(".*tmp"))


def test_a_failed_build_leaves_no_cache_that_a_later_run_would_read(tmp_path):
    class Broken(Fixture):
        def plan(self) -> CachePlan:
            plan = super().plan()

            def fill(out: np.ndarray) -> None:
                out[:3] = 7
                raise DataError("cannot read image x.jpg")

            plan.fill = fill
            return plan

    with pytest.raises(DataError, match="x.jpg"):
        Broken(str(tmp_path), image_size=4)
    assert not list((tmp_path / "fixture" / "cache").iterdir())


def test_a_changed_source_rebuilds_and_a_split_naming_an_absent_class_is_refused(tmp_path):
    Fixture.fills = 0
    Fixture(str(tmp_path), image_size=4)

    class Changed(Fixture):
        counts = [5, 7, 6, 9, 3]

    Changed(str(tmp_path), image_size=4)
    assert Fixture.fills == 2
    plan = Fixture(str(tmp_path), image_size=4).plan()
    plan.splits = {"train": ["a", "zebra"]}
    with pytest.raises(DataError, match="train split names 1 class.*'zebra'"):
        load_or_build(plan, tmp_path / "fixture" / "cache")


def test_task_shapes_the_split_cannot_give_fail_in_one_line(dataset):
    with pytest.raises(ConfigError, match="task.ways=4 but the train split of fixture has only 3"):
        dataset.sampler("train", 4, 1, 1)
    with pytest.raises(ConfigError, match="= 7 but class a of the train split of fixture has "
                                          "only 5 images"):
        dataset.sampler("train", 2, 2, 5)


def test_normalisation_uses_the_dataset_statistics(tmp_path):
    dataset = Fixture(str(tmp_path), image_size=4, mean=[0.5, 0.25, 0.0], std=[0.5, 0.25, 1.0])
    batch = dataset.sampler("train", 2, 1, 1).sample(1, torch.Generator().manual_seed(0))
    value = float(_raw(dataset, batch.support_x)[0, 0, 0, 0, 0]) / 255
    expected = [(value - 0.5) / 0.5, (value - 0.25) / 0.25, value]
    assert batch.support_x[0, 0, :, 0, 0].tolist() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ConfigError, match="dataset.mean=.* must be 3 number"):
        Fixture(str(tmp_path), image_size=4, mean=[0.5])
    gray = Fixture(str(tmp_path / "gray"), image_size=4, channels=1)
    assert gray.normalize.mean.flatten().tolist() == pytest.approx([sum(gray.default_mean) / 3])


def test_a_flip_only_augmentation_mirrors_about_half_of_the_images():
    images = torch.rand(400, 3, 6, 6)
    flip = Augmentation(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip=True, jitter=0.0)
    out = flip(images, torch.Generator().manual_seed(0))
    same = torch.isclose(out, images, atol=1e-5).flatten(1).all(1)
    mirrored = torch.isclose(out, images.flip(-1), atol=1e-5).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 150 < int(mirrored.sum()) < 250


def test_augmentation_is_seeded_in_range_and_crops_zoom_in():
    images = torch.linspace(0, 1, 16).view(1, 1, 1, 16).expand(50, 3, 16, 16).contiguous()
    augment = Augmentation(crop_scale=(0.25, 0.25), crop_ratio=(1.0, 1.0), flip=False,
                           jitter=0.0)
    out = augment(images, torch.Generator().manual_seed(0))
    again = augment(images, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    spread = (out[..., -1] - out[..., 0]).mean()  # a half-width crop spans half the ramp
    assert spread == pytest.approx(0.5, abs=0.08)
    jitter = Augmentation(jitter=0.4)(torch.rand(50, 3, 8, 8), torch.Generator().manual_seed(1))
    assert jitter.shape == (50, 3, 8, 8) and float(jitter.min()) >= 0 and float(jitter.max()) <= 1


def test_only_the_training_split_is_augmented(tmp_path):
    dataset = Fixture(str(tmp_path), image_size=4, augment={"enabled": True, "jitter": 0.0})
    assert dataset.sampler("train", 2, 1, 1).augment is not None
    assert dataset.sampler("val", 2, 1, 1).augment is None
    assert dataset.batch_sampler("train", 4).augment is not None
    assert build_augmentation({"enabled": False}) is None
    with pytest.raises(ConfigError, match="unknown option.*sharpen"):
        build_augmentation({"enabled": True, "sharpen": 1})
    with pytest.raises(ConfigError, match="dataset.augment.jitter=2"):
        build_augmentation({"enabled": True, "jitter": 2})


def test_rows_read_from_disk_release_their_pages(tmp_path):
    path = tmp_path / "rows.u8"
    data = np.arange(64 * 3 * 32 * 32, dtype=np.int64).astype(np.uint8).reshape(64, 3, 32, 32)
    data.tofile(path)
    rows = ImageRows.open(path, data.shape, resident=False)
    picks = torch.tensor([[5, 1], [63, 5]])
    assert torch.equal(rows.gather(picks), torch.from_numpy(data[picks.numpy()]))
    split = ClassSplit(["x", "y"], torch.tensor([0, 32]), torch.tensor([32, 32]))
    normalize = Normalize([0.0] * 3, [1 / 255] * 3)
    from_disk = ClassRowsSampler(rows, split, 2, 1, 1, normalize)
    in_memory = ClassRowsSampler(ImageRows(data), split, 2, 1, 1, normalize)
    for _ in range(3):  # pages released after each gather are read back correctly
        seed = torch.Generator().manual_seed(0)
        assert torch.equal(from_disk.sample(3, seed).query_x,
                           in_memory.sample(3, torch.Generator().manual_seed(0)).query_x)
