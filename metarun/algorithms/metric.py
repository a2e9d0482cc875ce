"""What the metric-based meta-learners share: per-task embedding, class prototypes, checks.

Prototypical Networks, Matching Networks and Relation Networks learn an embedding and classify a
query by comparing it with the support set; none adapts any weights per task. So the meta-loss is
an ordinary forward pass through the backbone's body (``model.features``) and a comparison, and
evaluation (``evaluation_outputs``, which ``evaluate`` and ``query_probabilities`` build on) is
the same pass without gradients.

Batch-norm: the backbones keep no running statistics, so one forward pass normalises with the
statistics of what it is given. ``embed_episode`` embeds each task's support and query images
together, in one pass per task: statistics come from that one episode only (transductive over the
episode, like the Prototypical Networks reference code in training mode) and never mix tasks.
How the tasks are driven was measured on the CPU for conv4 (docs/PERFORMANCE.md, "Measurements
behind the code's choices", "Metric learners"): a Python loop over tasks beat both
``torch.func.vmap`` and folding the tasks into one batch (exact for batch-norm only by reshaping
each batch-norm's input): convolutions ran fastest on batches of about one episode. Folding won
only for a small fully connected body, and is exact there (no batch-norm), so those fold and
conv nets loop. On a GPU one big batch probably wins; not yet measured.

Usage::

    support, query = embed_episode(model.features, batch)  # [B, N*K, D], [B, N*Q, D]
    prototypes = class_means(support, batch.support_y, num_ways(batch))  # [B, N, D]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import CLASSIFICATION, TASK_TYPES, MetaAlgorithm, task_scores
from metarun.checks import optional_positive_int
from metarun.data.episodes import TaskBatch
from metarun.errors import ConfigError
from metarun.execution.drivers import WorkerModules
from metarun.execution.executed import run_copy
from metarun.execution.layout import cpu_fast_layout

Embed = Callable[[Tensor], Tensor]

_MIXES_EXAMPLES = (nn.modules.batchnorm._BatchNorm,)
_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def check_classification(algo: str, task_type: str) -> None:
    """Metric learners compare a query with labelled classes: regression has none."""
    if task_type not in TASK_TYPES:
        raise ConfigError(f"algo.task_type must be one of {TASK_TYPES}, got {task_type!r}")
    if task_type != CLASSIFICATION:
        raise ConfigError(
            f"algo={algo} needs a classification dataset but got a {task_type} dataset; "
            f"use a classification dataset (e.g. dataset=omniglot) or algo=maml"
        )


def feature_body(model: object, algo: str, accepts: str) -> nn.Module:
    """The backbone's body (``model.features``); a backbone without one cannot embed."""
    body = getattr(model, "features", None)
    if not isinstance(model, nn.Module) or not isinstance(body, nn.Module):
        raise ConfigError(
            f"algo={algo} needs {accepts} but got {type(model).__name__}; use backbone=conv4"
        )
    return body


def can_fold_tasks(body: nn.Module) -> bool:
    """Folding tasks into one batch is exact without batch-norm, and faster (CPU) without convs."""
    return not any(isinstance(m, _MIXES_EXAMPLES + _CONVOLUTIONS) for m in body.modules())


def embed_tasks(embed: Embed, x: Tensor, fold: bool = False) -> Tensor:
    """``[B, M, ...]`` inputs to ``[B, M, ...]`` embeddings, one forward pass per task.

    ``fold=True`` runs all tasks as one batch: only for bodies where ``can_fold_tasks``.
    """
    if fold:
        return embed(x.flatten(0, 1)).unflatten(0, x.shape[:2])
    return torch.stack([embed(cpu_fast_layout(task_x)) for task_x in x])


def embed_episode(embed: Embed, batch: TaskBatch, fold: bool = False) -> tuple[Tensor, Tensor]:
    """Support and query embeddings of each task, from one pass over the whole episode."""
    shots = batch.support_x.shape[1]
    both = embed_tasks(embed, torch.cat([batch.support_x, batch.query_x], dim=1), fold)
    return both[:, :shots], both[:, shots:]


def num_ways(batch: TaskBatch) -> int:
    """N, from the labels (0..N-1 in every task): samplers do not send the shape along."""
    return int(batch.support_y.max().item()) + 1


def class_sums(embeddings: Tensor, labels: Tensor, ways: int) -> Tensor:
    """Per-class sums ``[B, N, ...]`` of ``embeddings [B, S, ...]``; any label order."""
    one_hot = F.one_hot(labels, ways).to(embeddings.dtype)  # [B, S, N]
    sums = one_hot.transpose(1, 2) @ embeddings.flatten(2)  # [B, N, D]
    return sums.unflatten(2, embeddings.shape[2:])


def class_means(embeddings: Tensor, labels: Tensor, ways: int) -> Tensor:
    """Class prototypes ``[B, N, ...]``: the mean embedding of each class's support examples."""
    counts = F.one_hot(labels, ways).sum(1).to(embeddings.dtype)  # [B, N]
    sums = class_sums(embeddings, labels, ways)
    return sums / counts.reshape(*counts.shape, *([1] * (sums.dim() - 2)))


class MetricLearner(MetaAlgorithm):
    """A learned embedding compared with the support set; no per-task adaptation.

    Subclasses set ``algo_name`` and ``accepts`` (for messages) and implement
    ``query_outputs``. ``train_ways``, ``train_shots`` and ``train_queries`` (``None``: the
    run's ``task.*``) shape the meta-training episodes only: Prototypical Networks train with
    more ways than they are tested on. Evaluation always uses ``task.*``.
    """

    algo_name = "metric"
    #: The backbones the algorithm works with, as its error message says it.
    accepts = "a backbone with a feature body (conv4, mlp)"

    def __init__(
        self,
        model: nn.Module,
        task_type: str,
        train_ways: int | None = None,
        train_shots: int | None = None,
        train_queries: int | None = None,
    ) -> None:
        check_classification(self.algo_name, task_type)
        super().__init__(task_type)
        feature_body(model, self.algo_name, self.accepts)
        self.model = model
        self._executed = WorkerModules()
        self.train_ways = optional_positive_int(train_ways, "algo.train_ways")
        self.train_shots = optional_positive_int(train_shots, "algo.train_shots")
        self.train_queries = optional_positive_int(train_queries, "algo.train_queries")
        if self.train_ways == 1:
            raise ConfigError("algo.train_ways=1 leaves nothing to tell apart; use 2 or more")

    @property
    def body(self) -> nn.Module:
        """The embedding: the backbone's body (kept under ``model`` only, so saved once)."""
        return self.model.features

    def run_body(self, x: Tensor) -> Tensor:
        """``self.body(x)``, computed by the body's executed copy with the body's own parameters
        and buffers: the same outputs and gradients, faster (``metarun.execution.executed``)."""
        executed = self._executed.for_module(self.body, 1)[0]
        return run_copy(executed, self.body, dict(self.body.named_parameters()), x)

    def training_batches(
        self, dataset: Any, ways: int, shots: int, queries: int, meta_batch_size: int
    ) -> Callable[[torch.Generator], Any]:
        shape = {
            "ways": self.train_ways or ways,
            "shots": self.train_shots or shots,
            "queries": self.train_queries or queries,
        }
        available = dataset.num_classes("train")
        if self.train_ways is not None and available is not None and self.train_ways > available:
            raise ConfigError(
                f"algo.train_ways={self.train_ways} but the dataset's train split has only "
                f"{available} classes; lower algo.train_ways"
            )
        try:
            sampler = dataset.sampler("train", shape["ways"], shape["shots"], shape["queries"])
        except ConfigError as err:
            if (self.train_ways, self.train_shots, self.train_queries) == (None, None, None):
                raise
            chosen = ", ".join(f"algo.train_{key}={value}" for key, value in shape.items())
            raise ConfigError(f"{err} (meta-training episodes use {chosen})") from err
        return lambda generator: sampler.sample(meta_batch_size, generator)

    def query_outputs(self, batch: TaskBatch) -> Tensor:
        """Per-class outputs ``[B, N*Q, N]`` for each query; ``scores`` turns them into metrics."""
        raise NotImplementedError

    def scores(self, outputs: Tensor, query_y: Tensor) -> dict[str, Tensor]:
        """Per-task ``loss`` and ``accuracy`` ``[B]``; cross-entropy of ``outputs`` as logits."""
        return task_scores(outputs, query_y, self.task_type)

    def meta_train_step(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        scores = self.scores(self.query_outputs(batch), batch.query_y)
        loss = scores["loss"].mean()
        metrics = {name: value.detach().mean().item() for name, value in scores.items()}
        return loss, metrics

    def evaluation_outputs(self, batch: TaskBatch) -> Tensor:
        """The training pass's outputs (nothing is adapted per task); the base class's
        ``evaluate`` runs it without a graph and scores it as logits."""
        return self.query_outputs(batch)
