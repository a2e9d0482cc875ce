"""Baseline and Baseline++: pre-train, then adapt (Chen et al., "A Closer Look at Few-shot
Classification", ICLR 2019, arXiv:1904.04232).

No episodes in training: the backbone's body and a classifier over ALL meta-train classes are
trained on ordinary labelled mini-batches with cross-entropy. At test time the body is frozen and,
for every task, a NEW N-way head is fitted on the support embeddings and scores the query. The
paper's point is that this simple transfer recipe is a strong reference for meta-learning.

- Baseline: linear heads (``classifier: linear``).
- Baseline++: cosine-similarity heads, ``scale * cos(w_c, f)`` (``classifier: cosine``), which
  the paper finds reduces intra-class variation. The paper's code lets each class weight's norm
  learn (weight norm); here the heads are pure cosine with one fixed ``scale`` for pre-training
  and test, so the logits are bounded and the head's fit does not depend on weight norms.

Batch-norm at test time: the paper embeds in eval mode with running statistics gathered in
pre-training. The backbones here keep none (``track_running_stats=False``, so that MAML's
per-task statistics hold), so every forward pass normalises with the batch it is given, and the
body is only ever given images of ONE task: no statistics mix between tasks (a meta-batch of one
or of 50 gives the same numbers). ``test_embedding`` picks the batches: ``separate`` (default)
embeds a task's support set and its query set in two passes, each normalised by itself, as
MAML does here; ``joint`` embeds them in one pass, so both share statistics from N*(K+Q) images.
Both are transductive within a task. ``separate`` was measured better: 79.2% vs 77.9% (Baseline)
and 75.2% vs 74.5% (Baseline++), 5-way 1-shot, 600 paired tasks, 95% CI of the difference
+-0.3 points, after 400 pre-training iterations of conv4 (16 channels) on Omniglot's lake split.

Head fitting: all B heads of a meta-batch are one ``[B, N, D]`` tensor, trained together with
full-batch SGD with momentum on the sum of the per-task support losses (batched matrix
products, no loop over tasks; each task's gradient reaches only its own head). Full batch rather
than the paper's mini-batches of 4 keeps evaluation deterministic; every head starts from the
same fixed-seed draw of ``nn.Linear``'s initial range, so a task's result does not depend on its
meta-batch. The gradients are ``torch.func.grad``s of the head alone, on detached embeddings:
nothing reaches the body and no ``.grad`` is left, even under a caller's ``no_grad``.

Usage::

    algo = Baseline(Conv4((1, 28, 28), 5), "classification", classifier="cosine")
    draw = algo.training_batches(omniglot, ways=5, shots=1, queries=15, meta_batch_size=32)
    loss, metrics = algo.meta_train_step(draw(generator))  # the all-class classifier's loss
    loss.backward(); optimizer.step()
    per_task = algo.evaluate(episodes)  # {"loss": [B], "accuracy": [B]}
    probabilities = algo.query_probabilities(episodes)  # [B, N*Q, N] from the fitted heads
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad

from metarun.algorithms.base import CLASSIFICATION, MetaAlgorithm
from metarun.checks import positive_int, positive_number
from metarun.data.episodes import LabeledBatch, TaskBatch
from metarun.errors import ConfigError

CLASSIFIERS = {"linear": "baseline", "cosine": "baselinepp"}
TEST_EMBEDDINGS = ("separate", "joint")
#: Seed of the test-time heads' initial weights: the same start for every task and every run.
HEAD_INIT_SEED = 0
_EPS = 1e-8

Head = dict[str, Tensor]


def cosine_logits(features: Tensor, weight: Tensor, scale: float) -> Tensor:
    """``scale * cos(w_c, f)``: ``features [..., M, D]`` against ``weight [..., C, D]``."""
    unit_features = F.normalize(features, dim=-1, eps=_EPS)
    unit_weight = F.normalize(weight, dim=-1, eps=_EPS)
    return scale * unit_features @ unit_weight.transpose(-1, -2)


class CosineClassifier(nn.Module):
    """Baseline++'s pre-training classifier: one weight vector per class, no bias."""

    def __init__(self, in_features: int, num_classes: int, scale: float) -> None:
        super().__init__()
        self.scale = scale
        self.weight = nn.Parameter(torch.empty(num_classes, in_features))
        bound = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, features: Tensor) -> Tensor:
        return cosine_logits(features, self.weight, self.scale)


class Baseline(MetaAlgorithm):
    """Pre-trains ``model.features`` with a classifier over all meta-train classes; evaluates by
    fitting a new head per task on the frozen body's support embeddings.

    Accepts any backbone with ``.features`` (the body, ``[n, ...] -> [n, D]``) and
    ``.feature_dim`` (``D``): conv4, resnet12 and mlp. The backbone's own ``.head`` is unused.
    Classification only.
    """

    def __init__(
        self,
        model: nn.Module,
        task_type: str,
        classifier: str = "linear",
        scale: float = 10.0,
        batch_size: int = 64,
        finetune_steps: int = 100,
        finetune_lr: float = 0.01,
        finetune_momentum: float = 0.9,
        finetune_weight_decay: float = 0.001,
        test_embedding: str = "separate",
    ) -> None:
        if classifier not in CLASSIFIERS:
            raise ConfigError(
                f"algo.classifier must be one of {tuple(CLASSIFIERS)}, got {classifier!r}"
            )
        name = f"algo={CLASSIFIERS[classifier]}"
        if task_type != CLASSIFICATION:
            raise ConfigError(
                f"{name} pre-trains a classifier over the meta-train classes and needs a "
                f"classification dataset, but this one is {task_type} (e.g. dataset=sinusoid); "
                "use a classification dataset such as dataset=omniglot"
            )
        super().__init__(task_type)
        body = getattr(model, "features", None)
        feature_dim = getattr(model, "feature_dim", None)
        if not isinstance(body, nn.Module) or isinstance(feature_dim, bool) or not (
            isinstance(feature_dim, int) and feature_dim > 0
        ):
            raise ConfigError(
                f"{name} needs a backbone with a feature extractor (.features and .feature_dim, "
                f"as conv4, resnet12 and mlp have), but {type(model).__name__} has none; "
                "use backbone=conv4 or backbone=resnet12"
            )
        self.body = body
        self.feature_dim = feature_dim
        self.classifier_kind = classifier
        self.scale = positive_number(scale, "algo.scale")
        self.batch_size = positive_int(batch_size, "algo.batch_size")
        self.finetune_steps = positive_int(finetune_steps, "algo.finetune_steps")
        self.finetune_lr = positive_number(finetune_lr, "algo.finetune_lr")
        self.finetune_momentum = _check_fraction(finetune_momentum, "algo.finetune_momentum")
        self.finetune_weight_decay = _check_non_negative(
            finetune_weight_decay, "algo.finetune_weight_decay"
        )
        if test_embedding not in TEST_EMBEDDINGS:
            raise ConfigError(
                f"algo.test_embedding must be one of {TEST_EMBEDDINGS}, got {test_embedding!r}"
            )
        self.test_embedding = test_embedding
        #: The pre-training classifier; made by ``training_batches`` once the classes are known.
        self.classifier: nn.Module | None = None

    # ----------------------------------------------------------------------------- pre-training
    def training_batches(
        self, dataset: Any, ways: int, shots: int, queries: int, meta_batch_size: int
    ) -> Callable[[torch.Generator], LabeledBatch]:
        """Mini-batches of ``algo.batch_size`` images over all meta-train classes, and a
        classifier with one output per class; the task shape is only used for evaluation."""
        if not callable(getattr(dataset, "batch_sampler", None)):
            raise ConfigError(
                f"algo={CLASSIFIERS[self.classifier_kind]} pre-trains on labelled mini-batches, "
                f"which {type(dataset).__name__} cannot give; use an image dataset (omniglot, "
                "miniimagenet, tieredimagenet, cifarfs, fc100, cub or folder)"
            )
        sampler = dataset.batch_sampler("train", self.batch_size)
        num_classes = dataset.num_classes("train")
        if self.classifier_kind == "linear":
            classifier: nn.Module = nn.Linear(self.feature_dim, num_classes)
        else:
            classifier = CosineClassifier(self.feature_dim, num_classes, self.scale)
        reference = next(self.body.parameters(), None)
        if reference is not None:
            classifier = classifier.to(device=reference.device, dtype=reference.dtype)
        self.classifier = classifier
        return sampler.sample

    def meta_train_step(self, batch: LabeledBatch) -> tuple[Tensor, dict[str, float]]:
        if self.classifier is None:
            raise RuntimeError("call training_batches() before meta_train_step(): no classifier")
        logits = self.classifier(self.body(batch.x))
        loss = F.cross_entropy(logits, batch.y)
        accuracy = (logits.detach().argmax(-1) == batch.y).float().mean()
        return loss, {"loss": loss.item(), "accuracy": accuracy.item()}

    # ----------------------------------------------------------------------------- evaluation
    def embed(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """Detached ``[B, N*K, D]`` support and ``[B, N*Q, D]`` query embeddings.

        The body only ever sees one task's images at a time, so batch-norm statistics are that
        task's own whatever else is in the meta-batch (see ``test_embedding``).
        """
        shots = batch.support_x.shape[1]
        support, query = [], []
        with torch.no_grad():
            for task in range(batch.meta_batch_size):
                if self.test_embedding == "joint":
                    images = torch.cat([batch.support_x[task], batch.query_x[task]])
                    features = self.body(images).flatten(1)
                    support.append(features[:shots])
                    query.append(features[shots:])
                else:
                    support.append(self.body(batch.support_x[task]).flatten(1))
                    query.append(self.body(batch.query_x[task]).flatten(1))
        return torch.stack(support), torch.stack(query)

    def head_logits(self, head: Head, features: Tensor) -> Tensor:
        """Logits ``[B, M, N]`` of B task heads (``weight [B, N, D]``) on ``features [B, M, D]``."""
        if self.classifier_kind == "cosine":
            return cosine_logits(features, head["weight"], self.scale)
        return torch.baddbmm(head["bias"].unsqueeze(1), features, head["weight"].transpose(1, 2))

    def initial_head(self, tasks: int, ways: int, like: Tensor) -> Head:
        """The same fixed-seed draw for every task, in ``nn.Linear``'s range; zero bias."""
        generator = torch.Generator().manual_seed(HEAD_INIT_SEED)
        bound = 1.0 / math.sqrt(self.feature_dim)
        weight = torch.rand(ways, self.feature_dim, generator=generator, dtype=torch.float64)
        weight = ((2 * weight - 1) * bound).to(device=like.device, dtype=like.dtype)
        head = {"weight": weight.expand(tasks, -1, -1).clone()}
        if self.classifier_kind == "linear":
            head["bias"] = like.new_zeros(tasks, ways)
        return head

    def fit_heads(self, support_features: Tensor, support_y: Tensor, ways: int) -> Head:
        """``finetune_steps`` of full-batch SGD with momentum and weight decay, all tasks at once.

        The loss is the sum over tasks of each task's mean support cross-entropy, so every head
        gets exactly the gradient it would get alone.
        """
        features = support_features.detach()
        shots_total = features.shape[1]

        def support_loss(head: Head) -> Tensor:
            logits = self.head_logits(head, features).reshape(-1, ways)
            return F.cross_entropy(logits, support_y.reshape(-1), reduction="sum") / shots_total

        head_gradient = grad(support_loss)
        head = self.initial_head(features.shape[0], ways, features)
        velocity = {name: torch.zeros_like(value) for name, value in head.items()}
        for _ in range(self.finetune_steps):
            gradients = head_gradient(head)
            for name, value in head.items():
                step = gradients[name] + self.finetune_weight_decay * value
                velocity[name] = self.finetune_momentum * velocity[name] + step
                head[name] = value - self.finetune_lr * velocity[name]
        return head

    def evaluation_outputs(self, batch: TaskBatch) -> Tensor:
        """The query logits of each task's new head, fitted on its support embeddings (the head's
        gradients are ``torch.func.grad``'s, so this works under the base class's ``no_grad``)."""
        ways = int(batch.support_y.max()) + 1
        support_features, query_features = self.embed(batch)
        head = self.fit_heads(support_features, batch.support_y, ways)
        return self.head_logits(head, query_features).detach()


def _check_fraction(value: object, key: str) -> float:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or not 0 <= value < 1:
        raise ConfigError(f"{key} must be a number in [0, 1), got {value!r}")
    return float(value)


def _check_non_negative(value: object, key: str) -> float:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{key} must be a number >= 0, got {value!r}")
    return float(value)
