"""The plain-ops batch-norm against PyTorch's fused one, and when it replaces it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import metarun.execution.plain_norm as plain_norm
from metarun.execution.plain_norm import batch_norm_in_plain_ops, plain_batch_norm


def test_batch_statistics_match_the_fused_kernel() -> None:
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(6, 4, 5, 3, generator=g, dtype=torch.float64) * 3 + 1
    weight = torch.randn(4, generator=g, dtype=torch.float64)
    bias = torch.randn(4, generator=g, dtype=torch.float64)
    want = F.batch_norm(inputs, None, None, weight, bias, training=True, eps=1e-3)
    got = plain_batch_norm(inputs, None, None, weight, bias, training=True, eps=1e-3)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    # One-dimensional features too (BatchNorm1d on [N, C]), and no affine parameters.
    flat = inputs[:, :, 0, 0]
    torch.testing.assert_close(
        plain_batch_norm(flat, None, None), F.batch_norm(flat, None, None, training=True)
    )


def test_fixed_running_statistics_match_the_fused_kernel() -> None:
    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64)
    mean = torch.randn(3, generator=g, dtype=torch.float64)
    var = torch.rand(3, generator=g, dtype=torch.float64) + 0.5
    want = F.batch_norm(inputs, mean, var, training=False)
    torch.testing.assert_close(plain_batch_norm(inputs, mean, var, training=False), want)


def test_context_replaces_batch_statistics_only(monkeypatch) -> None:
    torch.manual_seed(2)
    inputs = torch.randn(8, 3, 4, 4)
    per_batch = nn.BatchNorm2d(3, track_running_stats=False)
    tracking = nn.BatchNorm2d(3)
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs.get("training", args[5] if len(args) > 5 else False))
        return plain_batch_norm(*args, **kwargs)

    monkeypatch.setattr(plain_norm, "plain_batch_norm", spy)
    with batch_norm_in_plain_ops():
        per_batch(inputs)
        tracking(inputs)  # training with running statistics: the native op, which updates them
        tracking.eval()
        tracking(inputs)  # evaluation with running statistics: plain ops
    assert calls == [True, False]
    assert tracking.num_batches_tracked.item() == 1
    assert not torch.allclose(tracking.running_mean, torch.zeros(3))
