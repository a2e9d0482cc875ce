"""Seconds per meta-iteration of one process against two data-parallel processes (torchrun, gloo).

Runs the real command on Omniglot (MAML, second order, 20-way 1-shot, meta-batch 32 by default)
three ways: one process on one thread, one process on every core, and ``torchrun
--nproc_per_node=2`` with one thread each, and reads each run's ``meta_train/iters_per_sec`` from
its TensorBoard log (the first log window, which holds the warm-up, is left out).

    .venv/bin/python scripts/bench_distributed.py --json docs/bench/<date>-distributed.json

Needs METARUN_DATA (Omniglot). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

BIN = Path(sys.executable).parent


def run(label: str, command: list[str], overrides: list[str], run_dir: Path,
        env: dict[str, str]) -> dict:
    done = subprocess.run([*command, *overrides, f"hydra.run.dir={run_dir}"], env=env,
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"bench_distributed: {label} failed:\n{done.stderr[-3000:]}")
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    rates = [event.value for event in events.Scalars("meta_train/iters_per_sec")][1:]
    seconds = 1 / statistics.median(rates)
    print(f"{label:<34} {seconds:.3f} s per meta-iteration ({len(rates)} windows)",
          file=sys.stderr)
    return {"label": label, "seconds_per_iteration": seconds, "windows": len(rates)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--iterations", type=int, default=40)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--experiment", default="maml_omniglot_20w1s")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if not os.environ.get("METARUN_DATA"):
        raise SystemExit("bench_distributed: set METARUN_DATA to the folder holding omniglot/")
    overrides = [f"experiment={args.experiment}", f"trainer.max_iters={args.iterations}",
                 f"trainer.log_every={args.log_every}", "trainer.val_every=1000000",
                 "trainer.val_episodes=4", "trainer.test_episodes=4", "trainer.progress=false",
                 "trainer.ckpt_every=1000000"]
    cores = len(os.sched_getaffinity(0))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    rows = []
    with tempfile.TemporaryDirectory(prefix="metarun-bench-dist-") as scratch:
        folder = Path(scratch)
        rows.append(run("1 process, 1 thread", [str(BIN / "metarun")], [*overrides, "threads=1"],
                        folder / "one-1", env))
        rows.append(run(f"1 process, {cores} threads", [str(BIN / "metarun")],
                        [*overrides, f"threads={cores}"], folder / "one-all",
                        {**os.environ, "OMP_NUM_THREADS": str(cores)}))
        rows.append(run("2 processes (torchrun), 1 thread each",
                        [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m",
                         "metarun"], overrides, folder / "two", env))
    one, whole, two = (row["seconds_per_iteration"] for row in rows)
    result = {"experiment": args.experiment, "iterations": args.iterations, "cores": cores,
              "machine": platform.processor() or platform.machine(), "rows": rows,
              "speedup_vs_1_thread": one / two, "speedup_vs_all_cores": whole / two}
    print(f"2 processes: {one / two:.2f}x one single-thread process, "
          f"{whole / two:.2f}x one process on {cores} cores")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
