"""The deadlock behind the thread rule (docs/RELIABILITY.md), in twenty lines of PyTorch.

Two threads build graphs on the same leaf tensors: one through a Python ``autograd.Function``
(as metarun's fused batch-norm is), one through a plain op (as an inner SGD step is). With
``--shared`` they use the same leaves and the process freezes, usually within seconds: the
Function's thread holds the GIL and waits for a leaf's gradient-accumulator mutex, the other
holds that mutex and waits for the GIL. Without it each thread has leaves of its own (detached
from the same parameters, as metarun's task threads do) and it runs to the end.

    python scripts/deadlock_repro.py --shared --seconds 60   # freezes: exits 1 with the stacks
    python scripts/deadlock_repro.py --seconds 60            # runs 60 s, exits 0

The hang is caught from C (faulthandler's watchdog needs no GIL), which prints every thread's
stack and ends the process with status 1.
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
import threading
import time

import torch


class Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(weight)
        return x * weight

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        return grad * weight, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", action="store_true", help="both threads on the same leaves")
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    faulthandler.dump_traceback_later(args.seconds + 10, exit=True)
    sys.setswitchinterval(1e-6)
    torch.set_num_threads(1)
    parameters = [torch.nn.Parameter(torch.randn(4)) for _ in range(8)]
    x = torch.randn(4)
    counts = [0, 0]
    stop = threading.Event()

    def leaves():
        if args.shared:
            return parameters
        return [p.detach().requires_grad_() for p in parameters]

    def through_function():
        while not stop.is_set():
            for weight in leaves():
                Scale.apply(x, weight).sum()
            counts[0] += 1

    def through_op():
        while not stop.is_set():
            for weight in leaves():
                (weight - x).sum()
            counts[1] += 1

    threads = [threading.Thread(target=target) for target in (through_function, through_op)]
    for thread in threads:
        thread.start()
    started = time.monotonic()
    while time.monotonic() - started < args.seconds:
        time.sleep(0.5)
        # Printed by the main thread, which needs the GIL too: the last line dates the hang.
        print(f"{time.monotonic() - started:.1f} s: {counts[0]} and {counts[1]} rounds",
              flush=True)
    stop.set()
    for thread in threads:
        thread.join()
    print(f"no hang in {args.seconds:.0f} s", flush=True)


if __name__ == "__main__":
    main()
