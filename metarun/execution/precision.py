"""Mixed precision inside the execution layer: autocast on the task threads, scaled task losses.

**Autocast is thread-local.** ``torch.autocast`` sets a flag of the thread that enters it; a
worker thread of ``drivers.run_tasks`` starts with autocast off whatever its caller set, so the
per-task forward passes would silently run in float32. ``caller_autocast`` records the calling
thread's autocast settings (every device type's) and gives the workers a context that enters the
same ones.

**Loss scaling (fp16) inside a meta-step.** The trainer's ``GradScaler`` scales the loss it calls
``backward`` on; but the task-by-task driver (``task_gradients``) takes each task's meta-gradient
inside ``meta_train_step``, before that, with its own ``torch.autograd.grad``. There the scaler
cannot reach: float16 activation gradients of one task's backward would underflow unscaled. So
the trainer publishes its current scale with ``scaled_task_losses`` and the driver differentiates
``scale * loss``, divides the (float32) gradients by ``scale`` again and hands back the true
meta-gradient, which the trainer's scaler then scales and checks like any other: an overflow in
a task's backward is an ``inf`` there, and the scaler skips the step and lowers the scale.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from typing import Any

import torch

#: The device types whose autocast state the workers copy (and where metarun uses autocast).
AUTOCAST_DEVICES = ("cpu", "cuda")

_local = threading.local()


def autocast_enabled() -> bool:
    """Whether this thread runs under autocast on any device metarun autocasts."""
    if not hasattr(torch, "get_autocast_dtype"):
        return False
    return any(torch.is_autocast_enabled(device_type) for device_type in AUTOCAST_DEVICES)


def caller_autocast() -> Callable[[], AbstractContextManager[Any]]:
    """A factory of contexts that enter the calling thread's autocast settings (none: a no-op)."""
    if not hasattr(torch, "get_autocast_dtype"):  # torch < 2.4, where metarun autocasts nothing
        return nullcontext
    settings = [
        (device_type, torch.get_autocast_dtype(device_type))
        for device_type in AUTOCAST_DEVICES
        if torch.is_autocast_enabled(device_type)
    ]
    cache = torch.is_autocast_cache_enabled()

    def enter() -> AbstractContextManager[Any]:
        stack = ExitStack()
        for device_type, dtype in settings:
            stack.enter_context(torch.autocast(device_type, dtype, cache_enabled=cache))
        return stack

    return enter


@contextmanager
def scaled_task_losses(scale: float) -> Iterator[None]:
    """Within this block (in this thread), per-task meta-gradients are taken of ``scale * loss``
    and divided by ``scale`` (see the module's docstring); 1.0 outside it."""
    previous = loss_scale()
    _local.scale = float(scale)
    try:
        yield
    finally:
        _local.scale = previous


def loss_scale() -> float:
    """The scale ``scaled_task_losses`` set in this thread; 1.0 (no scaling) outside it."""
    return getattr(_local, "scale", 1.0)
