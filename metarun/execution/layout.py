"""Channels-last images for convolutions on the CPU: the layout their kernels run fastest in.

On the CPU, PyTorch's batch-norm, ReLU and max-pool kernels are vectorised over channels when a
tensor is channels-last (``[N, H, W, C]`` in memory) and fall back to slow per-plane loops when it
is not: a conv4 layer-1 max-pool and batch-norm ran several times faster channels-last, and a
whole query pass faster (measured in docs/PERFORMANCE.md, "Measurements behind the code's
choices", "Layout"). oneDNN's convolutions keep the layout they are given, so converting a
network's input is enough for every later layer to run channels-last.

The conversion has one trap: a tensor with one channel (Omniglot's grey images) already counts as
"contiguous in channels-last" (the stride of a size-1 dim is not checked), so
``x.contiguous(memory_format=torch.channels_last)`` returns it unchanged and the convolution,
reading its NCHW strides, computes in NCHW. Such an input gets explicit channels-last strides
here instead (a view of the same memory).

The values are the same up to float rounding (kernels sum in another order): float64
meta-gradients agree with NCHW ones to about 1e-14. The algorithms decide where to use it (e.g.
MAML keeps NCHW for passes it differentiates twice, whose kernels are faster there); only CPU
float32 is converted, as measured. GPUs keep their layout (not measured there yet).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: The dtypes converted: float32 is what was measured (float64 convolutions leave oneDNN).
FAST_DTYPES: tuple[torch.dtype, ...] = (torch.float32,)


def channels_last(images: Tensor) -> Tensor:
    """``images [N, C, H, W]`` with channels-last strides (a view when C is 1, else a copy)."""
    if images.shape[1] == 1:
        images = images.contiguous()
        _, _, height, width = images.shape
        return images.as_strided(images.shape, (height * width, 1, width, 1))
    return images.contiguous(memory_format=torch.channels_last)


def _is_channels_last(images: Tensor) -> bool:
    return images.stride(1) == 1 and images.is_contiguous(memory_format=torch.channels_last)


def cpu_fast_layout(images: Tensor) -> Tensor:
    """``images`` channels-last where that was measured faster (4-D float32 on the CPU), else
    unchanged. For the input of a network that starts with a convolution."""
    if (
        images.dim() != 4
        or images.device.type != "cpu"
        or images.dtype not in FAST_DTYPES
        or _is_channels_last(images)
    ):
        return images
    return channels_last(images)
