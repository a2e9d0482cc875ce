"""How the tasks of a meta-batch are driven: ``vmap``, a loop, or a loop on parallel threads.

The rules for ``vmap`` against the loop come first; then the task-parallel loop: the tasks of a
meta-batch on several CPU threads at once, one intra-op thread each.

A conv4 meta-step is many small kernels (a 5-way task is 5 support and 75 query images): torch's
intra-op threads split each kernel and gain little from the second core, while tasks are
independent. So on a 2-core CPU two tasks at a time on one thread each beat task by task on 2
intra-op threads, with the same gradients (measured in docs/PERFORMANCE.md, "Measurements
behind the code's choices", "Task drivers").

Two things are not safe to share between threads and are handled here: ``torch.func``'s
transforms (so a worker's inner loop uses ``torch.autograd.grad``: see ``MAML.support_grads``)
and ``functional_call`` on one module (it swaps the module's parameters in place), so each
worker runs its own copy of the adapted module, with the real parameters passed in. Three
thread-local settings of the caller are carried into the workers: grad mode, autocast and the fp16
loss scale (``metarun.execution.precision``: a bf16/fp16 run's per-task work is autocast too, and
an fp16 run's inner loops are loss-scaled on every thread).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from metarun.execution.executed import execution_copy, follow_modes
from metarun.execution.plain_norm import batch_norm_in_plain_ops
from metarun.execution.precision import autocast_enabled, caller_precision

Result = TypeVar("Result")

# Fused norm kernels whose second-order gradient is wrong under vmap(grad) in torch 2.x (the
# batching rule of their backward: pytorch/functorch#534; measured wrong in torch 2.13 CPU,
# 20-40% relative error). GroupNorm is not affected. Batch-norm that normalises with the batch's
# own statistics is made exact by ``vmap_context`` (plain ops); one that updates running
# statistics is not (its update is an in-place write under vmap).
_VMAP_UNSAFE_NORMS = (
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def contains(model: nn.Module, module_types: tuple[type[nn.Module], ...]) -> bool:
    return any(isinstance(module, module_types) for module in model.modules())


def vmap_is_exact(model: nn.Module, first_order: bool) -> bool:
    """False where vmap would give a wrong meta-gradient, even within ``vmap_context``."""
    if first_order:
        return True
    keeps_running_statistics = any(
        isinstance(module, _BATCH_NORMS) and module.track_running_stats
        for module in model.modules()
    )
    return not keeps_running_statistics and not contains(model, _VMAP_UNSAFE_NORMS)


def vmap_context(first_order: bool) -> AbstractContextManager[Any]:
    """What a vmap driver runs its forward passes in: batch-norm in plain ops for second order,
    and under autocast.

    The fused batch-norm's double backward is wrong under vmap (pytorch/functorch#534); the
    plain-ops version (``metarun.execution.plain_norm``) is exact but slower, so first order, where
    the fused kernel is right, keeps it. Under autocast (bf16/fp16 runs) the fused kernel's
    gradient under vmap fails outright on a low-precision input with float32 affine weights
    (torch 2.13: "expected scalar type BFloat16 but found Float"), while the plain ops promote.
    """
    if first_order and not autocast_enabled():
        return nullcontext()
    return batch_norm_in_plain_ops()


def prefers_loop(model: nn.Module, first_order: bool) -> bool:
    """The ``auto`` rule: conv nets, and nets vmap gets wrong, adapt task by task.

    ``vmap`` over per-task conv weights becomes a grouped convolution, which on the CPU was
    slower than the loop for conv4 (with batch-norm at first order, and without it at second
    order), while a small sinusoid MLP was much faster under ``vmap`` (measured in
    docs/PERFORMANCE.md, "Measurements behind the code's choices", "Task drivers"). The GPU
    choice is not yet measured.
    """
    return contains(model, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) or not vmap_is_exact(
        model, first_order
    )


_local = threading.local()
_pools: dict[int, ThreadPoolExecutor] = {}


def worker_module() -> nn.Module | None:
    """The module copy of the worker thread running this code; None outside the workers."""
    return getattr(_local, "module", None)


def cpu_workers(tasks: int, device: torch.device) -> int:
    """How many tasks run at once: one per intra-op thread torch has, on the CPU only.

    On a GPU one stream serves the kernels anyway; with one thread there is nothing to share.
    """
    if device.type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), tasks))


class WorkerModules:
    """Per-worker copies of a module to run (``metarun.execution.executed.execution_copy``: the
    same function, rewritten to run faster), made once and kept for later meta-steps.

    Only the copies' structure is used: the caller passes the real parameters (and buffers) to
    ``functional_call``, so the copies never need to follow the original's values; their
    train/eval flags are set to the original's each time they are handed out.
    """

    def __init__(self) -> None:
        self._copies: list[nn.Module] = []
        self._source: int | None = None

    def for_module(self, module: nn.Module, workers: int) -> list[nn.Module]:
        if self._source != id(module):
            self._copies, self._source = [], id(module)
        while len(self._copies) < workers:
            self._copies.append(execution_copy(module))
        for clone in self._copies[:workers]:
            follow_modes(module, clone)
        return self._copies[:workers]


def run_tasks(
    work: Callable[[range], Result], tasks: int, modules: Sequence[nn.Module]
) -> list[Result]:
    """``work`` over every task, on one thread per module; results in task order.

    With one module it runs in the calling thread as one call, ``work(range(tasks))``. Otherwise
    each worker thread takes the next task not yet taken, ``work(range(i, i + 1))``, until none is
    left, so a worker slowed down (a task that costs more, a core the hypervisor lends elsewhere
    for a while) holds up only its current task: with fixed halves of the meta-batch the two
    workers of a meta-step were seen to finish apart (docs/PERFORMANCE.md, "Task drivers"). The
    results come back in task order whichever thread ran each task, so a caller summing them in
    that order gets the same numbers every time. torch's intra-op threads are set to 1 for the
    duration (restored after), so the workers don't oversubscribe the cores. Each worker, and
    the calling thread when there is one module, sees its module as ``worker_module()``, and
    runs with the caller's grad mode, autocast settings and loss scale.
    """
    workers = len(modules)
    if workers == 1:
        previous, _local.module = worker_module(), modules[0]
        try:
            return [work(range(tasks))]
        finally:
            _local.module = previous
    results: list[Result | None] = [None] * tasks
    next_task = itertools.count()
    lock = threading.Lock()
    # Thread-local, so the workers take the caller's: grad mode, and autocast with the loss scale
    # (entered per task, so autocast's cache of casted leaves is freed with each task's leaves).
    grad_enabled = torch.is_grad_enabled()
    precision = caller_precision()

    def in_worker(index: int) -> None:
        _local.module = modules[index]
        torch.set_grad_enabled(grad_enabled)
        try:
            while True:
                with lock:
                    task = next(next_task)
                if task >= tasks:
                    return
                with precision():
                    results[task] = work(range(task, task + 1))
        finally:
            _local.module = None

    pool = _pools.get(workers)
    if pool is None:
        pool = _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="metarun-task")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for future in [pool.submit(in_worker, index) for index in range(workers)]:
            future.result()
    finally:
        torch.set_num_threads(threads)
    return results  # type: ignore[return-value]


def stack_results(results: list[Any]) -> Any:
    """Stack per-task results (tensors, or tuples/dicts of them) along a new dim 0."""
    first = results[0]
    if isinstance(first, Tensor):
        return torch.stack(results)
    if isinstance(first, dict):
        return {key: stack_results([r[key] for r in results]) for key in first}
    return type(first)(stack_results(list(parts)) for parts in zip(*results, strict=True))
