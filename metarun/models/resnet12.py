"""ResNet-12, the standard deeper backbone of few-shot image classification (TADAM, Oreshkin et
al. 2018; MetaOptNet, Lee et al. 2019; used for mini-ImageNet in most work since).

Four residual stages of widths 64-160-320-640. A stage is three conv3x3 -> batch-norm ->
LeakyReLU(0.1) (the last activation after the residual sum), a 1x1-conv + batch-norm shortcut
and a 2x2 max-pool; global average pooling then gives a ``channels[-1]`` feature vector whatever
the image size (28x28 Omniglot: 28 -> 14 -> 7 -> 3 -> 1; 84x84: 84 -> 42 -> 21 -> 10 -> 5).
DropBlock and dropout, which the mini-ImageNet papers add against over-fitting, are left out.

Batch-norm keeps no running statistics (``track_running_stats=False``), as in ``conv4``: every
forward pass normalises with its own batch, so under MAML each task's support or query set is
normalised by itself and nothing passes between tasks.

Usage::

    net = ResNet12((3, 84, 84), out_features=5)            # net.feature_dim == 640
    net = ResNet12((1, 28, 28), 5, channels=(16, 32, 32, 64))  # small, for CPU runs
    embedding = net.features(images)                         # [n, 640]
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from metarun.checks import image_shape, positive_int, positive_ints
from metarun.errors import ConfigError

STAGES = 4
LEAKY_SLOPE = 0.1


def _conv_bn(in_channels: int, out_channels: int, kernel_size: int) -> list[nn.Module]:
    # No conv bias: batch-norm's mean subtraction cancels it.
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels, affine=True, track_running_stats=False),
    ]


class ResidualStage(nn.Module):
    """Three conv3x3-BN layers plus a 1x1-conv-BN shortcut, LeakyReLU, then a 2x2 max-pool."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            *_conv_bn(in_channels, out_channels, 3),
            nn.LeakyReLU(LEAKY_SLOPE),
            *_conv_bn(out_channels, out_channels, 3),
            nn.LeakyReLU(LEAKY_SLOPE),
            *_conv_bn(out_channels, out_channels, 3),
        )
        self.shortcut = nn.Sequential(*_conv_bn(in_channels, out_channels, 1))
        self.activation = nn.LeakyReLU(LEAKY_SLOPE)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.activation(self.body(x) + self.shortcut(x)))


class ResNet12(nn.Module):
    """Image backbone for inputs ``[N, C, H, W]``: ``features`` (the body, ending in a flat
    ``[N, feature_dim]`` vector), then ``head``; separate so that algorithms can use the body alone
    (Baseline, ProtoNet) or adapt only the head (ANIL)."""

    def __init__(
        self,
        input_shape: Sequence[int],
        out_features: int,
        channels: Sequence[int] = (64, 160, 320, 640),
    ) -> None:
        super().__init__()
        in_channels, height, width = image_shape(input_shape, "resnet12")
        out_features = positive_int(out_features, "backbone.out_features")
        widths = positive_ints(channels, "backbone.channels")
        if len(widths) != STAGES:
            raise ConfigError(
                f"backbone.channels must list {STAGES} stage widths (e.g. [64, 160, 320, 640]), "
                f"got {list(widths)}"
            )
        if min(height, width) < 2**STAGES:
            raise ConfigError(
                f"backbone=resnet12 halves the image {STAGES} times and needs at least 16x16 "
                f"pixels, but the dataset gives {height}x{width}; use larger images"
            )

        self.input_shape = (in_channels, height, width)
        stages = []
        for width_in, width_out in zip((in_channels, *widths[:-1]), widths, strict=True):
            stages.append(ResidualStage(width_in, width_out))
        self.features = nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.feature_dim = widths[-1]
        self.head = nn.Linear(self.feature_dim, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
