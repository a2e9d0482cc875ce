"""A fully connected backbone: the MAML paper's sinusoid net (1-40-40-1, ReLU) by default."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from metarun.checks import positive_int, positive_ints
from metarun.errors import ConfigError


class _FlattenTrailing(nn.Module):
    """Flattens only the example's own dims, so any leading batch dims survive.

    ``nn.Flatten(start_dim=1)`` would also merge a leading task dim into the features.
    """

    def __init__(self, example_dims: int) -> None:
        super().__init__()
        self.example_dims = example_dims

    def forward(self, x: Tensor) -> Tensor:
        return x.flatten(start_dim=x.dim() - self.example_dims)


class MLP(nn.Module):
    """Linear+ReLU per hidden layer, then a linear head; inputs of any shape are flattened.

    ``features`` (everything before the head) and ``head`` are separate submodules so that
    algorithms that adapt only the head (ANIL) or use only the embedding (ProtoNet) can reach
    them; ``feature_dim`` is the embedding size.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        out_features: int,
        hidden: Sequence[int] = (40, 40),
    ) -> None:
        super().__init__()
        self.input_shape = positive_ints(input_shape, "backbone.input_shape")
        if not self.input_shape:
            raise ConfigError("backbone.input_shape must not be empty")
        out_features = positive_int(out_features, "backbone.out_features")
        hidden = positive_ints(hidden, "backbone.hidden")

        in_features = 1
        for size in self.input_shape:
            in_features *= size
        layers: list[nn.Module] = [_FlattenTrailing(len(self.input_shape))]
        for width in hidden:
            layers += [nn.Linear(in_features, width), nn.ReLU()]
            in_features = width
        self.features = nn.Sequential(*layers)
        self.feature_dim = in_features
        self.head = nn.Linear(in_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
