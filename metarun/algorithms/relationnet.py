"""Relation Networks (Sung, Yang, Zhang, Xiang, Torr & Hospedales, CVPR 2018, arXiv:1711.06025).

Instead of a fixed distance, a small learned network scores each (class, query) pair: the
class's feature map (the sum over its support shots) is concatenated with the query's along the
channels, and the relation module (two conv blocks, then two fully connected layers with a
sigmoid) gives a relation score in (0, 1). Training regresses the scores to the one-hot of the
query's class with a mean squared error (sec. 3.2); the predicted class is the highest score.
The scores are not probabilities (they need not sum to 1); where class probabilities are asked
for (``query_probabilities``, which ``metarun-ensemble`` blends), a query's scores divided by
their sum are used (see ``evaluation_outputs``).

The relation module needs spatial feature maps, so the embedding is the backbone body without
the max-pooling of its last ``unpooled_blocks`` blocks (and without its final flatten). The body
must be a sequence of conv blocks (conv4's ``features``); its own blocks are run (``spatial_body``,
the last ones without their pooling) under the body's parameter names, so no backbone changes and
each task takes the body's parameters like any metric learner. The default, 2, is the paper's
encoder (max-pooling in the first two of four blocks): conv4 gives 64x7x7 maps on 28x28
Omniglot (the paper's unpadded convolutions give 64x5x5) and 64x21x21 on 84x84 (paper: 19x19); 1
gives 64x3x3 on Omniglot. The relation module's poolings round up, so any map size reaches at
least 1x1.

Batch-norm in the relation module keeps no running statistics either and, like the body, is
run once per task (over all of the task's pairs), so statistics never mix tasks. Each task thread
runs its own executed copy of the relation module on that task's own leaves
(``metarun.algorithms.metric``).

Usage::

    relation = RelationNet(Conv4((1, 28, 28), 5), "classification")
    loss, metrics = relation.meta_train_step(batch)
    loss.backward(); optimizer.step()
    scores = relation.relation_scores(batch)  # [B, N*Q, N] in (0, 1)
    probabilities = relation.query_probabilities(batch)  # the scores over their sum per query

or ``metarun algo=relationnet dataset=omniglot``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.metric import MetricLearner, Params, class_sums
from metarun.data.episodes import TaskBatch
from metarun.errors import ConfigError

ACCEPTS = "a convolutional backbone (conv4)"


def _relation_block(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=False),
        nn.ReLU(),
        nn.MaxPool2d(2, ceil_mode=True),
    )


class RelationModule(nn.Module):
    """Scores concatenated ``[2C, H, W]`` pair maps: two conv blocks, FC, ReLU, FC, sigmoid."""

    def __init__(
        self, in_channels: int, map_size: Sequence[int], channels: int, hidden: int
    ) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            _relation_block(in_channels, channels), _relation_block(channels, channels)
        )
        height, width = map_size
        for _ in range(2):
            height, width = -(-height // 2), -(-width // 2)
        self.fc = nn.Sequential(
            nn.Flatten(), nn.Linear(channels * height * width, hidden), nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, pairs: Tensor) -> Tensor:
        return torch.sigmoid(self.fc(self.blocks(pairs))).squeeze(-1)


def conv_blocks(body: nn.Module) -> list[nn.Sequential] | None:
    """The body's conv blocks (each ending in a max-pool), or ``None`` if it is not made of them.

    A trailing ``nn.Flatten`` (conv4's) is left out: the relation module wants the map.
    """
    if not isinstance(body, nn.Sequential):
        return None
    blocks = list(body)
    while blocks and isinstance(blocks[-1], nn.Flatten):
        blocks.pop()

    def is_conv_block(block: nn.Module) -> bool:
        return (
            isinstance(block, nn.Sequential)
            and len(block) > 1
            and isinstance(block[-1], nn.MaxPool2d)
            and any(isinstance(m, nn.Conv2d) for m in block)
        )

    return blocks if blocks and all(is_conv_block(b) for b in blocks) else None


def spatial_body(
    body: nn.Sequential, blocks: list[nn.Sequential], unpooled_blocks: int
) -> nn.Sequential:
    """The body's blocks without the max-pool of the last ``unpooled_blocks`` (and without a
    trailing flatten), under the body's own names, so it takes the body's parameters by name.

    It holds the body's own layers: nothing is copied, and it is not registered anywhere (the
    layers are saved with the backbone).
    """
    names = list(body._modules)[: len(blocks)]
    spatial = OrderedDict()
    for index, (name, block) in enumerate(zip(names, blocks, strict=True)):
        keep_pool = index < len(blocks) - unpooled_blocks
        spatial[name] = block if keep_pool else nn.Sequential(*list(block)[:-1])
    return nn.Sequential(spatial)


class RelationNet(MetricLearner):
    """A learned relation module scores (class, query) pairs of spatial feature maps.

    Accepts conv4 (a body of conv blocks with max-pooling); an MLP has no spatial map.
    ``relation_channels`` and ``relation_hidden`` (64 and 8 in the paper) size the module.
    """

    algo_name = "relationnet"
    accepts = ACCEPTS

    def __init__(
        self,
        model: nn.Module,
        task_type: str,
        unpooled_blocks: int = 2,
        relation_channels: int = 64,
        relation_hidden: int = 8,
        train_ways: int | None = None,
        train_shots: int | None = None,
        train_queries: int | None = None,
    ) -> None:
        super().__init__(model, task_type, train_ways, train_shots, train_queries)
        for key, value, minimum in (
            ("algo.unpooled_blocks", unpooled_blocks, 0),
            ("algo.relation_channels", relation_channels, 1),
            ("algo.relation_hidden", relation_hidden, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
        blocks = conv_blocks(self.body)
        input_shape = getattr(model, "input_shape", None)
        if blocks is None or input_shape is None or len(input_shape) != 3:
            raise ConfigError(
                f"algo=relationnet needs {ACCEPTS} but got {type(model).__name__}; "
                f"use backbone=conv4"
            )
        if unpooled_blocks > len(blocks):
            raise ConfigError(
                f"algo.unpooled_blocks={unpooled_blocks} but the backbone has only "
                f"{len(blocks)} blocks; lower it"
            )
        # Not a registered submodule: its layers belong to (and are saved with) the backbone.
        object.__setattr__(self, "_spatial", spatial_body(self.body, blocks, unpooled_blocks))
        parameter = next(model.parameters())
        with torch.no_grad():
            probe = torch.zeros(2, *input_shape, dtype=parameter.dtype, device=parameter.device)
            channels, *map_size = self._spatial(probe).shape[1:]
        self.relation = RelationModule(2 * channels, map_size, relation_channels, relation_hidden)

    def task_modules(self) -> dict[str, tuple[str, nn.Module]]:
        return {
            "body": ("model.features.", self._spatial),
            "relation": ("relation.", self.relation),
        }

    def embed_with(self, meta: Params, x: Tensor) -> Tensor:
        """Spatial feature maps ``[M, C, H, W]``: the body without its last pooling(s)."""
        return self.run_module("body", meta, x)

    def compare(
        self, meta: Params, support: Tensor, support_y: Tensor, query: Tensor, ways: int,
        dtype: torch.dtype,
    ) -> Tensor:
        """Relation scores ``[N*Q, N]`` of every (query, class) pair, the relation module run
        once over all of the task's pairs."""
        classes = class_sums(support[None], support_y[None], ways)[0]  # [N, C, H, W]
        queries = query.shape[0]
        pairs = torch.cat(
            [
                classes.unsqueeze(0).expand(queries, *classes.shape),
                query.unsqueeze(1).expand(queries, ways, *query.shape[1:]),
            ],
            dim=2,
        )  # [Q, N, 2C, H, W]
        return self.run_module("relation", meta, pairs.flatten(0, 1)).reshape(queries, ways)

    def relation_scores(self, batch: TaskBatch) -> Tensor:
        """``[B, N*Q, N]`` relation scores in (0, 1) between each query and each class."""
        return self.query_outputs(batch)

    def evaluation_outputs(self, batch: TaskBatch) -> Tensor:
        """The log of the relation scores, in float64: a softmax of them is each query's scores
        divided by their sum (what ``query_probabilities`` gives).

        Normalised scores rather than a softmax over the scores themselves: scores in (0, 1)
        would give a softmax at most e / (e + N - 1) for the best class (40% at 5 ways) however
        sure the relation module is. The log is taken in float64, where distinct float32 scores
        stay distinct and equal ones equal, so the argmax is the one ``evaluate`` scores; the
        floor stands in for a score that underflowed to 0 (below every positive float32).
        """
        scores = self.outputs_on_task_threads(batch).double()
        return scores.clamp_min(torch.finfo(torch.float64).tiny).log()

    def evaluate(self, batch: TaskBatch) -> dict[str, Tensor]:
        # The paper's loss, the MSE of the scores, is what evaluation reports (cross-entropy of
        # the normalised scores would be another number); the accuracy is the scores' argmax,
        # the same as evaluation_outputs'.
        with torch.no_grad():
            scores = self.scores(self.outputs_on_task_threads(batch), batch.query_y)
        return {name: value.detach() for name, value in scores.items()}

    def scores(self, outputs: Tensor, query_y: Tensor) -> dict[str, Tensor]:
        """Per-task MSE to the one-hot targets (the paper's loss) and accuracy from the scores."""
        one_hot = F.one_hot(query_y, outputs.shape[-1]).to(outputs.dtype)
        loss = (outputs - one_hot).pow(2).mean(dim=(1, 2))
        accuracy = (outputs.argmax(-1) == query_y).to(outputs.dtype).mean(1)
        return {"loss": loss, "accuracy": accuracy}
