"""Data side of scripts/bench.py: Omniglot ready time and episode sampling speed.

metarun decodes every drawing once into a cached uint8 tensor and samples whole meta-batches by
indexing it. learn2learn is measured as its Omniglot benchmark builds it
(``l2l.vision.benchmarks.get_tasksets("omniglot")``): ``FullOmniglot`` with Resize(28, LANCZOS),
ToTensor and 1 - x, a ``MetaDataset`` (whose first build reads every image once to learn the
labels and then keeps that in ``omniglot-bookkeeping.pkl``), and a ``TaskDataset`` with
FusedNWaysKShots, LoadData, RemapLabels, ConsecutiveLabels and RandomClassRotation, which opens,
decodes, resizes and rotates each drawing of each task.

learn2learn reads torchvision's layout (``<root>/omniglot-py/images_<set>/...``) and accepts it
only when the zip has the official md5. The copies in the shared data folder hold the original
PNGs in re-packed zips (another md5), so they are extracted into a temporary folder and
torchvision's md5 check is skipped while learn2learn builds its dataset; nothing is downloaded.
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import learn2learn as l2l
import torch
from torchvision.datasets import omniglot as tv_omniglot

from metarun.data.omniglot import Omniglot

SETS = ("background", "evaluation")


@dataclass(frozen=True)
class SampleCase:
    name: str
    ways: int
    shots: int
    queries: int
    meta_batch_size: int = 32

    @property
    def images_per_episode(self) -> int:
        return self.ways * (self.shots + self.queries)


SAMPLE_CASES = (SampleCase("sample-5w1s", 5, 1, 15), SampleCase("sample-20w1s", 20, 1, 15))


def load_omniglot(data_root: Path, cache_dir: Path | None = None) -> Omniglot:
    return Omniglot(str(data_root), split="vinyals", download=False,
                    cache_dir=str(cache_dir) if cache_dir else None)


def metarun_ready_times(data_root: Path, warm_repeats: int = 3) -> dict[str, float]:
    """Cold: decode all 32,460 drawings into an empty cache. Warm: load that cache (median)."""
    with tempfile.TemporaryDirectory(prefix="metarun-bench-cache-") as cache_dir:
        started = time.perf_counter()
        dataset = load_omniglot(data_root, Path(cache_dir))
        cold = time.perf_counter() - started
        images = dataset.images.shape[0] * dataset.images.shape[1]
        del dataset
        warm = []
        for _ in range(warm_repeats):
            started = time.perf_counter()
            load_omniglot(data_root, Path(cache_dir))
            warm.append(time.perf_counter() - started)
    return {"cold_s": cold, "warm_s": sorted(warm)[len(warm) // 2], "images": images}


@contextmanager
def repacked_zips_accepted() -> Iterator[None]:
    """torchvision's Omniglot skips its md5 check inside this block (see the module docstring)."""
    original = tv_omniglot.Omniglot._check_integrity
    tv_omniglot.Omniglot._check_integrity = lambda self: True  # type: ignore[method-assign]
    try:
        yield
    finally:
        tv_omniglot.Omniglot._check_integrity = original  # type: ignore[method-assign]


class L2lOmniglot:
    """Omniglot in torchvision's layout in a temporary folder, for learn2learn's benchmark."""

    def __init__(self, data_root: Path) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix="metarun-bench-l2l-"))
        target = self.workdir / "omniglot-py"
        for set_name in SETS:
            archive = data_root / "omniglot" / f"images_{set_name}.zip"
            folder = data_root / "omniglot" / f"images_{set_name}"
            if archive.is_file():
                with zipfile.ZipFile(archive) as opened:
                    opened.extractall(target)
            elif folder.is_dir():
                shutil.copytree(folder, target / f"images_{set_name}")
            else:
                raise SystemExit(f"bench: {archive} not found; point --data at the data folder")

    def tasksets(self, ways: int, samples: int, seed: int) -> Any:
        """learn2learn's Omniglot tasksets; ``samples`` drawings per class (shots + queries)."""
        random.seed(seed)  # get_tasksets shuffles the classes into its splits with `random`
        with repacked_zips_accepted():
            return l2l.vision.benchmarks.get_tasksets(
                "omniglot", train_ways=ways, train_samples=samples, test_ways=ways,
                test_samples=samples, root=str(self.workdir),
            )

    def ready_times(self, seed: int) -> dict[str, float]:
        """Cold: no bookkeeping file yet (every image is read once). Warm: the file exists."""
        (self.workdir / "omniglot-bookkeeping.pkl").unlink(missing_ok=True)
        started = time.perf_counter()
        self.tasksets(5, 2, seed)
        cold = time.perf_counter() - started
        started = time.perf_counter()
        self.tasksets(5, 2, seed)
        return {"cold_s": cold, "warm_s": time.perf_counter() - started}

    def close(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def _episodes_per_second(draw: Any, episodes_per_draw: int, seconds: float,
                         min_draws: int) -> float:
    draw()  # warm-up: first-touch costs are not the steady state
    draws, started = 0, time.perf_counter()
    while draws < min_draws or time.perf_counter() - started < seconds:
        draw()
        draws += 1
    return draws * episodes_per_draw / (time.perf_counter() - started)


def sampling_rates(case: SampleCase, dataset: Omniglot, l2l_data: L2lOmniglot, seed: int,
                   seconds: float) -> dict[str, object]:
    """Episodes per second of each library's meta-training sampler at one task shape."""
    sampler = dataset.sampler("train", case.ways, case.shots, case.queries)
    generator = torch.Generator().manual_seed(seed)
    metarun_rate = _episodes_per_second(
        lambda: sampler.sample(case.meta_batch_size, generator), case.meta_batch_size, seconds, 3
    )
    train_tasks = l2l_data.tasksets(case.ways, case.shots + case.queries, seed).train
    data, _labels = train_tasks.sample()
    if data.shape[0] != case.images_per_episode:
        raise AssertionError(f"learn2learn gave {data.shape[0]} images per episode, "
                             f"expected {case.images_per_episode}")
    l2l_rate = _episodes_per_second(train_tasks.sample, 1, seconds, 3)
    return {
        "case": case.name,
        "ways": case.ways,
        "shots": case.shots,
        "queries": case.queries,
        "images_per_episode": case.images_per_episode,
        "metarun_episodes_per_s": metarun_rate,
        "learn2learn_episodes_per_s": l2l_rate,
        "speedup": metarun_rate / l2l_rate,
    }
