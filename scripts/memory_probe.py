"""Live memory of one MAML meta-step, metarun against learn2learn, without glibc's heap in the way.

scripts/bench.py reports the peak RSS a step adds, which is what a user sees but moves by 10-20%
from run to run with how glibc's heap retains freed blocks (docs/PERFORMANCE.md). This probe
measures the same peak with every block of 16 KiB or more mapped on its own and returned at
``free``, so RSS follows the live tensors: a steadier number for comparing what each library's
graph holds. It is slower that way (page faults at every allocation), so it times nothing.

Run it with the variable set before Python starts (glibc reads it once), one thread by default
so one task is in flight at a time::

    MALLOC_MMAP_THRESHOLD_=16384 OMP_NUM_THREADS=1 .bench-venv/bin/python \\
        scripts/memory_probe.py --shape 20w1s --first-order --tasks 4

``--threads 2`` runs metarun's two task threads, so two tasks' graphs are alive at once.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys

import torch

with contextlib.redirect_stderr(io.StringIO()):  # gym's notice on learn2learn's import
    import learn2learn  # noqa: F401
from bench_measure import peak_memory_mib
from bench_steps import L2lMamlRunner, MetarunRunner, StepCase, make_model

from metarun.data.episodes import TaskBatch


def random_batch(ways: int, shots: int, queries: int, tasks: int) -> TaskBatch:
    g = torch.Generator().manual_seed(0)
    support_y = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    query_y = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    return TaskBatch(
        torch.rand(tasks, ways * shots, 1, 28, 28, generator=g), support_y,
        torch.rand(tasks, ways * queries, 1, 28, 28, generator=g), query_y,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--shape", default="5w1s", help="NwKs, e.g. 20w1s")
    parser.add_argument("--queries", type=int, default=15)
    parser.add_argument("--tasks", type=int, default=4, help="meta-batch size")
    parser.add_argument("--steps", type=int, default=1, help="inner steps")
    parser.add_argument("--first-order", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    match = re.fullmatch(r"(\d+)w(\d+)s", args.shape)
    if match is None:
        parser.error(f"--shape {args.shape!r}: expected NwKs, e.g. 5w1s")
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        print("note: MALLOC_MMAP_THRESHOLD_ is not set, so this is glibc's RSS, not live memory",
              file=sys.stderr)
    torch.set_num_threads(args.threads)
    ways, shots = int(match[1]), int(match[2])
    case = StepCase("probe", "maml", ways, shots, args.queries, args.tasks, args.steps,
                    args.first_order)
    batch = random_batch(ways, shots, args.queries, args.tasks)
    for library, runner_type in (("metarun", MetarunRunner), ("learn2learn", L2lMamlRunner)):
        model = make_model(case, 0)
        runner = runner_type(model, case)
        runner.backward(batch, [])  # warm-up: executed copies, kernels, allocator
        model.zero_grad()
        peak = peak_memory_mib(lambda r=runner: r.backward(batch, []), torch.device("cpu"))
        print(f"{library:12s} {args.shape} {'FOMAML' if args.first_order else 'MAML'} "
              f"{args.steps} step(s), {args.tasks} tasks, {args.threads} thread(s): "
              f"peak {peak:.1f} MiB")


if __name__ == "__main__":
    main()
