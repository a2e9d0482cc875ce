"""Mixed precision inside the execution layer: autocast on the task threads, scaled task losses.

**Autocast is thread-local.** ``torch.autocast`` sets a flag of the thread that enters it; a
worker thread of ``drivers.run_tasks`` starts with autocast off whatever its caller set, so the
per-task forward passes would silently run in float32. ``caller_precision`` records the calling
thread's autocast settings (every device type's) and its loss scale, and gives the workers a
context that enters the same ones.

**Loss scaling (fp16) inside a meta-step.** The trainer's ``GradScaler`` scales the loss it calls
``backward`` on; but the task-by-task driver (``task_gradients``) takes each task's meta-gradient
inside ``meta_train_step``, before that, with its own ``torch.autograd.grad``. There the scaler
cannot reach: float16 activation gradients of one task's backward would underflow unscaled. So
the trainer publishes its current scale with ``scaled_task_losses`` and the driver differentiates
``scale * loss``, divides the (float32) gradients by ``scale`` again and hands back the true
meta-gradient, which the trainer's scaler then scales and checks like any other: an overflow in
a task's backward is an ``inf`` there, and the scaler skips the step and lowers the scale.

**Inner loops (fp16).** MAML's support gradients (``MAML.support_grads``, Meta-SGD's, ANIL's and
Reptile's too; the generated head's fine-tuning in ``HyperNet`` and the learner's gradient that
``MetaLSTM`` feeds its meta-learner, all through ``inner_grad``) are float16 backward passes
inside the meta-step as well, where small gradients flush to zero. They are taken of
``inner_loss_scale() * loss`` and divided by it again (differentiably: second order goes
through the division). Their overflow cannot leave an ``inf``
for the scaler alone to see: the adapted parameters, and so the meta-loss, become non-finite. So
``inner_loss_scale`` records that an inner loss was scaled, and the trainer takes a non-finite
meta-loss of such a step at a scale above 1 for the scaler's overflow (skip, lower the scale),
as torch's recipe for gradients of gradients under a ``GradScaler`` does; at a scale of 1 or
less scaling cannot have caused it, and it stops the run as any non-finite loss.
Evaluation sets no scale: its inner loops are unscaled (an overflow there could not be skipped).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor

#: The device types whose autocast state the workers copy (and where metarun uses autocast).
AUTOCAST_DEVICES = ("cpu", "cuda")

_local = threading.local()


def autocast_enabled() -> bool:
    """Whether this thread runs under autocast on any device metarun autocasts."""
    if not hasattr(torch, "get_autocast_dtype"):
        return False
    return any(torch.is_autocast_enabled(device_type) for device_type in AUTOCAST_DEVICES)


def caller_precision() -> Callable[[], AbstractContextManager[Any]]:
    """A factory of contexts that enter the calling thread's autocast settings and loss scale
    (``scaled_task_losses``) in another thread (neither: a no-op)."""
    scope = _scope()
    if not hasattr(torch, "get_autocast_dtype"):  # torch < 2.4, where metarun autocasts nothing
        settings = []
        cache = False
    else:
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
        if scope is not None:
            stack.enter_context(_entered(scope))
        return stack

    return enter


class LossScaleScope:
    """One block of ``scaled_task_losses``: its scale, and whether an inner-loop loss was scaled
    in it (by any thread: the task threads share the caller's scope)."""

    def __init__(self, scale: float) -> None:
        self.scale = scale
        self.inner_scaled = False

    @property
    def inner_overflow_possible(self) -> bool:
        """Whether a non-finite meta-loss may be the scale's doing: an inner loss scaled up."""
        return self.inner_scaled and self.scale > 1.0


@contextmanager
def scaled_task_losses(scale: float) -> Iterator[LossScaleScope]:
    """Within this block (in this thread, and the task threads it starts), per-task
    meta-gradients and inner-loop gradients are taken of ``scale * loss`` and divided by
    ``scale`` (see the module's docstring); 1.0 outside it."""
    with _entered(LossScaleScope(float(scale))) as scope:
        yield scope


@contextmanager
def _entered(scope: LossScaleScope) -> Iterator[LossScaleScope]:
    previous = _scope()
    _local.scope = scope
    try:
        yield scope
    finally:
        _local.scope = previous


def _scope() -> LossScaleScope | None:
    return getattr(_local, "scope", None)


def loss_scale() -> float:
    """The scale ``scaled_task_losses`` set in this thread; 1.0 (no scaling) outside it."""
    scope = _scope()
    return 1.0 if scope is None else scope.scale


def scaled_grad(loss: Tensor, inputs: Sequence[Tensor], scale: float, **grad_kwargs: Any
                ) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(loss, inputs, **grad_kwargs)`` taken of ``scale * loss`` and divided
    by ``scale`` again (differentiably, so a kept graph goes through the division): a float16
    backward keeps its small values; at scale 1 the plain call."""
    if scale == 1.0:
        return torch.autograd.grad(loss, inputs, **grad_kwargs)
    grads = torch.autograd.grad(loss * scale, inputs, **grad_kwargs)
    return tuple(None if g is None else g / scale for g in grads)


def inner_grad(loss: Tensor, inputs: Sequence[Tensor], **grad_kwargs: Any
               ) -> tuple[Tensor | None, ...]:
    """``scaled_grad`` of an inner-loop loss at ``inner_loss_scale()`` (recorded as scaled)."""
    return scaled_grad(loss, inputs, inner_loss_scale(), **grad_kwargs)


def inner_loss_scale() -> float:
    """The scale for an inner-loop (support) loss's gradient, as ``loss_scale``; a scale other
    than 1 is recorded in the block's scope (``LossScaleScope.inner_scaled``)."""
    scope = _scope()
    if scope is None or scope.scale == 1.0:
        return 1.0
    scope.inner_scaled = True
    return scope.scale
