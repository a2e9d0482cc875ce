"""The interface every meta-learning algorithm implements; the trainer knows nothing else."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.data.episodes import TaskBatch
from metarun.errors import ConfigError

CLASSIFICATION = "classification"
REGRESSION = "regression"
TASK_TYPES = (CLASSIFICATION, REGRESSION)


class MetaAlgorithm(nn.Module):
    """An ``nn.Module`` holding the meta-parameters.

    ``meta_train_step`` returns the meta-loss (the trainer calls backward and the optimizer step)
    and scalar metrics for logging. ``evaluate`` adapts on each task's support set and scores its
    query set, returning one value per task (shape ``[B]``) for every metric so the trainer can
    report a mean and a confidence interval over episodes. Evaluation never leaves gradients on
    the meta-parameters.

    Metric names: ``loss`` always; ``accuracy`` (a fraction in [0, 1]) for classification,
    ``mse`` for regression.
    """

    #: CLASSIFICATION or REGRESSION: decides the loss, the metrics and which way "best" points.
    task_type: str
    #: The meta-gradient's global norm is clipped to this before each optimizer step (None: never).
    #: The trainer clips, after the gradients of every process are summed and an fp16 loss scale
    #: is taken off, so the clipped gradient is the whole meta-batch's (see
    #: ``metarun.trainer.clip_meta_gradient``); an algorithm only declares the bound.
    meta_grad_clip: float | None = None

    def __init__(self, task_type: str) -> None:
        super().__init__()
        if task_type not in TASK_TYPES:
            raise ConfigError(f"task_type must be one of {TASK_TYPES}, got {task_type!r}")
        self.task_type = task_type

    def training_batches(
        self, dataset: Any, ways: int, shots: int, queries: int, meta_batch_size: int
    ) -> Callable[[torch.Generator], Any]:
        """What meta-training feeds ``meta_train_step``: a draw from a generator.

        By default, meta-batches of episodes of the task shape the run is evaluated on. An
        algorithm that trains on another shape (Prototypical Networks' higher training way) or on
        ordinary mini-batches (the pre-train + fine-tune baseline) overrides this; it is called
        once, before the optimizer is built, so it may also create parameters that depend on the
        data (e.g. a classifier over all meta-train classes). Whatever it returns must have
        ``.to(device)``.
        """
        sampler = dataset.sampler("train", ways, shots, queries)
        return lambda generator: sampler.sample(meta_batch_size, generator)

    @property
    def primary_metric(self) -> str:
        return "accuracy" if self.task_type == CLASSIFICATION else "mse"

    @property
    def higher_is_better(self) -> bool:
        return self.task_type == CLASSIFICATION

    def meta_train_step(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def evaluate(self, batch: TaskBatch) -> dict[str, Tensor]:
        """Per-task metrics of the query predictions after adapting on each support set."""
        with torch.no_grad():
            outputs = self.evaluation_outputs(batch)
        scores = task_scores(outputs.detach(), batch.query_y, self.task_type)
        return {name: value.detach() for name, value in scores.items()}

    def evaluation_outputs(self, batch: TaskBatch) -> Tensor:
        """What evaluation predicts for every query, ``[B, N*Q, C]``: class logits (any scale a
        softmax turns into probabilities) for classification, ``[B, N*Q, 1]`` for regression.
        Adapts on each task's support set as ``evaluate`` does; never leaves gradients on the
        meta-parameters. Called under ``torch.no_grad()`` by ``evaluate``: an algorithm whose
        adaptation needs gradients enables them inside (as MAML's inner loop does)."""
        raise NotImplementedError

    def query_probabilities(self, batch: TaskBatch) -> Tensor:
        """Per-query class probabilities ``[B, N*Q, N]`` on evaluation tasks (what a super
        learner blends across runs)."""
        if self.task_type != CLASSIFICATION:
            raise ConfigError("class probabilities exist for classification tasks only")
        with torch.no_grad():
            outputs = self.evaluation_outputs(batch)
        return torch.softmax(outputs.detach().double(), dim=-1)


def task_loss(outputs: Tensor, targets: Tensor, task_type: str) -> Tensor:
    """Mean loss of one task's (or a flat batch's) predictions: cross-entropy or MSE.

    ``outputs`` is ``[..., C]`` logits for classification, ``[..., 1]`` for regression.
    """
    if task_type == CLASSIFICATION:
        return F.cross_entropy(outputs.reshape(-1, outputs.shape[-1]), targets.reshape(-1))
    return F.mse_loss(outputs.squeeze(-1), targets)


def task_scores(outputs: Tensor, targets: Tensor, task_type: str) -> dict[str, Tensor]:
    """Per-task metrics from ``outputs [B, M, C]`` and ``targets [B, M]``: each value is ``[B]``."""
    if task_type == CLASSIFICATION:
        losses = F.cross_entropy(outputs.transpose(1, 2), targets, reduction="none").mean(1)
        accuracy = (outputs.argmax(-1) == targets).float().mean(1)
        return {"loss": losses, "accuracy": accuracy}
    mse = (outputs.squeeze(-1) - targets).pow(2).mean(1)
    return {"loss": mse, "mse": mse}
