"""dataset.on_device: when a store goes to the GPU (auto/true/false against a fake free memory),
and, on the CPU, that a placed store's episodes are the host store's bit for bit, drawn from the
same CPU generator. The CUDA side (episodes made on the GPU) is tests/test_gpu.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from metarun.build import build
from metarun.cli import _register_resolvers
from metarun.config import register_configs
from metarun.data import image_dataset, omniglot
from metarun.data.images import DeviceImageRows, ImageRows
from metarun.data.omniglot import Omniglot
from metarun.data.on_device import store_device
from metarun.errors import ConfigError
from tests.test_image_data import Fixture

CPU, CUDA = torch.device("cpu"), torch.device("cuda:0")  # a device name needs no GPU


class FakeFreeMemory:
    """``torch.cuda.mem_get_info`` of a device with ``free`` bytes free; records its calls."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.asked: list[torch.device] = []

    def __call__(self, device: torch.device) -> tuple[int, int]:
        self.asked.append(device)
        return self.free, 4 * self.free


@pytest.mark.parametrize("setting", ["auto", True, False])
def test_a_cpu_run_keeps_its_images_in_host_memory_without_asking(setting):
    free = FakeFreeMemory(10**12)
    assert store_device(setting, 10, CPU, free) is None
    assert free.asked == []


def test_auto_places_a_store_of_at_most_a_quarter_of_the_free_memory():
    free = FakeFreeMemory(1000)
    assert store_device("auto", 250, CUDA, free) == CUDA
    assert store_device("auto", 251, CUDA, free) is None
    assert free.asked == [CUDA, CUDA]


def test_true_places_whatever_fits_and_refuses_the_rest_in_one_line():
    assert store_device(True, 1000, CUDA, FakeFreeMemory(1000)) == CUDA
    message = (r"dataset.on_device=true but the images \(1.0 MiB\) exceed the free memory of "
               r"cuda:0 \(0.5 MiB\); use dataset.on_device=auto or false")
    with pytest.raises(ConfigError, match=message):
        store_device(True, 2**20, CUDA, FakeFreeMemory(2**19))


def test_false_never_places_nor_asks():
    free = FakeFreeMemory(10**12)
    assert store_device(False, 1, CUDA, free) is None and free.asked == []


@pytest.mark.parametrize("value", ["yes", "Auto", 1, None])
def test_a_bad_setting_is_refused_in_one_line_before_any_data_loads(tmp_path, value):
    expected = r"dataset.on_device=.* is not allowed: use auto, true or false"
    # No files under tmp_path: reading data first would be a DataError instead.
    with pytest.raises(ConfigError, match=expected):
        Omniglot(root=str(tmp_path), download=False, on_device=value)
    with pytest.raises(ConfigError, match=expected):
        Fixture(str(tmp_path), image_size=4, on_device=value)


def _same_draws(host_sample, placed_sample) -> None:
    """The two samplers draw from generators of one seed: equal batches, equal generator ends."""
    host_generator = torch.Generator().manual_seed(3)
    placed_generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        host, placed = host_sample(host_generator), placed_sample(placed_generator)
        for name in vars(host):
            assert torch.equal(getattr(host, name), getattr(placed, name)), name
    assert torch.equal(host_generator.get_state(), placed_generator.get_state())


@pytest.mark.parametrize("augment", [None, {"enabled": True}], ids=["plain", "augmented"])
def test_image_rows_placed_on_the_cpu_give_the_host_episodes_bit_for_bit(
    tmp_path, monkeypatch, augment
):
    host = Fixture(str(tmp_path), image_size=8, augment=augment)
    placed = Fixture(str(tmp_path), image_size=8, augment=augment)
    # The decision forced, so the placed path (rows gathered by torch on "the device") runs.
    monkeypatch.setattr(image_dataset, "store_device", lambda *args: CPU)
    placed.place_on(CPU)
    assert isinstance(placed.images, DeviceImageRows) and isinstance(host.images, ImageRows)
    for split in ("train", "val"):  # augmented, unaugmented
        _same_draws(lambda g, d=host, s=split: d.sampler(s, 2, 2, 1).sample(4, g),
                    lambda g, d=placed, s=split: d.sampler(s, 2, 2, 1).sample(4, g))
    _same_draws(host.batch_sampler("train", 7).sample, placed.batch_sampler("train", 7).sample)


def test_a_mapped_store_is_copied_to_the_device_chunk_by_chunk(tmp_path):
    path = tmp_path / "rows.u8"
    data = np.arange(10 * 3 * 4 * 4, dtype=np.int64).astype(np.uint8).reshape(10, 3, 4, 4)
    data.tofile(path)
    mapped = ImageRows.open(path, data.shape, resident=False)
    placed = mapped.to_device(CPU, chunk_bytes=3 * 48)  # 3 rows a chunk: 4 chunks, the last short
    assert placed.shape == data.shape and placed.device == CPU
    assert torch.equal(placed.images, torch.from_numpy(data))
    rows = torch.tensor([[9, 0], [4, 4]])
    assert torch.equal(placed.gather(rows), mapped.gather(rows))


def test_omniglot_placed_on_the_cpu_gives_the_host_episodes_bit_for_bit(
    tmp_path, make_fake_omniglot, monkeypatch
):
    make_fake_omniglot(tmp_path)
    host = Omniglot(root=str(tmp_path), download=False)
    placed = Omniglot(root=str(tmp_path), download=False, on_device=True)
    monkeypatch.setattr(omniglot, "store_device", lambda *args: CPU)
    placed.place_on(CPU)
    assert placed.images.device == CPU
    # Every rotation of the Vinyals classes is drawn (4-way tasks from 16 rotated classes).
    _same_draws(lambda g: host.sampler("train", 4, 2, 3).sample(8, g),
                lambda g: placed.sampler("train", 4, 2, 3).sample(8, g))
    _same_draws(host.batch_sampler("train", 9).sample, placed.batch_sampler("train", 9).sample)


def test_the_build_places_the_dataset_on_the_runs_device_before_any_sampler(
    tmp_path, make_fake_omniglot, monkeypatch
):
    make_fake_omniglot(tmp_path)
    asked, placed = [], []
    real_place_on = Omniglot.place_on

    def place_on(self, device):
        asked.append(device)
        real_place_on(self, device)
        self.images = self.images.clone()  # stands for the copy a GPU would hold
        placed.append(self.images)

    monkeypatch.setattr(Omniglot, "place_on", place_on)
    register_configs()
    _register_resolvers()
    with initialize_config_module(config_module="metarun.configs", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "dataset=omniglot", f"dataset.root={tmp_path}", "dataset.download=false",
            "trainer.device=cpu", "backbone.channels=4"])
    parts = build(cfg)
    assert asked == [CPU]
    assert all(sampler.images is placed[0] for sampler in parts.samplers.values())
    assert parts.training_batches(torch.Generator().manual_seed(0)).support_x.device == CPU
