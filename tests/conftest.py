"""Shared fixtures: the real Omniglot (skipped where absent) and tiny fake ones built on the fly."""

from __future__ import annotations

import io
import os
import random
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image, ImageDraw


def _share_the_cores_between_workers() -> None:
    """Under pytest-xdist each worker, and every `metarun` it starts, takes its share of the
    cores (OMP_NUM_THREADS, which subprocesses inherit), unless the environment already says.

    torch's default is every core per process: with two workers on two cores that is four
    busy-waiting OpenMP threads on two cores, and a CLI run on two threads beside another worker
    ran about 4x slower than alone (Meta-LSTM's learning run: 97 s in the suite, 24 s alone).
    Tests about threads set their own (``torch.set_num_threads``, ``threads=``).
    """
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1 or "OMP_NUM_THREADS" in os.environ:
        return
    share = max(1, len(os.sched_getaffinity(0)) // workers)
    os.environ["OMP_NUM_THREADS"] = str(share)
    import torch

    torch.set_num_threads(share)


_share_the_cores_between_workers()

REPO_ROOT = Path(__file__).resolve().parents[1]

#: Fake Omniglot: three background alphabets (two for meta-train, one for meta-val) and two
#: evaluation alphabets (meta-test), two characters each.
FAKE_ALPHABETS = {"background": ["Alpha", "Beta", "Gamma"], "evaluation": ["Delta", "Epsilon"]}
FAKE_DRAWINGS = 20
FAKE_PIXELS = 105


@pytest.fixture(scope="session")
def shared_data_root() -> Path:
    """The real data folder (``METARUN_DATA`` or ``../shared/data``); skips when absent."""
    configured = os.environ.get("METARUN_DATA")
    root = Path(configured).expanduser() if configured else REPO_ROOT.parent / "shared" / "data"
    root = root.resolve()
    if not (root / "omniglot").is_dir():
        pytest.skip(f"real Omniglot not found under {root} (set METARUN_DATA)")
    return root


@pytest.fixture(scope="session")
def omniglot_cache_dir(shared_data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache folder holding the real Omniglot tensors, decoded once per test session."""
    from metarun.data.omniglot import Omniglot

    cache_dir = tmp_path_factory.mktemp("omniglot-cache")
    Omniglot(root=str(shared_data_root), cache_dir=str(cache_dir), download=False)
    return cache_dir


def fake_drawing(character: str, drawing: int) -> Image.Image:
    """A 1-bit drawing like Omniglot's (black ink on white), different for every character and
    drawing and with no rotational symmetry, so rotations and mix-ups are visible in tests."""
    rng = random.Random(f"{character}/{drawing}")
    image = Image.new("1", (FAKE_PIXELS, FAKE_PIXELS), 1)
    pen = ImageDraw.Draw(image)
    points = [(rng.randrange(10, 95), rng.randrange(10, 95)) for _ in range(5)]
    pen.line(points, fill=0, width=7)
    pen.rectangle((5, 5, 25, 15), fill=0)  # a mark in one corner only: no symmetry
    return image


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def build_fake_omniglot(
    root: Path,
    form: str = "zip",
    alphabets: dict[str, list[str]] | None = None,
    characters: int = 2,
    drawings: int = FAKE_DRAWINGS,
    split_lists: bool = True,
) -> Path:
    """Write a small Omniglot in the official layout under ``root/omniglot``; return that folder.

    ``form`` is "zip" (``images_<set>.zip`` with directory entries, like the official files) or
    "folder" (the extracted ``images_<set>/``). Vinyals-style split lists use the first
    background alphabets for train, the last one for val and the evaluation set for test.
    """
    alphabets = alphabets or FAKE_ALPHABETS
    folder = root / "omniglot"
    folder.mkdir(parents=True, exist_ok=True)
    serial = 0
    for set_name, names in alphabets.items():
        top = f"images_{set_name}"
        entries: dict[str, bytes | None] = {f"{top}/": None}
        for alphabet in names:
            entries[f"{top}/{alphabet}/"] = None
            for number in range(1, characters + 1):
                serial += 1
                character = f"{alphabet}/character{number:02d}"
                entries[f"{top}/{character}/"] = None
                for drawing in range(1, drawings + 1):
                    name = f"{top}/{character}/{serial:04d}_{drawing:02d}.png"
                    entries[name] = _png(fake_drawing(character, drawing))
        if form == "zip":
            with zipfile.ZipFile(folder / f"{top}.zip", "w", zipfile.ZIP_DEFLATED) as archive:
                for name, data in entries.items():
                    if data is None:
                        archive.writestr(zipfile.ZipInfo(name), b"")
                    else:
                        archive.writestr(name, data)
        else:
            for name, data in entries.items():
                if data is None:
                    (folder / name).mkdir(parents=True, exist_ok=True)
                else:
                    (folder / name).write_bytes(data)
    if split_lists:
        background, evaluation = alphabets["background"], alphabets.get("evaluation", [])
        phases = {"train": background[:-1], "val": background[-1:], "test": evaluation}
        lists = folder / "splits" / "vinyals"
        lists.mkdir(parents=True, exist_ok=True)
        for phase, members in phases.items():
            lines = [
                f"{alphabet}/character{number:02d}/rot{degrees:03d}"
                for alphabet in members
                for number in range(1, characters + 1)
                for degrees in (0, 90, 180, 270)
            ]
            (lists / f"{phase}.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def make_fake_omniglot() -> Callable[..., Path]:
    """``make_fake_omniglot(root, form="zip", ...)``: see ``build_fake_omniglot``."""
    return build_fake_omniglot


@pytest.fixture
def task_thread_counts(monkeypatch) -> list[int]:
    """How many task threads each ``drivers.run_tasks`` call used, one entry per call."""
    from metarun.execution import drivers

    counts: list[int] = []
    original = drivers.run_tasks

    def counting(work, tasks, modules):
        counts.append(len(modules))
        return original(work, tasks, modules)

    monkeypatch.setattr(drivers, "run_tasks", counting)
    return counts
