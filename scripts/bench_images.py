"""mini-ImageNet-sized data benchmark: cache build, warm ready time, episodes/s, peak memory.

metarun reads the pickle caches of learn2learn/torchmeta (``mini-imagenet-cache-*.pkl``) once
into its uint8 cache and draws episodes by indexing it; learn2learn is measured as its benchmark
builds mini-ImageNet (``l2l.vision.benchmarks.get_tasksets("mini-imagenet",
data_augmentation="normalize")``: ``MiniImagenet`` for each split, ``MetaDataset``, and a
``TaskDataset`` with NWays, KShots, LoadData, RemapLabels, ConsecutiveLabels) on the same files.

No real mini-ImageNet is on these machines: the files are synthetic pickles of the real shapes
(train 38,400, validation 9,600, test 12,000 images of 84 x 84 x 3, 600 per class), with random
pixels. Each measurement runs in its own child process, so the peak resident memory reported
(``VmHWM``) is that side's alone; "after imports" is the same child's resident memory before
it touched the data, so peak minus that is what the dataset costs.

    .bench-venv/bin/python scripts/bench_images.py --json docs/bench/<date>-images.json
    .bench-venv/bin/python scripts/bench.py --only miniimagenet      # the same, from bench.py
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
#: (learn2learn's split name, classes) of the Ravi & Larochelle split, 600 images a class.
SPLITS = (("train", 64), ("validation", 16), ("test", 20))
IMAGES_PER_CLASS = 600
SIDE = 84
WAYS, SHOTS, QUERIES = 5, 1, 15
META_BATCH = 4  # MAML's mini-ImageNet 1-shot meta-batch


def write_pickles(folder: Path, seed: int) -> None:
    """The three pickles in learn2learn's layout: ``image_data`` uint8 [N, 84, 84, 3] and
    ``class_dict`` {wnid: [rows]}, with synthetic wnids and random pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    first_class = 0
    for split, classes in SPLITS:
        path = folder / f"mini-imagenet-cache-{split}.pkl"
        if path.is_file():
            continue
        count = classes * IMAGES_PER_CLASS
        images = rng.integers(0, 256, size=(count, SIDE, SIDE, 3), dtype=np.uint8)
        class_dict = {f"n{first_class + c:08d}": list(range(c * IMAGES_PER_CLASS,
                                                            (c + 1) * IMAGES_PER_CLASS))
                      for c in range(classes)}
        first_class += classes
        with open(path, "wb") as file:
            pickle.dump({"image_data": images, "class_dict": class_dict}, file, protocol=4)
        del images


def _status_mib(field: str) -> float:
    """``VmHWM`` (peak) or ``VmRSS`` (now) of this process, in MiB. Not ``ru_maxrss``: that one
    survives fork and exec, so a child would report its parent's peak."""
    with open("/proc/self/status") as file:
        for line in file:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def _peak_mib() -> float:
    return _status_mib("VmHWM")


def _current_mib() -> float:
    return _status_mib("VmRSS")


def _rate(draw, episodes_per_draw: int, seconds: float) -> float:
    draw()
    draws, started = 0, time.perf_counter()
    while draws < 3 or time.perf_counter() - started < seconds:
        draw()
        draws += 1
    return draws * episodes_per_draw / (time.perf_counter() - started)


def child_metarun(root: str, cache_dir: str, seconds: float, seed: int) -> dict:
    import torch

    from metarun.data.miniimagenet import MiniImageNet

    after_imports = _current_mib()
    started = time.perf_counter()
    dataset = MiniImageNet(root, cache_dir=cache_dir, download=False)
    ready = time.perf_counter() - started
    ready_peak = _peak_mib()
    sampler = dataset.sampler("train", WAYS, SHOTS, QUERIES)
    generator = torch.Generator().manual_seed(seed)
    rate = None
    if seconds:
        rate = _rate(lambda: sampler.sample(META_BATCH, generator), META_BATCH, seconds)
    return {"ready_s": ready, "episodes_per_s": rate, "after_imports_mib": after_imports,
            "ready_peak_mib": ready_peak, "peak_mib": _peak_mib()}


def child_learn2learn(root: str, seconds: float, seed: int) -> dict:
    import contextlib
    import io
    import random

    import torch

    with contextlib.redirect_stderr(io.StringIO()):
        import learn2learn as l2l
    after_imports = _current_mib()
    random.seed(seed)
    torch.manual_seed(seed)
    started = time.perf_counter()
    tasksets = l2l.vision.benchmarks.get_tasksets(
        "mini-imagenet", train_ways=WAYS, train_samples=SHOTS + QUERIES, test_ways=WAYS,
        test_samples=SHOTS + QUERIES, root=root, data_augmentation="normalize")
    ready = time.perf_counter() - started
    ready_peak = _peak_mib()
    data, _labels = tasksets.train.sample()
    if tuple(data.shape) != (WAYS * (SHOTS + QUERIES), 3, SIDE, SIDE):
        raise AssertionError(f"learn2learn gave a task of shape {tuple(data.shape)}")
    rate = _rate(tasksets.train.sample, 1, seconds)
    return {"ready_s": ready, "episodes_per_s": rate, "after_imports_mib": after_imports,
            "ready_peak_mib": ready_peak, "peak_mib": _peak_mib()}


def _in_child(function: str, *args: object) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(REPO / 'scripts')!r}); "
            f"import bench_images as b; print(json.dumps(b.{function}(*{args!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"bench_images: {function} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(workdir: Path | None, seconds: float, seed: int, skip_learn2learn: bool = False) -> dict:
    """All measurements; the synthetic files live in ``workdir`` (a temporary folder if None)."""
    temporary = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="metarun-bench-images-")) if temporary else workdir
    try:
        root = workdir / "data"
        started = time.perf_counter()
        write_pickles(root / "miniimagenet", seed)
        print(f"[bench_images] synthetic pickles ready ({time.perf_counter() - started:.0f} s)",
              file=sys.stderr)
        cache_dir = workdir / "cache"
        shutil.rmtree(cache_dir, ignore_errors=True)
        cold = _in_child("child_metarun", str(root), str(cache_dir), 0.0, seed)
        warm = [_in_child("child_metarun", str(root), str(cache_dir), seconds if i == 0 else 0.0,
                          seed) for i in range(3)]
        result = {
            "case": "miniimagenet-5w1s",
            "images": sum(classes for _, classes in SPLITS) * IMAGES_PER_CLASS,
            "episode": {"ways": WAYS, "shots": SHOTS, "queries": QUERIES,
                        "meta_batch_size": META_BATCH},
            "metarun": {"cold": cold, "warm": warm[0],
                        "warm_ready_s_median": sorted(w["ready_s"] for w in warm)[1]},
        }
        if not skip_learn2learn:
            # learn2learn writes its bookkeeping next to the pickles: a copy of the folder would
            # cost 1.3 GB, so it reads the same folder after metarun.
            l2l = _in_child("child_learn2learn", str(root / "miniimagenet"), seconds, seed)
            result["learn2learn"] = l2l
            result["sampling_speedup"] = warm[0]["episodes_per_s"] / l2l["episodes_per_s"]
        return result
    finally:
        if temporary:
            shutil.rmtree(workdir, ignore_errors=True)


def print_table(result: dict) -> None:
    m = result["metarun"]
    print(f"\n{result['case']} ({result['images']} synthetic images, episodes of "
          f"{WAYS}-way {SHOTS}-shot {QUERIES} queries, meta-batch {META_BATCH})")
    print(f"{'':<12}{'ready (s)':>12}{'episodes/s':>14}{'after imports':>15}{'ready peak':>12}"
          f"{'peak':>10}  (MiB)")
    rows = [("metarun cold", m["cold"]), ("metarun warm", m["warm"])]
    if "learn2learn" in result:
        rows.append(("learn2learn", result["learn2learn"]))
    for label, row in rows:
        rate = "-" if row["episodes_per_s"] is None else f"{row['episodes_per_s']:.1f}"
        print(f"{label:<12}{row['ready_s']:>12.2f}{rate:>14}{row['after_imports_mib']:>15.0f}"
              f"{row['ready_peak_mib']:>12.0f}{row['peak_mib']:>10.0f}")
    print(f"metarun warm ready, median of 3: {m['warm_ready_s_median']:.2f} s")
    if "sampling_speedup" in result:
        print(f"sampling: metarun {result['sampling_speedup']:.0f}x learn2learn")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the synthetic pickles here between runs (1.3 GB)")
    parser.add_argument("--seconds", type=float, default=5.0, help="sampling time per side")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, metavar="OUT")
    parser.add_argument("--skip-learn2learn", action="store_true")
    args = parser.parse_args(argv)
    result = run(args.workdir, args.seconds, args.seed, args.skip_learn2learn)
    print_table(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
