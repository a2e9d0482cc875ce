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

MAML's inner-loop support gradients (``MAML.support_grads``, also Meta-SGD's, ANIL's and
Reptile's) are loss-scaled the same way inside the meta-step. Their overflow makes the meta-loss
itself non-finite (the adapted parameters are), so a non-finite meta-loss of a step that scaled an
inner loss by more than 1 is taken for the scaler's overflow: the step is skipped and the scale
lowered exactly as for an overflowing gradient (a run that really diverges stops once the scale
is down to 1). Evaluation's inner loops are not scaled. bf16 needs none of this and is the one
to prefer where the hardware has it (any recent GPU, and CPUs).
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
        with self.autocast(), scaled_task_losses(scale) as scope:
            self._last_forward = scope
            yield

    @property
    def inner_overflow_possible(self) -> bool:
        """Whether the last ``forward`` scaled an inner-loop loss up (fp16, scale above 1), so
        that a non-finite meta-loss may be the scale's overflow rather than a diverging run."""
        scope = getattr(self, "_last_forward", None)
        return scope is not None and scope.inner_overflow_possible

    def skip_overflow(self, optimizer: torch.optim.Optimizer) -> None:
        """Skip this step and lower the scale exactly as the scaler does for an overflowing
        gradient (through the scaler's own path: a NaN gradient it finds), for a meta-loss that
        an inner-loop gradient's overflow made non-finite before any gradient existed."""
        assert self.scaler is not None, "only fp16 scales, and so overflows"
        optimizer.zero_grad(set_to_none=True)
        first = optimizer.param_groups[0]["params"][0]
        self.scaler.scale(torch.zeros((), device=first.device))  # a fresh scaler sets up its scale
        first.grad = torch.full_like(first, float("nan"))
        stepped = self.step(optimizer)
        optimizer.zero_grad(set_to_none=True)
        assert not stepped, "the scaler took a step on a NaN gradient"

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
