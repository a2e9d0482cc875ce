"""A hypernetwork meta-learner: a task's classifier and body modulation generated from its
support set (model-based meta-learning), optionally refined by a few gradient steps.

For each task (CNAPs: Requeima et al., NeurIPS 2019, arXiv:1906.07697, ``src/model.py``):

1. **Task encoding.** The support images pass through a task encoder without FiLM, and a
   DeepSets encoder mean-pools their embeddings into one vector ``z`` (``metarun.algorithms.film``).
   CNAPs' set encoder is a conv net of its own; ``task_encoder: separate`` does that with a
   freshly initialised copy of the backbone's body, ``task_encoder: body`` (default) reuses the
   body itself, unmodulated, so the support set is embedded twice.
2. **FiLM.** ``z`` generates a per-channel ``gamma``, ``beta`` for every batch-norm of the body
   (identity at initialisation); the modulated body embeds the support set and the query set in
   two passes, as CNAPs does (so batch-norm normalises each set with its own statistics).
3. **Classifier.** Each class's weights come from the mean of its modulated support embeddings
   ``m_c`` (``classifier``):

   - ``mean``: ``w_c = m_c``, ``b_c = -|m_c|^2 / 2``: the nearest-class-mean rule written as a
     linear classifier (``argmax w.x + b = argmin |x - m_c|^2``; Snell et al. 2017, sec. 2.3).
   - ``linear`` (CNAPs' classifier adaptation network, ``adaptation_networks.py``): the same
     plus a learned correction from ``m_c``, ``w_c = m_c + f_w(m_c)``, ``b_c = -|m_c|^2/2 +
     f_b(m_c)``, with ``f`` zero-initialised, so it starts as ``mean``. CNAPs has ``w_c = m_c +
     f_w(m_c)`` and ``b_c = f_b(m_c)``; the ``-|m_c|^2/2`` start is ours.
   - ``cosine`` (Gidaris & Komodakis, CVPR 2018, arXiv:1804.09458, secs. 3.1-3.2): ``w_c = phi ⊙
     mean_i(e_i / |e_i|)`` with a learned ``phi`` (ones at start) and logits ``s * cos(x, w_c)``
     with a learned scale ``s`` (``scale`` at start). Their attention over base-class weights
     needs base classes, which episodic meta-learning has not, and is left out.

4. **Fine-tuning** (``finetune_steps`` > 0): SGD steps on the task's support loss from the
   generated classifier, the body fixed (the head only, as in ANIL; "model-based + gradient-based"
   as LEO, Rusu et al. 2019). Meta-training differentiates through them (second order unless
   ``first_order``); evaluation takes ``test_finetune_steps`` on detached weights.

Usage::

    hypernet = HyperNet(Conv4((1, 28, 28), 5), "classification", finetune_steps=1)
    loss, metrics = hypernet.meta_train_step(batch)
    loss.backward(); optimizer.step()
    per_task = hypernet.evaluate(batch)  # {"loss": [B], "accuracy": [B]}

or ``metarun algo=hypernet dataset=omniglot``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.base import MetaAlgorithm, task_scores
from metarun.algorithms.baseline import cosine_logits
from metarun.algorithms.film import (
    Film,
    FiLMGenerator,
    SetEncoder,
    film_applied,
    fresh_copy,
    norm_layers,
)
from metarun.algorithms.metric import check_classification, class_means, feature_body, num_ways
from metarun.checks import positive_int, positive_number
from metarun.data.episodes import TaskBatch
from metarun.errors import ConfigError
from metarun.execution.layout import cpu_fast_layout
from metarun.execution.precision import inner_grad

CLASSIFIERS = ("linear", "cosine", "mean")
TASK_ENCODERS = ("body", "separate")
ACCEPTS = "a backbone with a feature body and a feature_dim (conv4, resnet12; mlp with film=false)"

Head = dict[str, Tensor]


class HyperNet(MetaAlgorithm):
    """Generates each task's classifier (and FiLM of the body) from its support set."""

    def __init__(
        self,
        model: nn.Module,
        task_type: str,
        classifier: str = "linear",
        film: bool = True,
        task_encoder: str = "body",
        hidden: int = 64,
        scale: float = 10.0,
        finetune_steps: int = 0,
        test_finetune_steps: int | None = None,
        finetune_lr: float = 0.1,
        first_order: bool = False,
    ) -> None:
        check_classification("hypernet", task_type)
        super().__init__(task_type)
        body = feature_body(model, "hypernet", ACCEPTS)
        dim = getattr(model, "feature_dim", None)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ConfigError(f"algo=hypernet needs {ACCEPTS}; {type(model).__name__} has none")
        self.model = model
        if classifier not in CLASSIFIERS:
            raise ConfigError(f"algo.classifier must be one of {CLASSIFIERS}, got {classifier!r}")
        self.classifier = classifier
        if task_encoder not in TASK_ENCODERS:
            raise ConfigError(
                f"algo.task_encoder must be one of {TASK_ENCODERS}, got {task_encoder!r}"
            )
        for key, value in {"film": film, "first_order": first_order}.items():
            if not isinstance(value, bool):
                raise ConfigError(f"algo.{key} must be true or false, got {value!r}")
        self.film, self.first_order = film, first_order
        hidden = positive_int(hidden, "algo.hidden")
        self.finetune_steps = _steps(finetune_steps, "algo.finetune_steps")
        self.test_finetune_steps = (
            self.finetune_steps
            if test_finetune_steps is None
            else _steps(test_finetune_steps, "algo.test_finetune_steps")
        )
        self.finetune_lr = positive_number(finetune_lr, "algo.finetune_lr")

        # The modulated layers are the backbone's own modules: a plain list, not submodules.
        self._norms = norm_layers(body) if film else []
        if film and not self._norms:
            raise ConfigError(
                f"algo=hypernet puts FiLM on the body's batch-norm layers, but "
                f"{type(model).__name__}'s body has none; use backbone=conv4 or algo.film=false"
            )
        if film:
            self.encoder_body = fresh_copy(body) if task_encoder == "separate" else None
            self.set_encoder = SetEncoder(dim, hidden)
            self.film_generator = FiLMGenerator(hidden, [n.num_features for n in self._norms])
        if classifier == "linear":
            # One map from m_c to the corrections of w_c (D) and b_c (1), zero at start.
            self.class_generator = nn.Sequential(
                nn.Linear(dim, hidden), nn.ELU(), nn.Linear(hidden, dim + 1)
            )
            nn.init.zeros_(self.class_generator[-1].weight)
            nn.init.zeros_(self.class_generator[-1].bias)
        if classifier == "cosine":
            self.class_reweighting = nn.Parameter(torch.ones(dim))
            self.scale = nn.Parameter(torch.tensor(positive_number(scale, "algo.scale")))

    @property
    def body(self) -> nn.Module:
        return self.model.features

    # One task's features: encode the support set, generate FiLM, embed with the modulated body.

    def task_film(self, support_x: Tensor) -> Film:
        """FiLM parameters for one task from its support images (no FiLM in this pass)."""
        encoder = self.body if self.encoder_body is None else self.encoder_body
        return self.film_generator(self.set_encoder(encoder(support_x).flatten(1)))

    def task_features(self, support_x: Tensor, query_x: Tensor) -> tuple[Tensor, Tensor]:
        """Support and query embeddings ``[S, D]``, ``[Q, D]`` of one task, FiLM applied."""
        support_x, query_x = cpu_fast_layout(support_x), cpu_fast_layout(query_x)
        if not self.film:
            return self.body(support_x).flatten(1), self.body(query_x).flatten(1)
        with film_applied(self._norms, self.task_film(support_x)):
            return self.body(support_x).flatten(1), self.body(query_x).flatten(1)

    def features(self, batch: TaskBatch) -> tuple[Tensor, Tensor]:
        """``[B, S, D]``, ``[B, Q, D]``: task by task, so batch-norm never mixes tasks."""
        tasks = zip(batch.support_x, batch.query_x, strict=True)
        pairs = [self.task_features(support_x, query_x) for support_x, query_x in tasks]
        return torch.stack([s for s, _ in pairs]), torch.stack([q for _, q in pairs])

    # The classifier: generated from the class means, then optionally fine-tuned.

    def generate_head(self, support: Tensor, support_y: Tensor, ways: int) -> Head:
        """Each task's classifier ``{"weight": [B, N, D], "bias": [B, N]}`` (no bias: cosine)."""
        if self.classifier == "cosine":
            unit_means = class_means(F.normalize(support, dim=-1), support_y, ways)
            return {"weight": unit_means * self.class_reweighting}
        means = class_means(support, support_y, ways)
        weight, bias = means, -0.5 * means.pow(2).sum(-1)
        if self.classifier == "linear":
            correction = self.class_generator(means)
            weight, bias = weight + correction[..., :-1], bias + correction[..., -1]
        return {"weight": weight, "bias": bias}

    def head_logits(self, features: Tensor, head: Head) -> Tensor:
        """``[B, M, D]`` features -> ``[B, M, N]`` logits of each task's classifier."""
        if self.classifier == "cosine":
            return cosine_logits(features, head["weight"], self.scale)
        return features @ head["weight"].transpose(1, 2) + head["bias"].unsqueeze(1)

    def finetune(
        self, head: Head, support: Tensor, support_y: Tensor, steps: int, second_order: bool
    ) -> Head:
        """``steps`` SGD steps of every task's head on its own support loss (all tasks at once:
        the summed loss gives each head its own task's gradient).

        A head that carries a graph to the meta-parameters keeps it through the steps
        (differentiated through them if ``second_order``, else their gradients are constants).
        A head without one (evaluation, a caller's ``no_grad``) is fine-tuned as fresh leaves,
        as MAML's inner loop is, and comes back detached.
        """
        if steps == 0:
            return head
        carries_graph = any(value.requires_grad for value in head.values())
        with torch.enable_grad():
            head = {
                name: value if value.requires_grad else value.detach().requires_grad_()
                for name, value in head.items()
            }
            for _ in range(steps):
                logits = self.head_logits(support, head)
                loss = F.cross_entropy(logits.flatten(0, 1), support_y.flatten(), reduction="sum")
                loss = loss / support.shape[1]  # the sum over tasks of each task's mean loss
                # The graph is kept: the query loss goes back through it to the body.
                grads = inner_grad(
                    loss,
                    list(head.values()),
                    create_graph=second_order and carries_graph,
                    retain_graph=carries_graph,
                )
                head = {
                    name: value - self.finetune_lr * grad
                    for (name, value), grad in zip(head.items(), grads, strict=True)
                }
        return head if carries_graph else {name: value.detach() for name, value in head.items()}

    def query_logits(self, batch: TaskBatch, steps: int) -> Tensor:
        support, query = self.features(batch)
        head = self.generate_head(support, batch.support_y, num_ways(batch))
        head = self.finetune(head, support, batch.support_y, steps, not self.first_order)
        return self.head_logits(query, head)

    def meta_train_step(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        scores = task_scores(
            self.query_logits(batch, self.finetune_steps), batch.query_y, self.task_type
        )
        metrics = {name: value.detach().mean().item() for name, value in scores.items()}
        return scores["loss"].mean(), metrics

    def evaluation_outputs(self, batch: TaskBatch) -> Tensor:
        with torch.no_grad():
            support, query = self.features(batch)
            head = self.generate_head(support, batch.support_y, num_ways(batch))
        if self.test_finetune_steps:
            # Inference tensors (a caller's inference_mode) cannot enter autograd: normal copies.
            with torch.inference_mode(False):
                head = {name: value.clone() for name, value in head.items()}
                head = self.finetune(
                    head, support.clone(), batch.support_y, self.test_finetune_steps, False
                )
        with torch.no_grad():
            return self.head_logits(query, head)


def _steps(value: object, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key} must be an integer >= 0, got {value!r}")
    return value
