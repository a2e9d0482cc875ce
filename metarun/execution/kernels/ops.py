"""Batch-norm (batch statistics) and 2x2 max-pool on the fused CPU kernels, differentiable twice.

``batch_norm`` and ``max_pool2x2`` compute what ``F.batch_norm(x, None, None, w, b, True, 0.0,
eps)`` and ``F.max_pool2d(x, 2)`` compute, for float32/float64 CPU tensors (batch-norm NCHW only,
max-pool NCHW or channels-last), and fall back to those functions for anything else (or when the
kernels are not built):

- batch-norm's forward, backward and double backward are each one or two sweeps per channel
  (``cpu_kernels.c``). Its backward is itself an ``autograd.Function`` whose backward is the
  analytic double backward, so second-order MAML's Hessian-vector products go through it; a
  third derivative is refused with an error, as nothing in metarun takes one;
- max-pool (NCHW, and channels-last where a gradient will be taken) keeps one byte per output
  for the backward pass, which of its window's four inputs it took, instead of its input (a
  block's batch-norm output, four times its own size) and 8-byte indices; its backward puts each
  gradient back there (``unpool2x2``), and that and its opposite (``gather2x2``) are each
  other's backward, to any order;
- ``batch_norm_max_pool2x2`` is the two as one op, for a pool right after a batch-norm (conv4's
  blocks, ``metarun.execution.executed``): the forward pools the normalised values without
  writing them, and the backward sums over the taken places and writes the input's gradient in
  one sweep, so neither the normalised tensor nor its unpooled gradient (each the size of the
  block's convolution output) ever exists. That is most of a conv4 task's peak memory
  (docs/PERFORMANCE.md). Its second derivative writes the unpooled gradient (NCHW) and goes
  through batch-norm's double backward kernel.

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


def _refuse_a_third_derivative() -> None:
    # Grad mode is on in a double backward only where a backward was asked to build a graph
    # (create_graph=True): that would be a third derivative, which the analytic second
    # derivative cannot give. (``once_differentiable`` would not do: with
    # ``torch.autograd.grad(..., inputs)`` its error node lies off the path to the inputs, and
    # the term would be dropped silently.)
    if torch.is_grad_enabled():
        raise RuntimeError(
            "metarun's fused CPU batch-norm has no third derivative; set METARUN_KERNELS=0 "
            "to use PyTorch's kernels for higher-order gradients"
        )


def _bn_double_backward(gg_x: Tensor | None, gg_w: Tensor | None, gg_b: Tensor | None,
                        grad_y: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor,
                        rstd: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The ``bn_double_backward`` kernel on NCHW tensors: the gradients of the backward's
    inputs ``grad_y``, ``x`` and the weight."""
    n, c = x.shape[:2]
    grad_y, x = grad_y.contiguous(), x.contiguous()
    w = _vector(weight, x)
    gg_x = None if gg_x is None else gg_x.contiguous()
    gg_w, gg_b = _vector(gg_w, x), _vector(gg_b, x)
    g_grad_y = torch.empty_like(x)
    g_x = torch.empty_like(x)
    g_w = x.new_empty(c)
    _call("bn_double_backward", x.dtype, _ptr(gg_x), _ptr(gg_w), _ptr(gg_b),
          grad_y.data_ptr(), x.data_ptr(), mean.data_ptr(), rstd.data_ptr(), _ptr(w),
          g_grad_y.data_ptr(), g_x.data_ptr(), g_w.data_ptr(), n, c, x[0, 0].numel())
    return g_grad_y, g_x, g_w


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
        _refuse_a_third_derivative()
        grad_y, x, weight, mean, rstd = ctx.saved_tensors
        g_grad_y, g_x, g_w = _bn_double_backward(gg_x, gg_w, gg_b, grad_y, x, weight, mean, rstd)
        return g_grad_y, g_x, None if weight is None else g_w, None, None


def _pool_layout(x: Tensor) -> bool | None:
    """Where the pool kernels apply to ``x``: False for NCHW, True for channels-last memory;
    None where they do not (then PyTorch's pool runs)."""
    if not (
        x.device.type == "cpu"
        and x.dtype in _SUFFIX
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)
        and kernels.library() is not None
    ):
        return None
    if x.is_contiguous():
        return False
    return True if x.is_contiguous(memory_format=torch.channels_last) else None


def _layout(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def _empty(shape: tuple[int, ...], like: Tensor, dtype: torch.dtype, channels_last: bool
           ) -> Tensor:
    return torch.empty(shape, dtype=dtype, device=like.device,
                       memory_format=_layout(channels_last))


class _MaxPool2x2(torch.autograd.Function):
    """2x2 max-pool on the kernel, keeping one byte per output for the backward pass: which of
    its window's four inputs it took. PyTorch's pool keeps its input (four outputs' worth,
    though its backward reads only the shape) and 8-byte flat indices."""

    @staticmethod
    def forward(x: Tensor, channels_last: bool) -> Any:
        n, c, h, w = x.shape
        x = x.detach()
        y = _empty((n, c, h // 2, w // 2), x, x.dtype, channels_last)
        codes = _empty(y.shape, x, torch.uint8, channels_last)
        _call("max_pool2x2", x.dtype, x.data_ptr(), y.data_ptr(), codes.data_ptr(), n, c, h, w,
              int(channels_last))
        return y, codes

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, channels_last = inputs
        _, codes = output
        ctx.mark_non_differentiable(codes)
        ctx.save_for_backward(codes)
        ctx.size = tuple(x.shape[-2:])
        ctx.channels_last = channels_last

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, _codes: Any) -> Any:
        (codes,) = ctx.saved_tensors
        return _Unpool2x2.apply(grad_y, codes, ctx.size, ctx.channels_last), None


def _by_codes(kernel: str, tensor: Tensor, codes: Tensor, size: tuple[int, int],
              channels_last: bool, out_shape: tuple[int, ...]) -> Tensor:
    """``unpool2x2`` or ``gather2x2`` of ``tensor`` at the places ``codes`` name (a pool's input
    of spatial ``size``), into a new tensor of ``out_shape`` in the same layout."""
    tensor = tensor.detach().contiguous(memory_format=_layout(channels_last))
    out = _empty(out_shape, tensor, tensor.dtype, channels_last)
    _call(kernel, tensor.dtype, tensor.data_ptr(), codes.data_ptr(), out.data_ptr(),
          *codes.shape[:2], *size, int(channels_last))
    return out


class _ByCodes(torch.autograd.Function):
    """Unpool and gather: linear in their tensor, each the other's backward, to any order."""

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        _, codes, size, channels_last = inputs
        ctx.save_for_backward(codes)
        ctx.size, ctx.channels_last = size, channels_last


class _Unpool2x2(_ByCodes):
    """The pool's backward: each gradient back where the pool took its value (the windows do
    not overlap)."""

    @staticmethod
    def forward(grad_y: Tensor, codes: Tensor, size: tuple[int, int], channels_last: bool
                ) -> Tensor:
        return _by_codes("unpool2x2", grad_y, codes, size, channels_last,
                         (*codes.shape[:2], *size))

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> Any:
        (codes,) = ctx.saved_tensors
        return _Gather2x2.apply(grad_out, codes, ctx.size, ctx.channels_last), None, None, None


class _Gather2x2(_ByCodes):
    """The values at the places the pool took (the pool itself, on the pool's input)."""

    @staticmethod
    def forward(full: Tensor, codes: Tensor, size: tuple[int, int], channels_last: bool
                ) -> Tensor:
        return _by_codes("gather2x2", full, codes, size, channels_last, tuple(codes.shape))

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> Any:
        (codes,) = ctx.saved_tensors
        return _Unpool2x2.apply(grad_out, codes, ctx.size, ctx.channels_last), None, None, None


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
    needs_grad = x.requires_grad and torch.is_grad_enabled()
    channels_last = _pool_layout(x)
    # NCHW always (PyTorch's NCHW pool walks each plane slowly); channels-last only where a
    # gradient will be taken, as PyTorch's own channels-last forward is vectorised.
    if channels_last is False or (channels_last and needs_grad):
        return _MaxPool2x2.apply(x, channels_last)[0]
    if (
        needs_grad
        and x.device.type == "cpu"
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)
    ):
        return _MaxPool2x2KeepingIndices.apply(x)
    return F.max_pool2d(x, 2)


class _BatchNormMaxPool(torch.autograd.Function):
    """Batch-norm then 2x2 max-pool as one op: neither the normalised tensor nor the unpooled
    gradient (each the size of the block's convolution output) is ever written. Keeps the
    input, the statistics and one byte per output (which of its window's four it took)."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,
                channels_last: bool) -> Any:
        n, c, h, w = x.shape
        x = x.detach()
        wv, bv = _vector(weight, x), _vector(bias, x)
        y = _empty((n, c, h // 2, w // 2), x, x.dtype, channels_last)
        codes = _empty(y.shape, x, torch.uint8, channels_last)
        mean, rstd = x.new_empty(c), x.new_empty(c)
        _call("bn_pool_forward", x.dtype, x.data_ptr(), _ptr(wv), _ptr(bv), y.data_ptr(),
              codes.data_ptr(), mean.data_ptr(), rstd.data_ptr(), n, c, h, w,
              int(channels_last), float(eps))
        return y, codes, mean, rstd

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, weight, bias, _eps, channels_last = inputs
        _, codes, mean, rstd = output
        ctx.mark_non_differentiable(codes, mean, rstd)
        ctx.save_for_backward(x, weight, codes, mean, rstd)
        ctx.has_bias = bias is not None
        ctx.channels_last = channels_last

    @staticmethod
    def backward(ctx: Any, grad_y: Tensor, *_non_differentiable: Any) -> Any:
        x, weight, codes, mean, rstd = ctx.saved_tensors
        grad_x, grad_w, grad_b = _BatchNormMaxPoolBackward.apply(
            grad_y, codes, x, weight, mean, rstd, ctx.channels_last
        )
        return (
            grad_x,
            None if weight is None else grad_w,
            grad_b if ctx.has_bias else None,
            None,
            None,
        )


class _BatchNormMaxPoolBackward(torch.autograd.Function):
    """The backward of ``_BatchNormMaxPool`` in one kernel (sums over the taken places, then one
    write of the input's gradient); its own backward is batch-norm's analytic double backward
    on the unpooled gradient, gathered back to the pooled places for the pooled gradient."""

    @staticmethod
    def forward(grad_y: Tensor, codes: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor,
                rstd: Tensor, channels_last: bool) -> Any:
        n, c, h, w = x.shape
        grad_y, x = grad_y.detach().contiguous(memory_format=_layout(channels_last)), x.detach()
        wv = _vector(weight, x)
        grad_x = torch.empty_like(x)
        grad_w, grad_b = x.new_empty(c), x.new_empty(c)
        _call("bn_pool_backward", x.dtype, grad_y.data_ptr(), codes.data_ptr(), x.data_ptr(),
              mean.data_ptr(), rstd.data_ptr(), _ptr(wv), grad_x.data_ptr(), grad_w.data_ptr(),
              grad_b.data_ptr(), n, c, h, w, int(channels_last))
        return grad_x, grad_w, grad_b

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        grad_y, codes, x, weight, mean, rstd, channels_last = inputs
        ctx.save_for_backward(grad_y, codes, x, weight, mean, rstd)
        ctx.channels_last = channels_last
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, gg_x: Tensor | None, gg_w: Tensor | None, gg_b: Tensor | None) -> Any:
        _refuse_a_third_derivative()
        grad_y, codes, x, weight, mean, rstd = ctx.saved_tensors
        size = tuple(x.shape[-2:])
        # The unpooled gradient exists only here, in a second-order backward. The double
        # backward kernel is NCHW: a channels-last pass (differentiated once in metarun's
        # algorithms) is converted for it.
        full_grad_y = _by_codes("unpool2x2", grad_y, codes, size, ctx.channels_last,
                                (*codes.shape[:2], *size))
        g_full_grad_y, g_x, g_w = _bn_double_backward(gg_x, gg_w, gg_b, full_grad_y, x, weight,
                                                      mean, rstd)
        del full_grad_y
        codes = codes.contiguous()
        g_grad_y = _by_codes("gather2x2", g_full_grad_y, codes, size, False, tuple(codes.shape))
        return g_grad_y, None, g_x, None if weight is None else g_w, None, None, None


def batch_norm_max_pool2x2(
    x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float
) -> Tensor:
    """``max_pool2x2(batch_norm(x, weight, bias, eps))`` in one op where the kernels apply (CPU
    float NCHW or channels-last, outside ``torch.func`` transforms), else those two."""
    if (
        x.dim() != 4
        or x.shape[2] < 2
        or x.shape[3] < 2
        or (channels_last := _pool_layout(x)) is None
    ):
        return max_pool2x2(batch_norm(x, weight, bias, eps))
    return _BatchNormMaxPool.apply(x, weight, bias, eps, channels_last)[0]
