"""Backbones: output shapes, feature/head split, batch-norm without memory, config errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metarun.errors import ConfigError
from metarun.models.conv4 import Conv4
from metarun.models.mlp import MLP


def test_mlp_sinusoid_net_is_1_40_40_1() -> None:
    model = MLP((1,), 1)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(1, 40), (40, 40), (40, 1)]
    assert sum(p.numel() for p in model.parameters()) == 40 + 40 + 1600 + 40 + 40 + 1
    assert model(torch.randn(10, 1)).shape == (10, 1)


def test_mlp_flattens_images_and_keeps_leading_dims() -> None:
    model = MLP((1, 28, 28), 5, hidden=(32,))
    assert model(torch.randn(7, 1, 28, 28)).shape == (7, 5)
    assert model(torch.randn(3, 7, 1, 28, 28)).shape == (3, 7, 5)
    assert model.features(torch.randn(7, 1, 28, 28)).shape == (7, model.feature_dim)
    assert model.feature_dim == 32


def test_mlp_without_hidden_layers_is_linear() -> None:
    model = MLP((3,), 2, hidden=())
    assert model.feature_dim == 3
    x = torch.randn(4, 3)
    torch.testing.assert_close(model(x), x @ model.head.weight.T + model.head.bias)


@pytest.mark.parametrize(
    ("shape", "out_features", "channels", "feature_dim"),
    [((1, 28, 28), 5, 64, 64), ((3, 84, 84), 5, 32, 32 * 5 * 5), ((1, 16, 16), 3, 4, 4)],
)
def test_conv4_shapes(shape: tuple, out_features: int, channels: int, feature_dim: int) -> None:
    model = Conv4(shape, out_features, channels=channels)
    assert model.feature_dim == feature_dim
    x = torch.randn(6, *shape)
    assert model.features(x).shape == (6, feature_dim)
    assert model(x).shape == (6, out_features)
    torch.testing.assert_close(model(x), model.head(model.features(x)))


def test_conv4_rejects_vector_inputs_with_a_hint() -> None:
    with pytest.raises(ConfigError, match=r"backbone=conv4 needs image inputs .*\(1,\).*mlp"):
        Conv4((1,), 1)


def test_conv4_rejects_images_too_small_for_four_poolings() -> None:
    with pytest.raises(ConfigError, match="at least 16x16"):
        Conv4((1, 8, 8), 5)


def test_mlp_rejects_bad_hidden_sizes() -> None:
    with pytest.raises(ConfigError, match="backbone.hidden"):
        MLP((1,), 1, hidden=(40, 0))


def test_conv4_batch_norm_uses_each_batch_statistics_only() -> None:
    """No running statistics: eval mode equals train mode, and nothing carries over."""
    model = Conv4((1, 28, 28), 5, channels=8)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 4 and all(m.affine and m.running_mean is None for m in norms)
    assert list(model.buffers()) == []
    x = torch.randn(5, 1, 28, 28)
    train_out = model(x)
    model(torch.randn(50, 1, 28, 28) * 10 + 3)  # another "task" in between
    model.eval()
    torch.testing.assert_close(model(x), train_out)
    # Scaling the whole batch is undone by the first normalisation (convs have no bias).
    torch.testing.assert_close(model(x * 3), train_out, rtol=1e-4, atol=1e-4)


def test_conv4_without_batch_norm_keeps_conv_bias() -> None:
    model = Conv4((1, 28, 28), 5, channels=8, batch_norm=False)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 4 and all(m.bias is not None for m in convs)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 5)
