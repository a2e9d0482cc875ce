"""ResNet-12: shapes on Omniglot and mini-ImageNet sizes, the standard widths, residual stages,
batch-norm without memory, gradients everywhere, and config errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metarun.errors import ConfigError
from metarun.models.resnet12 import ResidualStage, ResNet12

SMALL = (4, 6, 8, 10)


@pytest.mark.parametrize(
    ("shape", "channels", "feature_dim"),
    [
        ((1, 28, 28), SMALL, 10),
        ((3, 84, 84), SMALL, 10),
        ((1, 28, 28), (64, 160, 320, 640), 640),
        ((3, 84, 84), (64, 160, 320, 640), 640),
    ],
)
def test_shapes(shape, channels, feature_dim):
    torch.manual_seed(0)
    model = ResNet12(shape, 5, channels=channels)
    x = torch.rand(2, *shape)
    assert model.feature_dim == feature_dim
    assert model.features(x).shape == (2, feature_dim)
    assert model(x).shape == (2, 5)
    assert model.head.in_features == feature_dim and model.head.out_features == 5


def test_default_is_the_standard_64_160_320_640_network():
    model = ResNet12((3, 84, 84), 5)
    assert model.feature_dim == 640
    stages = [m for m in model.modules() if isinstance(m, ResidualStage)]
    assert len(stages) == 4
    for stage, width in zip(stages, (64, 160, 320, 640), strict=True):
        convs = [m for m in stage.body if isinstance(m, nn.Conv2d)]
        assert [c.kernel_size for c in convs] == [(3, 3)] * 3
        assert all(c.out_channels == width and c.bias is None for c in convs)
        assert stage.shortcut[0].kernel_size == (1, 1) and stage.shortcut[0].out_channels == width
        slopes = [m.negative_slope for m in stage.modules() if isinstance(m, nn.LeakyReLU)]
        assert slopes == [0.1] * 3
    # About 12.4M parameters, as reported for this network (MetaOptNet, without DropBlock).
    parameters = sum(p.numel() for p in model.features.parameters())
    assert 12.3e6 < parameters < 12.5e6


def test_stage_adds_the_shortcut_before_the_last_activation_and_pools():
    torch.manual_seed(0)
    stage = ResidualStage(2, 3).double()
    x = torch.randn(4, 2, 8, 8, dtype=torch.float64)
    expected = nn.functional.max_pool2d(
        nn.functional.leaky_relu(stage.body(x) + stage.shortcut(x), 0.1), 2
    )
    torch.testing.assert_close(stage(x), expected)
    assert stage(x).shape == (4, 3, 4, 4)
    with torch.no_grad():  # with the main path silenced, only the shortcut remains
        stage.body[-1].weight.zero_()
        stage.body[-1].bias.zero_()
    shortcut_only = nn.functional.max_pool2d(nn.functional.leaky_relu(stage.shortcut(x), 0.1), 2)
    torch.testing.assert_close(stage(x), shortcut_only)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    model = ResNet12((1, 28, 28), 5, channels=SMALL)
    x = torch.rand(6, 1, 28, 28)
    nn.functional.cross_entropy(model(x), torch.arange(6) % 5).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_batch_norm_keeps_no_running_statistics():
    torch.manual_seed(0)
    model = ResNet12((1, 28, 28), 5, channels=SMALL)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 16 and all(m.affine and m.running_mean is None for m in norms)
    assert list(model.buffers()) == []
    x = torch.rand(5, 1, 28, 28)
    train_out = model(x)
    model(torch.randn(30, 1, 28, 28) * 10 + 3)  # another "task" in between
    model.eval()
    torch.testing.assert_close(model(x), train_out)


def test_vector_inputs_are_refused_with_a_hint():
    with pytest.raises(ConfigError, match=r"resnet12 needs image inputs .*use backbone=mlp"):
        ResNet12((1,), 1)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"input_shape": (1, 12, 12)}, "needs at least 16x16"),
        ({"channels": (8, 8, 8)}, "backbone.channels must list 4"),
        ({"channels": (8, 0, 8, 8)}, "backbone.channels"),
        ({"out_features": 0}, "backbone.out_features"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    settings = {"input_shape": (1, 28, 28), "out_features": 5, "channels": SMALL, **kwargs}
    with pytest.raises(ConfigError, match=message):
        ResNet12(**settings)
