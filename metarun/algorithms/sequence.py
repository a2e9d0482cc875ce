"""What the sequence learners (MANN, SNAIL) share: the embedding, the support order, the loss.

A sequence learner reads a task as a sequence (``metarun.data.sequences``): the support items
in a random order with their labels, then each query with a blank label, and predicts a label at
every position. Nothing is adapted per task, so the meta-loss is one forward pass and
evaluation is the same pass without gradients.

Embedding: the backbone's body (``model.features``), run on each task's support and query images
together in one pass, as the metric learners do (``MetricLearner.episode_embeddings``):
batch-norm statistics come from that one episode (transductive, per task) and never mix tasks.
Labels never enter the body. The sequence model itself sees a query only at that query's own
position, so one query's prediction depends on the support set and itself alone. With
``embedding_norm`` (the default; not in either paper) each embedding is layer-normalised before
the sequence model: conv4's features are non-negative (ReLU, max-pool) and much alike. On
Omniglot 5-way (conv4 at 16 channels, meta-batch 8), MANN trained on 5-shot sequences stayed at
chance for 600 iterations without it and left chance near iteration 300 with it; SNAIL reached
45% 1-shot query accuracy after 300 iterations without it and 69% with it.

Training shape: ``train_shots`` (``None``: ``task.shots``) sets the shots of meta-training
episodes only. A recurrent learner reads a support sequence of any length, and longer ones
teach it faster: with several shots a class comes back within the support sequence, so most
support steps are predictions that memory can answer (MANN's paper trains on 10 instances of
each class per episode).

Support order: drawn from a ``torch.Generator`` the learner holds. Meta-training draws from a
generator seeded once from the global seed (so ``seed`` fixes it) whose state is saved with the
learner's weights (``get_extra_state``), so a resumed run draws the same orders. Evaluation
draws from a fresh generator with a fixed seed on every call, so the same tasks are always read
in the same order and evaluation never moves the training generator.

Loss: cross-entropy at the positions ``support_loss`` picks, the queries always; ``accuracy`` is
over the queries, as every algorithm's is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import MetaAlgorithm, task_scores
from metarun.algorithms.metric import (
    can_fold_tasks,
    check_classification,
    embed_tasks,
    feature_body,
)
from metarun.checks import optional_positive_int
from metarun.data.episodes import TaskBatch
from metarun.data.sequences import EpisodeSequence, episode_sequence
from metarun.errors import ConfigError
from metarun.execution.drivers import WorkerModules
from metarun.execution.executed import run_copy

_SEED_RANGE = 2**62


class SequenceLearner(MetaAlgorithm):
    """A sequence model over ``[body(x_t), label input]``; subclasses implement ``predict``.

    ``ways`` is the backbone's output size (``task.ways``): the size of the label inputs and of
    the logits. ``support_loss`` adds the support positions' predictions to the meta-loss.
    """

    algo_name = "sequence"
    accepts = "a backbone with a feature body and a linear head (conv4, mlp, resnet12)"

    def __init__(
        self,
        model: nn.Module,
        task_type: str,
        support_loss: bool,
        embedding_norm: bool = True,
        train_shots: int | None = None,
    ) -> None:
        check_classification(self.algo_name, task_type)
        super().__init__(task_type)
        feature_body(model, self.algo_name, self.accepts)
        head = getattr(model, "head", None)
        feature_dim = getattr(model, "feature_dim", None)
        if not isinstance(head, nn.Linear) or not isinstance(feature_dim, int):
            raise ConfigError(
                f"algo={self.algo_name} needs {self.accepts} but got {type(model).__name__}; "
                "use backbone=conv4"
            )
        for key, value in (("support_loss", support_loss), ("embedding_norm", embedding_norm)):
            if not isinstance(value, bool):
                raise ConfigError(f"algo.{key} must be true or false, got {value!r}")
        self.model = model
        self.ways = head.out_features
        self.embedding_dim = feature_dim
        self.support_loss = support_loss
        self.train_shots = optional_positive_int(train_shots, "algo.train_shots")
        self.embedding_norm = nn.LayerNorm(feature_dim) if embedding_norm else nn.Identity()
        self.fold = can_fold_tasks(model.features)
        self._executed = WorkerModules()
        # Drawn from the global generator, which `seed` fixes before the algorithm is built.
        self.order_seed = int(torch.randint(_SEED_RANGE, ()).item())
        self._train_orders = torch.Generator().manual_seed(self.order_seed).get_state()

    def training_batches(
        self, dataset: Any, ways: int, shots: int, queries: int, meta_batch_size: int
    ) -> Callable[[torch.Generator], Any]:
        train_shots = self.train_shots or shots
        try:
            sampler = dataset.sampler("train", ways, train_shots, queries)
        except ConfigError as err:
            if self.train_shots is None:
                raise
            raise ConfigError(
                f"{err} (meta-training episodes use algo.train_shots={train_shots})"
            ) from err
        return lambda generator: sampler.sample(meta_batch_size, generator)

    def predict(self, sequence: EpisodeSequence, support: Tensor, query: Tensor) -> Tensor:
        """Logits ``[B, S + Q, N]`` at every position, from the sequence and the embeddings
        ``support [B, S, D]`` (drawn order) and ``query [B, Q, D]``."""
        raise NotImplementedError

    def run_body(self, x: Tensor) -> Tensor:
        """The body's output flattened, computed by the body's executed copy (the same function
        and gradients, faster: ``metarun.execution.executed``)."""
        body = self.model.features
        executed = self._executed.for_module(body, 1)[0]
        return run_copy(executed, body, dict(body.named_parameters()), x).flatten(1)

    def sequence_outputs(self, batch: TaskBatch, generator: torch.Generator,
                         one_order: bool = False) -> tuple[EpisodeSequence, Tensor]:
        sequence = episode_sequence(batch, self.ways, generator, one_order)
        shots = sequence.support_x.shape[1]
        images = torch.cat([sequence.support_x, sequence.query_x], dim=1)
        embedded = self.embedding_norm(embed_tasks(self.run_body, images, self.fold))
        return sequence, self.predict(sequence, embedded[:, :shots], embedded[:, shots:])

    def meta_train_step(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        generator = torch.Generator()
        generator.set_state(self._train_orders)
        sequence, logits = self.sequence_outputs(batch, generator)
        self._train_orders = generator.get_state()
        shots = sequence.support_y.shape[1]
        scores = task_scores(logits[:, shots:], sequence.query_y, self.task_type)
        metrics = {name: value.detach().mean().item() for name, value in scores.items()}
        if not self.support_loss:
            return scores["loss"].mean(), metrics
        # Every position weighs the same, as in MANN's paper (a loss at every time step); the
        # logged `loss` stays the queries' alone, comparable with evaluation's.
        loss = F.cross_entropy(logits.flatten(0, 1), sequence.targets.flatten())
        metrics["sequence_loss"] = loss.detach().item()
        return loss, metrics

    def evaluation_outputs(self, batch: TaskBatch) -> Tensor:
        # One fixed order for every task: a task's predictions depend on the task alone, not on
        # its place in the meta-batch (the super learner draws tasks one at a time).
        generator = torch.Generator().manual_seed(self.order_seed + 1)
        sequence, logits = self.sequence_outputs(batch, generator, one_order=True)
        return logits[:, sequence.support_y.shape[1] :]

    def get_extra_state(self) -> dict[str, Any]:
        return {"order_seed": self.order_seed, "train_orders": self._train_orders.clone()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.order_seed = int(state["order_seed"])
        self._train_orders = state["train_orders"].detach().cpu().clone()
