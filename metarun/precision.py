"""``trainer.precision``: float32, or bfloat16 / float16 autocast, float16 with loss scaling.

The meta-parameters and the optimizer stay float32; ``torch.autocast`` runs the meta-training
forward (``meta_train_step``, with its inner loops and their ``create_graph`` gradients: second-
order MAML differentiates through the autocast ops) and evaluation in the lower precision, and
``backward`` runs outside it, as autocast asks. The task threads enter the same autocast
(``metarun.execution.precision``).

bf16 keeps float32's exponent range, so nothing needs scaling. fp16 does: a ``GradScaler``
scales the meta-loss before ``backward`` and unscales before the step, and the task-by-task
driver scales each task's own backward the same way. When the scaled gradients overflow the
scaler skips that optimizer step and halves the scale: that is its normal working, not a
diverging run, so it is never reported as a non-finite loss (a non-finite *loss* still is). With
several processes the scaled gradients are all-reduced before the scaler looks at them, so every
rank sees the same gradients, finds the same overflow and keeps the same scale.

MAML's inner-loop support gradients (``torch.autograd.grad`` inside ``adapt``) are taken of the
unscaled support loss: under fp16 they may lose small values, so bf16 is the one to prefer where
the hardware has it (any recent GPU, and CPUs).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor

from metarun.config import PRECISIONS
from metarun.errors import ConfigError
from metarun.execution.precision import AUTOCAST_DEVICES, scaled_task_losses

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(name: str, device: torch.device) -> None:
    """Refuse, in one line, a precision this torch or this device cannot run."""
    if name not in PRECISIONS:
        raise ConfigError(f"trainer.precision={name!r} is not allowed: use fp32, bf16 or fp16")
    if name == "fp32":
        return
    if device.type not in AUTOCAST_DEVICES:
        raise ConfigError(
            f"trainer.precision={name} runs on cpu or cuda, not {device.type}; "
            "use trainer.precision=fp32 there"
        )
    if not hasattr(torch, "get_autocast_dtype"):  # torch < 2.4: no per-device autocast queries
        raise ConfigError(
            f"trainer.precision={name} needs torch 2.4 or newer (this is {torch.__version__}); "
            "upgrade torch or use trainer.precision=fp32"
        )
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(
            "trainer.precision=bf16 but this GPU has no bfloat16 support; "
            "use trainer.precision=fp16 or fp32"
        )


class Precision:
    """One run's precision: the autocast contexts, the loss scaler, and their saved state."""

    def __init__(self, name: str = "fp32", device: torch.device | None = None) -> None:
        device = device or torch.device("cpu")
        check_precision(name, device)
        self.name = name
        self.device_type = device.type
        self.dtype = _DTYPES.get(name)
        self.scaler = torch.amp.GradScaler(device.type) if name == "fp16" else None
        #: Optimizer steps the scaler skipped for overflowing gradients (fp16 only).
        self.skipped_steps = 0

    def autocast(self) -> AbstractContextManager[Any]:
        """Evaluation's context: autocast in the run's precision (nothing for fp32)."""
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(self.device_type, self.dtype)

    @contextmanager
    def forward(self) -> Iterator[None]:
        """The meta-training forward's context: autocast, and for fp16 the scale that per-task
        backward passes inside the step use."""
        scale = 1.0 if self.scaler is None else self.scaler.get_scale()
        with self.autocast(), scaled_task_losses(scale):
            yield

    def backward(self, loss: Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Divide the (reduced) gradients by the loss scale now, so a gradient clip sees the true
        ones; ``step`` then does not unscale again. An inf/NaN found here still skips the step."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> bool:
        """The optimizer step on the (reduced) gradients; False where fp16 skipped it."""
        if self.scaler is None:
            optimizer.step()
            return True
        before = self.scaler.get_scale()
        self.scaler.step(optimizer)  # unscales, and skips the step on inf/NaN gradients
        self.scaler.update()  # lowers the scale exactly when it skipped
        stepped = self.scaler.get_scale() >= before
        self.skipped_steps += not stepped
        return stepped

    def log_values(self) -> dict[str, float]:
        """What the meta-train log shows of the scaler (nothing without one)."""
        if self.scaler is None:
            return {}
        return {"loss_scale": self.scaler.get_scale(), "fp16_skipped_steps": self.skipped_steps}

    def state(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "skipped_steps": self.skipped_steps,
        }

    def restore(self, state: dict[str, Any] | None) -> None:
        """A checkpoint's scaler state, where both have one: a run resumed in another precision
        (allowed: trainer.* may change) starts a fresh scale."""
        if not state:
            return
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
            self.skipped_steps = int(state.get("skipped_steps", 0))
