"""Batch-norm written in plain tensor ops, for the one place the fused kernel is wrong.

PyTorch's fused batch-norm gets second-order gradients wrong under ``torch.func.vmap``
(pytorch/functorch#534: the batching rule of its backward; in torch 2.13 and 2.14 on the CPU a
vmapped second-order MAML meta-gradient through conv4 was off by about 1e-2 in float64). Written
as ``var_mean``, subtraction, ``rsqrt``, multiplication and addition, every op has an exact
batching rule and an exact double backward, so the vmap driver gives the loop driver's
meta-gradient (to about 1e-15 in float64: ``tests/test_maml.py``).

It is slower than the fused kernel outside ``vmap`` (more passes over the activations), so it is
used only inside ``batch_norm_in_plain_ops()``, which MAML's vmap driver enters for second-order
meta-training. Only batch-norm that normalises with the batch's own statistics is replaced (the
backbones here keep no running statistics); a call that would update running statistics goes to
the native op unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode


def plain_batch_norm(
    inputs: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``F.batch_norm``'s value for batch statistics or fixed running statistics, in plain ops.

    Statistics per channel (dim 1) over every other dim, with the biased variance, as the fused
    kernel normalises. ``momentum`` only matters where running statistics are updated, which
    this function does not do (see ``batch_norm_in_plain_ops``).
    """
    del momentum
    shape = [1, -1] + [1] * (inputs.dim() - 2)
    if training or running_mean is None or running_var is None:
        dims = [0, *range(2, inputs.dim())]
        var, mean = torch.var_mean(inputs, dim=dims, correction=0, keepdim=True)
    else:
        mean, var = running_mean.view(shape), running_var.view(shape)
    # The affine weight joins the per-channel scale, so the activations are multiplied once.
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.view(shape)
    outputs = (inputs - mean) * scale
    if bias is not None:
        outputs = outputs + bias.view(shape)
    return outputs


def _updates_running_statistics(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    bound = dict(zip(("input", "running_mean", "running_var", "weight", "bias", "training"),
                     args, strict=False))
    bound.update(kwargs)
    return bool(bound.get("training", False)) and bound.get("running_mean") is not None


class batch_norm_in_plain_ops(TorchFunctionMode):  # noqa: N801 (used as a context manager)
    """Within this context, ``F.batch_norm`` (what ``nn.BatchNorm*d`` calls) runs in plain ops.

    Calls that would update running statistics keep the native op: replacing them would change
    what a module's buffers hold.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        if func is F.batch_norm and not _updates_running_statistics(args, kwargs):
            return plain_batch_norm(*args, **kwargs)
        return func(*args, **kwargs)
