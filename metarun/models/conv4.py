"""The four-block convolutional backbone of the few-shot literature (Vinyals et al. 2016,
Finn et al. 2017): [conv3x3 -> batch-norm -> ReLU -> max-pool 2] x 4, then a linear head.

Batch-norm uses ``track_running_stats=False``: every forward pass normalises with the statistics
of the batch it is given, in training and in evaluation alike. Under meta-learning one forward
pass sees one task's support (or query) set, so the statistics are per-task and transductive
(the query set is normalised with its own statistics), exactly as in the MAML reference code, and
nothing is carried from one task to the next: no running averages exist to leak through.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from metarun.checks import image_shape, positive_int
from metarun.errors import ConfigError

_BLOCKS = 4


def _block(in_channels: int, out_channels: int, batch_norm: bool) -> nn.Sequential:
    # A conv bias in front of batch-norm is cancelled by the mean subtraction: only keep it
    # when there is no batch-norm.
    layers: list[nn.Module] = [
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=not batch_norm)
    ]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_channels, affine=True, track_running_stats=False))
    layers += [nn.ReLU(), nn.MaxPool2d(2)]
    return nn.Sequential(*layers)


class Conv4(nn.Module):
    """Image backbone for inputs ``[N, C, H, W]``: ``features`` (the body), then ``head``.

    ``features`` and ``head`` are separate submodules so that ANIL (head-only adaptation) and
    ProtoNet (embedding only) can use the body alone; ``feature_dim`` is its output size.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        out_features: int,
        channels: int = 64,
        batch_norm: bool = True,
    ) -> None:
        super().__init__()
        self.input_shape = image_shape(input_shape, "conv4")
        in_channels, height, width = self.input_shape
        out_features = positive_int(out_features, "backbone.out_features")
        channels = positive_int(channels, "backbone.channels")
        if not isinstance(batch_norm, bool):
            raise ConfigError(f"backbone.batch_norm must be true or false, got {batch_norm!r}")
        for _ in range(_BLOCKS):
            height, width = height // 2, width // 2
        if height < 1 or width < 1:
            raise ConfigError(
                f"backbone=conv4 halves the image {_BLOCKS} times and needs at least 16x16 "
                f"pixels, but the dataset gives {self.input_shape[1]}x{self.input_shape[2]}; use "
                "larger images"
            )

        blocks = [_block(in_channels, channels, batch_norm)]
        blocks += [_block(channels, channels, batch_norm) for _ in range(_BLOCKS - 1)]
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.feature_dim = channels * height * width
        self.head = nn.Linear(self.feature_dim, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
