"""The copy of a network that metarun's task loops run: the same function, computed faster.

The algorithms never run a user's module in place when they adapt it per task: they call
``functional_call`` on a structural copy with the real parameters and buffers passed in (the
task-parallel threads need one copy each anyway: ``metarun.execution.drivers``). That copy
is rewritten here, in ways that change no output and no gradient, first or second order:

- **ReLU after max-pool.** In an ``nn.Sequential``, ``ReLU, MaxPool2d`` becomes
  ``MaxPool2d, ReLU``: ReLU is monotone, so ``relu(maxpool(x)) == maxpool(relu(x))``, and the
  same element is picked on ties wherever the gradient is not zero anyway (where the window's
  maximum is positive, ReLU keeps the order of the values; where it is not, ReLU's gradient is
  zero in both orders). ReLU's forward, backward and double backward then see a quarter of the
  elements.
- **Fused CPU batch-norm and max-pool** (``metarun.execution.kernels.ops``): ``BatchNorm2d`` without
  running statistics and ``MaxPool2d(2)`` run on metarun's kernels on the CPU (NCHW, and
  channels-last where noted there), and on PyTorch's own elsewhere (GPU, inside ``torch.func``
  transforms). Where the pool directly follows the batch-norm (conv4's blocks, after the swap
  above), the two are one op: the normalised tensor and its unpooled gradient, each the size of
  the block's convolution output, are never written, which is most of a task's peak memory.

Measured on one thread (conv4, one second-order MAML task): see docs/PERFORMANCE.md. Parameter
and buffer names are those of the original, so ``functional_call`` takes the original's.
"""

from __future__ import annotations

import copy
from typing import Any

from torch import Tensor, nn
from torch.func import functional_call

from metarun.execution.kernels import ops

#: Which rewrites ``execution_copy`` makes (both are exact; the switches let the benchmark
#: measure what each gives: scripts/bench.py --no-relu-swap, --no-fused-kernels).
SWAP_RELU_AND_POOL = True
FUSED_KERNELS = True


class FusedBatchNorm2d(nn.BatchNorm2d):
    """``BatchNorm2d(track_running_stats=False)`` on the fused CPU kernels where they apply."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.batch_norm(x, self.weight, self.bias, self.eps)


class FusedMaxPool2d(nn.MaxPool2d):
    """``MaxPool2d(2)`` on the fused CPU kernel where it applies."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.max_pool2x2(x)


class FusedBatchNormMaxPool2d(nn.BatchNorm2d):
    """``BatchNorm2d(track_running_stats=False)`` and the ``MaxPool2d(2)`` after it as one op
    (``ops.batch_norm_max_pool2x2``); the pool's own module becomes ``PooledAlready``."""

    def forward(self, x: Tensor) -> Tensor:
        return ops.batch_norm_max_pool2x2(x, self.weight, self.bias, self.eps)


class PooledAlready(nn.MaxPool2d):
    """A ``MaxPool2d(2)`` whose pooling the batch-norm before it does: passes its input on."""

    def forward(self, x: Tensor) -> Tensor:
        return x


def _pair(value: int | tuple[int, ...]) -> tuple[int, ...]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _is_plain_pool2(module: nn.Module) -> bool:
    if type(module) is not nn.MaxPool2d:
        return False
    stride = module.stride if module.stride is not None else module.kernel_size
    return (
        _pair(module.kernel_size) == (2, 2)
        and _pair(stride) == (2, 2)
        and _pair(module.padding) == (0, 0)
        and _pair(module.dilation) == (1, 1)
        and not module.ceil_mode
        and not module.return_indices
    )


def _swap_relu_and_pool(sequential: nn.Sequential) -> None:
    keys = list(sequential._modules)
    k = 0
    while k + 1 < len(keys):
        first, second = sequential._modules[keys[k]], sequential._modules[keys[k + 1]]
        if (
            type(first) is nn.ReLU
            and type(second) is nn.MaxPool2d
            and not second.return_indices
        ):
            sequential._modules[keys[k]], sequential._modules[keys[k + 1]] = second, first
            k += 2
        else:
            k += 1


def execution_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` rewritten as above; its parameters are never used."""
    clone = copy.deepcopy(module)
    for sub in clone.modules():
        if SWAP_RELU_AND_POOL and isinstance(sub, nn.Sequential):
            _swap_relu_and_pool(sub)
    for sub in clone.modules() if FUSED_KERNELS else ():
        if isinstance(sub, nn.Sequential):
            _fuse_batch_norm_and_pool(sub)
    for sub in clone.modules() if FUSED_KERNELS else ():
        if _is_batch_statistics_norm(sub):
            sub.__class__ = FusedBatchNorm2d
        elif _is_plain_pool2(sub):
            sub.__class__ = FusedMaxPool2d
    return clone


def _is_batch_statistics_norm(module: nn.Module) -> bool:
    return type(module) is nn.BatchNorm2d and not module.track_running_stats


def _fuse_batch_norm_and_pool(sequential: nn.Sequential) -> None:
    modules = list(sequential._modules.values())
    for first, second in zip(modules, modules[1:], strict=False):
        if _is_batch_statistics_norm(first) and _is_plain_pool2(second):
            first.__class__ = FusedBatchNormMaxPool2d
            second.__class__ = PooledAlready


def run_copy(
    clone: nn.Module, source: nn.Module, params: dict[str, Tensor], *inputs: Tensor
) -> Any:
    """``clone`` on ``inputs`` (usually one ``x``) with ``source``'s buffers and the given
    parameters (``source``'s own, a task's adapted ones, or a task's own leaves): the copy's own
    tensors are never read."""
    return functional_call(clone, {**dict(source.named_buffers()), **params}, inputs)


def follow_modes(source: nn.Module, clone: nn.Module) -> None:
    """Give ``clone`` the train/eval flags ``source`` has now (a copy does not follow them).

    By name: a swapped ReLU and max-pool trade flags, which neither reads.
    """
    originals = dict(source.named_modules())
    for name, copied in clone.named_modules():
        copied.training = originals[name].training
