"""Batch-norm (batch statistics) and 2x2 max-pool on the fused CPU kernels, differentiable twice.

``batch_norm`` and ``max_pool2x2`` compute what ``F.batch_norm(x, None, None, w, b, True, 0.0,
eps)`` and ``F.max_pool2d(x, 2)`` compute, for NCHW-contiguous float32/float64 CPU tensors, and
fall back to those functions for anything else (or when the kernels are not built):

- batch-norm's forward, backward and double backward are each one or two sweeps per channel
  (``cpu_kernels.c``). Its backward is itself an ``autograd.Function`` whose backward is the
  analytic double backward, so second-order MAML's Hessian-vector products go through it; a
  third derivative is refused with an error, as nothing in metarun takes one;
- max-pool's forward is the kernel (PyTorch's NCHW path walks each plane slowly). It keeps only
  its indices for the backward pass, not its input (a block's batch-norm output, four times its
  own size, which nothing else keeps): the backward puts each gradient back where the pool
  picked (``max_unpool2d``; the windows do not overlap), differentiable in turn. Other layouts
  that take a gradient on the CPU (channels-last) get PyTorch's forward, keeping the same.

Both are exact reformulations: float64 gradients and second derivatives agree with PyTorch's to
rounding (``tests/test_kernels.py``), and max-pool picks the same element on ties.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from metarun.execution import kernels

_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


def _ptr(tensor: Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def usable(x: Tensor) -> bool:
    """True where the kernels apply: a 4-D NCHW-contiguous float CPU tensor outside torch.func
    transforms (whose wrapped tensors have no plain memory), with the kernels built."""
    return (
        x.dim() == 4
        and x.device.type == "cpu"
        and x.dtype in _SUFFIX
        and x.is_contiguous()
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)
        and kernels.library() is not None
    )


def _call(name: str, dtype: torch.dtype, *args: Any) -> None:
    getattr(kernels.library(), f"{name}_{_SUFFIX[dtype]}")(*args)


def _vector(tensor: Tensor | None, like: Tensor) -> Tensor | None:
    return None if tensor is None else tensor.detach().to(like.dtype).contiguous()


class _BatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Any:
        n, c = x.shape[:2]
        x = x.detach()
        w, b = _vector(weight, x), _vector(bias, x)
        y = torch.empty_like(x)
        mean = x.new_empty(c)
        rstd = x.new_empty(c)
        _call("bn_forward", x.dtype, x.data_ptr(), _ptr(w), _ptr(b), y.data_ptr(),
              mean.data_ptr(), rstd.data_ptr(), n, c, x[0, 0].numel(), float(eps))
        return y, mean, rstd

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, weight, bias, _eps = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, _mean: Any, _rstd: Any) -> Any:
        x, weight, mean, rstd = ctx.saved_tensors
        grad_x, grad_w, grad_b = _BatchNormBackward.apply(grad_y, x, weight, mean, rstd)
        return (
            grad_x,
            None if weight is None else grad_w,
            grad_b if ctx.has_bias else None,
            None,
        )


class _BatchNormBackward(torch.autograd.Function):
    @staticmethod
    def forward(
        grad_y: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, rstd: Tensor
    ) -> Any:
        n, c = x.shape[:2]
        grad_y, x = grad_y.detach().contiguous(), x.detach()
        w = _vector(weight, x)
        grad_x = torch.empty_like(x)
        grad_w, grad_b = x.new_empty(c), x.new_empty(c)
        _call("bn_backward", x.dtype, grad_y.data_ptr(), x.data_ptr(), mean.data_ptr(),
              rstd.data_ptr(), _ptr(w), grad_x.data_ptr(), grad_w.data_ptr(),
              grad_b.data_ptr(), n, c, x[0, 0].numel())
        return grad_x, grad_w, grad_b

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        grad_y, x, weight, mean, rstd = inputs
        ctx.save_for_backward(grad_y, x, weight, mean, rstd)
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, gg_x: Tensor | None, gg_w: Tensor | None, gg_b: Tensor | None) -> Any:
        # Grad mode is on here only in a backward asked to build a graph (create_graph=True):
        # that would be a third derivative, which this analytic second derivative cannot give.
        # (``once_differentiable`` would not do: with ``torch.autograd.grad(..., inputs)`` its
        # error node lies off the path to the inputs, and the term would be dropped silently.)
        if torch.is_grad_enabled():
            raise RuntimeError(
                "metarun's fused CPU batch-norm has no third derivative; set METARUN_KERNELS=0 "
                "to use PyTorch's kernels for higher-order gradients"
            )
        grad_y, x, weight, mean, rstd = ctx.saved_tensors
        n, c = x.shape[:2]
        grad_y = grad_y.contiguous()
        w = _vector(weight, x)
        gg_x = None if gg_x is None else gg_x.contiguous()
        gg_w, gg_b = _vector(gg_w, x), _vector(gg_b, x)
        g_grad_y = torch.empty_like(x)
        g_x = torch.empty_like(x)
        g_w = x.new_empty(c)
        _call("bn_double_backward", x.dtype, _ptr(gg_x), _ptr(gg_w), _ptr(gg_b),
              grad_y.data_ptr(), x.data_ptr(), mean.data_ptr(), rstd.data_ptr(), _ptr(w),
              g_grad_y.data_ptr(), g_x.data_ptr(), g_w.data_ptr(), n, c, x[0, 0].numel())
        return g_grad_y, g_x, None if weight is None else g_w, None, None


class _MaxPool2x2(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor) -> Any:
        n, c, h, w = x.shape
        x = x.detach()
        y = x.new_empty(n, c, h // 2, w // 2)
        indices = torch.empty(y.shape, dtype=torch.int64)
        _call("max_pool2x2", x.dtype, x.data_ptr(), y.data_ptr(), indices.data_ptr(), n * c, h, w)
        return y, indices

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        (x,) = inputs
        _, indices = output
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(indices)
        ctx.size = x.shape[-2:]

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, _indices: Any) -> Tensor:
        (indices,) = ctx.saved_tensors
        return F.max_unpool2d(grad_y.contiguous(), indices, 2, output_size=ctx.size)


def batch_norm(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float) -> Tensor:
    """Batch-norm with the batch's own statistics (no running statistics)."""
    if not usable(x) or x.shape[0] * x[0, 0].numel() <= 1:
        # (one value per channel: PyTorch's own error says why that cannot be normalised)
        return F.batch_norm(x, None, None, weight, bias, True, 0.0, eps)
    return _BatchNorm.apply(x, weight, bias, eps)[0]


class _MaxPool2x2KeepingIndices(torch.autograd.Function):
    """PyTorch's 2x2 max-pool, keeping only its indices for the backward pass.

    PyTorch's own max-pool also keeps its input, the size of four outputs, though its backward
    reads only the input's shape: in conv4 that input is the block's batch-norm output, which
    nothing else keeps, so it is freed here as soon as it is pooled. The backward puts each
    output's gradient back where the pool picked (``max_unpool2d``: the windows do not
    overlap), which is differentiable in turn.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        y, indices = torch.ops.aten.max_pool2d_with_indices(x, [2, 2], [2, 2])
        ctx.save_for_backward(indices)
        ctx.size = x.shape[-2:]
        ctx.layout = (
            torch.channels_last
            if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
            else torch.contiguous_format
        )
        return y

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor) -> Tensor:
        (indices,) = ctx.saved_tensors
        # The input's gradient in the input's layout, as PyTorch's pool gives it (the unpool
        # follows its input's; an upstream gradient may come in another).
        grad_y = grad_y.contiguous(memory_format=ctx.layout)
        return F.max_unpool2d(grad_y, indices, 2, output_size=ctx.size)


def max_pool2x2(x: Tensor) -> Tensor:
    """``F.max_pool2d(x, 2)``: kernel 2, stride 2, no padding, floor mode.

    On the kernel where it applies (NCHW); where a gradient will be taken of a CPU tensor of
    another layout (the channels-last query passes), PyTorch's pool keeping only its indices;
    elsewhere (GPU, ``torch.func`` transforms, no gradient) ``F.max_pool2d`` itself.
    """
    if x.dim() != 4 or x.shape[2] < 2 or x.shape[3] < 2:
        return F.max_pool2d(x, 2)
    if usable(x):
        return _MaxPool2x2.apply(x)[0]
    if (
        x.requires_grad
        and torch.is_grad_enabled()
        and x.device.type == "cpu"
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)
    ):
        return _MaxPool2x2KeepingIndices.apply(x)
    return F.max_pool2d(x, 2)
