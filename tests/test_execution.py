"""The rewritten copy of a network the task loops run computes the original's function, to
second order, and keeps its parameter names."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metarun.execution import executed as execution
from metarun.execution.executed import (
    FusedBatchNorm2d,
    FusedBatchNormMaxPool2d,
    FusedMaxPool2d,
    PooledAlready,
    execution_copy,
    follow_modes,
)
from metarun.models.conv4 import Conv4


def test_relu_moves_after_max_pool_and_the_norms_and_pools_are_fused() -> None:
    model = Conv4((1, 28, 28), 5)
    clone = execution_copy(model)
    for block in clone.features[:4]:
        assert [type(m) for m in block] == [
            nn.Conv2d, FusedBatchNormMaxPool2d, PooledAlready, nn.ReLU  # norm and pool: one op
        ]
    assert [type(m) for m in model.features[0]] == [
        nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d  # the original is untouched
    ]
    assert dict(clone.named_parameters()).keys() == dict(model.named_parameters()).keys()


def test_only_exact_rewrites_are_made() -> None:
    model = nn.Sequential(
        nn.ReLU(), nn.MaxPool2d(2, return_indices=True),  # indices differ after a swap
        nn.LeakyReLU(), nn.MaxPool2d(2),  # not monotone through zero like ReLU: kept
        nn.BatchNorm2d(3),  # running statistics: PyTorch's kernel, which updates them
        nn.MaxPool2d(3), nn.MaxPool2d(2, padding=1),
        nn.BatchNorm2d(3, track_running_stats=False), nn.MaxPool2d(3),  # not a 2x2 pool
        nn.BatchNorm2d(3, track_running_stats=False), nn.Identity(), nn.MaxPool2d(2),  # apart
    )
    clone = execution_copy(model)
    assert [type(m) for m in clone] == [
        nn.ReLU, nn.MaxPool2d, nn.LeakyReLU, FusedMaxPool2d, nn.BatchNorm2d, nn.MaxPool2d,
        nn.MaxPool2d, FusedBatchNorm2d, nn.MaxPool2d, FusedBatchNorm2d, nn.Identity,
        FusedMaxPool2d,
    ]


def _derivatives(module: nn.Module, params, x, y):
    """Meta-gradient of one second-order MAML step, as the loop driver takes it."""
    loss = F.cross_entropy(functional_call(module, params, (x,)), y)
    grads = torch.autograd.grad(loss, list(params.values()), create_graph=True)
    adapted = {k: p - 0.4 * g for (k, p), g in zip(params.items(), grads, strict=True)}
    query = F.cross_entropy(functional_call(module, adapted, (x.flip(0) + 0.1,)), y.flip(0))
    return torch.autograd.grad(query, list(params.values()))


@pytest.mark.parametrize("binary", [False, True])
def test_same_function_and_second_order_gradients_as_the_original(binary) -> None:
    torch.manual_seed(0)
    model = Conv4((1, 28, 28), 5).double()
    clone = execution_copy(model)
    x = torch.rand(10, 1, 28, 28, dtype=torch.float64)
    if binary:  # Omniglot-like: flat regions, so exact ties in every max-pool window
        x = (x > 0.7).double()
    y = torch.arange(5).repeat(2)
    params = dict(model.named_parameters())
    torch.testing.assert_close(
        functional_call(clone, params, (x,)), model(x), rtol=1e-12, atol=1e-12
    )
    got, want = _derivatives(clone, params, x, y), _derivatives(model, params, x, y)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_relu_after_max_pool_picks_the_same_gradient_on_ties_and_zeros() -> None:
    # Windows: all negative, a zero maximum with negatives, tied positives, tied zeros.
    x = torch.tensor(
        [[[[-1.0, -2.0, 0.0, -1.0, 2.0, 2.0, 0.0, 0.0],
           [-3.0, -1.0, -5.0, -2.0, 1.0, 2.0, 0.0, -1.0]]]],
        dtype=torch.float64,
        requires_grad=True,
    )
    cotangent = torch.tensor([[[[1.0, 2.0, 3.0, 4.0]]]], dtype=torch.float64)
    (pool_last,) = torch.autograd.grad((F.max_pool2d(F.relu(x), 2) * cotangent).sum(), x)
    (relu_last,) = torch.autograd.grad((F.relu(F.max_pool2d(x, 2)) * cotangent).sum(), x)
    assert torch.equal(pool_last, relu_last)


def test_copy_follows_the_original_train_and_eval_flags() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Dropout(0.5), nn.ReLU(), nn.MaxPool2d(2))
    clone = execution_copy(model)
    model.eval()
    follow_modes(model, clone)
    assert not any(m.training for m in clone.modules())
    model.train()
    model[1].eval()
    follow_modes(model, clone)
    assert clone.training and not clone[1].training


def test_each_rewrite_can_be_switched_off_for_the_benchmark(monkeypatch) -> None:
    model = Conv4((1, 28, 28), 5)
    monkeypatch.setattr(execution, "SWAP_RELU_AND_POOL", False)
    block = execution_copy(model).features[0]
    assert [type(m) for m in block] == [nn.Conv2d, FusedBatchNorm2d, nn.ReLU, FusedMaxPool2d]
    monkeypatch.setattr(execution, "FUSED_KERNELS", False)
    block = execution_copy(model).features[0]
    assert [type(m) for m in block] == [nn.Conv2d, nn.BatchNorm2d, nn.ReLU, nn.MaxPool2d]
