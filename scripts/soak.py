"""Soak: thousands of meta-steps and evaluations on the task threads, watched from outside.

A deadlock between threads shows up once in thousands of steps (docs/RELIABILITY.md), and a
watchdog thread inside the process cannot see one in which a stuck thread holds the GIL. So this
script is two processes: a child that trains without end through every case (algorithm, dtype,
fused kernels on and off, 1 to 5 inner steps, the loop driver on 2 threads and vmap, fresh and
long-lived meta-parameters) and prints a line per finished step, and a supervisor that reads
those lines. When no step finishes for ``--stall`` seconds it has the child's faulthandler dump
every thread's Python stack (a C-level signal handler: it needs no GIL), adds native stacks with
py-spy where that is installed, kills the child and exits 1. Otherwise it exits 0 after
``--steps`` steps.

    python scripts/soak.py --steps 50000                       # the target in RELIABILITY.md
    python scripts/soak.py --steps 20000 --switch-interval 1e-6 --contention 2   # harsher

Tiny tensors on purpose (conv4 with 4 channels on 16x16 images, meta-batch 4): the hang is a
race between threads, and small kernels make the threads meet in PyTorch's autograd bookkeeping
far more often per second than real-size work does. Runs on any metarun commit since the task
threads came in (it imports the speed layer from where each commit has it), so a before/after
comparison runs the same workload.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ALGORITHMS = ("maml", "fomaml", "metasgd", "anil", "reptile", "protonet")
WAYS, SHOTS, QUERIES, TASKS, IMAGE = 5, 1, 2, 4, (1, 16, 16)  # TASKS: --tasks


def cases(algorithms=ALGORITHMS):
    """Every combination, in an order that changes one thing at a time most of the time."""
    for inner_steps, kernels, dtype, algo in itertools.product(
        range(1, 6), (True, False), ("float32", "float64"), algorithms
    ):
        drivers = ("loop", "vmap") if algo in ("maml", "fomaml") else ("loop",)
        for driver, fresh in itertools.product(drivers, (True, False)):
            yield {"algo": algo, "dtype": dtype, "kernels": kernels, "inner_steps": inner_steps,
                   "driver": driver, "fresh": fresh}


def _executed_module():
    try:
        from metarun.execution import executed
    except ImportError:  # before the speed layer moved into metarun.execution
        from metarun.models import execution as executed
    return executed


def build(case: dict):
    import torch

    from metarun.algorithms.anil import ANIL
    from metarun.algorithms.maml import MAML
    from metarun.algorithms.metasgd import MetaSGD
    from metarun.algorithms.protonet import ProtoNet
    from metarun.algorithms.reptile import Reptile
    from metarun.models.conv4 import Conv4

    _executed_module().FUSED_KERNELS = case["kernels"]
    model = Conv4(IMAGE, WAYS, channels=4).to(getattr(torch, case["dtype"]))
    steps, algo = case["inner_steps"], case["algo"]
    if algo == "protonet":
        return ProtoNet(model, "classification")
    if algo == "reptile":
        return Reptile(model, "classification", 0.05, steps, task_batching=case["driver"])
    kind = {"maml": MAML, "fomaml": MAML, "metasgd": MetaSGD, "anil": ANIL}[algo]
    return kind(model, "classification", 0.1, steps, first_order=algo == "fomaml",
                task_batching=case["driver"])


def batch(dtype, generator, tasks):
    import torch

    from metarun.data.episodes import TaskBatch

    support_x = torch.randn(tasks, WAYS * SHOTS, *IMAGE, generator=generator, dtype=dtype)
    query_x = torch.randn(tasks, WAYS * QUERIES, *IMAGE, generator=generator, dtype=dtype)
    support_y = torch.arange(WAYS).repeat_interleave(SHOTS).repeat(tasks, 1)
    query_y = torch.arange(WAYS).repeat_interleave(QUERIES).repeat(tasks, 1)
    return TaskBatch(support_x, support_y, query_x, query_y)


def child(args: argparse.Namespace) -> None:
    import faulthandler

    import torch

    faulthandler.register(signal.SIGUSR1, all_threads=True)  # the supervisor's stack dump
    sys.setswitchinterval(args.switch_interval)
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(args.seed)
    long_lived: dict[tuple, tuple] = {}
    step = 0
    for case in itertools.cycle(list(cases(args.algorithms))):
        key = tuple(case.items())
        if case["fresh"] or key not in long_lived:
            algorithm = build(case)
            optimizer = torch.optim.Adam(algorithm.parameters(), lr=1e-3)
            if not case["fresh"]:
                long_lived[key] = (algorithm, optimizer)
        else:
            algorithm, optimizer = long_lived[key]
        dtype = getattr(torch, case["dtype"])
        label = ",".join(f"{k}={v}" for k, v in case.items())
        for kind in ["train"] * args.steps_per_case + ["evaluate"]:
            episode = batch(dtype, generator, args.tasks)
            if kind == "train":
                optimizer.zero_grad(set_to_none=True)
                loss, _ = algorithm.meta_train_step(episode)
                loss.backward()
                optimizer.step()
            else:
                with torch.no_grad():
                    algorithm.evaluate(episode)
            step += 1
            print(f"{step} {kind} {label}", flush=True)


def native_stacks(pid: int) -> str:
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        return "(py-spy not installed: no native stacks)"
    try:
        result = subprocess.run([py_spy, "dump", "--native", "--pid", str(pid)],
                                capture_output=True, text=True, timeout=60)
        return result.stdout + result.stderr
    except (subprocess.TimeoutExpired, OSError) as err:
        return f"(py-spy failed: {err})"


def supervise(args: argparse.Namespace) -> int:
    command = [sys.executable, __file__, "--child", "--threads", str(args.threads),
               "--switch-interval", str(args.switch_interval), "--seed", str(args.seed),
               "--steps-per-case", str(args.steps_per_case), "--tasks", str(args.tasks),
               "--algorithms", *args.algorithms]
    # A supervisor stopped by SIGTERM still kills its child and the busy processes (finally).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    stderr_path = log_dir / "soak-child-stderr.txt"
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
               for _ in range(args.contention)]
    started = last = time.monotonic()
    step, last_line, outcome = 0, "", "ok"
    with open(stderr_path, "w") as stderr:
        child_process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr,
                                         text=True, bufsize=1)
        try:
            assert child_process.stdout is not None
            while step < args.steps:
                ready, _, _ = select.select([child_process.stdout], [], [], 1.0)
                if ready:
                    line = child_process.stdout.readline()
                    if not line:
                        outcome = f"child exited with {child_process.wait()}"
                        break
                    step, last_line, last = int(line.split()[0]), line.strip(), time.monotonic()
                    if step % args.report_every == 0:
                        rate = step / (last - started)
                        print(f"[soak] {step} steps, {rate:.0f}/s", flush=True)
                elif time.monotonic() - last > args.stall:
                    outcome = "hang"
                    break
            if outcome == "hang":
                child_process.send_signal(signal.SIGUSR1)  # faulthandler: every thread's stack
                time.sleep(2)
                native = native_stacks(child_process.pid)
        finally:
            child_process.kill()
            child_process.wait()
            for burner in burners:
                burner.kill()
    elapsed = time.monotonic() - started
    report = {"outcome": outcome, "steps": step, "seconds": round(elapsed, 1),
              "last_step": last_line, "threads": args.threads,
              "switch_interval": args.switch_interval, "contention": args.contention,
              "stall_seconds": args.stall, "tasks": args.tasks,
              "algorithms": args.algorithms, "commit": _commit()}
    if outcome == "hang":
        print(f"[soak] HANG: no step finished for {args.stall:.0f} s after step {step} "
              f"({last_line}); every thread's stack:", flush=True)
        print(stderr_path.read_text()[-20000:])
        print(native[-20000:])
        (log_dir / "soak-native-stacks.txt").write_text(native)
    elif outcome != "ok":
        print(f"[soak] FAILED: {outcome} after step {step}; its stderr:\n"
              f"{stderr_path.read_text()[-5000:]}")
    else:
        print(f"[soak] OK: {step} steps in {elapsed:.0f} s without a hang")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0 if outcome == "ok" else 1


def _commit() -> str:
    """The commit of the metarun that the child imports (a worktree's, for a before run)."""
    import metarun

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(metarun.__file__).parent).stdout.strip()
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50_000, help="steps to run without a hang")
    parser.add_argument("--stall", type=float, default=60.0,
                        help="seconds without a finished step that count as a hang")
    parser.add_argument("--threads", type=int, default=2, help="task threads (torch threads)")
    parser.add_argument("--switch-interval", type=float, default=sys.getswitchinterval(),
                        help="sys.setswitchinterval in the child (smaller: more GIL hand-overs)")
    parser.add_argument("--contention", type=int, default=0,
                        help="busy processes to start beside the child (CPU contention)")
    parser.add_argument("--steps-per-case", type=int, default=20,
                        help="meta-steps per case before its evaluation and the next case")
    parser.add_argument("--tasks", type=int, default=TASKS, help="tasks per meta-batch")
    parser.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS),
                        help="a subset of the cases' algorithms (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report-every", type=int, default=1000)
    parser.add_argument("--log-dir", default=os.environ.get("TMPDIR", "/tmp"),
                        help="where the child's stderr (the stack dump) is written")
    parser.add_argument("--json", help="write the outcome here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    sys.exit(supervise(args))


if __name__ == "__main__":
    main()
