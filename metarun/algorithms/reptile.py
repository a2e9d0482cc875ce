"""Reptile (Nichol, Achiam & Schulman, "On First-Order Meta-Learning Algorithms", 2018,
arXiv:1803.02999).

Each task of a meta-batch trains a copy of the initialisation ``φ`` for ``inner_steps`` steps of
SGD or Adam (``inner_optimizer``) on its data, reaching ``φ̃_i``; the initialisation then moves
toward the average: ``φ ← φ + ε (mean_i φ̃_i − φ)``. No gradient flows through the inner loop.

The outer step through the trainer: ``meta_train_step`` returns the surrogate loss
``0.5 Σ ‖φ − stopgrad(mean_i φ̃_i)‖²``, whose gradient is exactly ``φ − mean_i φ̃_i``, the
"pseudo-gradient" of the paper. ``optimizer=sgd optimizer.momentum=0 optimizer.lr=ε`` is then
the paper's update with step size ε. With the default ``optimizer=adam`` the pseudo-gradient
goes through Adam instead, a variant the paper itself suggests (sec. 3); Adam is blind to the
gradient's scale, so no algorithm-side step size could turn it into the plain update. Nor can a
config file make ``algo=reptile`` pick SGD: Hydra lets a defaults list override only a group
chosen before it (``config.yaml`` picks ``algo`` before ``optimizer``), refuses overrides in
``specialize/`` files (reached by interpolation), and ``optimizer.momentum`` set there would
break an explicit ``optimizer=adam``.

Data: with ``train_on_query=false`` the inner loop sees only the support set, exactly what
evaluation adapts on. With ``train_on_query=true`` meta-training adapts on support and query
together (Reptile has no inner train/test split; the paper trains 1-shot Omniglot models on 10
shots per class, more than they are tested with); the reported query metrics are then on data
the inner loop trained on. Every inner step is full batch (the paper draws mini-batches).

Evaluation adapts like MAML: ``test_inner_steps`` steps of the inner optimizer on the support set
(Adam state starts fresh for every task), then scores the query set.

Drivers: MAML's (``vmap`` over tasks for MLPs, a loop for conv nets; Reptile is first order, so
``vmap`` is exact with batch-norm too). Backbones: any ``nn.Module`` with parameters.

Usage::

    reptile = Reptile(Conv4((1, 28, 28), 5), "classification", inner_optimizer="adam",
                      inner_lr=1e-3, inner_steps=5, test_inner_steps=50, train_on_query=True)
    optimizer = torch.optim.SGD(reptile.parameters(), lr=1.0)   # ε = 1
    loss, metrics = reptile.meta_train_step(batch)
    optimizer.zero_grad(); loss.backward(); optimizer.step()    # φ ← φ + ε (mean φ̃ − φ)

or ``metarun algo=reptile dataset=omniglot optimizer=sgd optimizer.momentum=0 optimizer.lr=1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metarun.algorithms.base import task_scores
from metarun.algorithms.maml import MAML, Params
from metarun.data.episodes import TaskBatch
from metarun.errors import ConfigError

INNER_OPTIMIZERS = ("sgd", "adam")


def _check_betas(value: object) -> tuple[float, float]:
    try:
        betas = tuple(value)  # type: ignore[arg-type]
    except TypeError:
        betas = ()
    ok = len(betas) == 2 and all(
        isinstance(b, int | float) and not isinstance(b, bool) and 0 <= b < 1 for b in betas
    )
    if not ok:
        raise ConfigError(f"algo.inner_betas must be two numbers in [0, 1), got {value!r}")
    return float(betas[0]), float(betas[1])


class Reptile(MAML):
    """Moves the initialisation toward the weights each task reaches by plain training."""

    def __init__(
        self,
        model: nn.Module,
        task_type: str,
        inner_lr: float = 0.02,
        inner_steps: int = 5,
        test_inner_steps: int | None = None,
        inner_optimizer: str = "sgd",
        inner_betas: Sequence[float] = (0.0, 0.999),
        train_on_query: bool = False,
        task_batching: str = "auto",
    ) -> None:
        super().__init__(
            model,
            task_type,
            inner_lr,
            inner_steps,
            test_inner_steps,
            first_order=True,
            task_batching=task_batching,
        )
        if inner_optimizer not in INNER_OPTIMIZERS:
            raise ConfigError(
                f"algo.inner_optimizer must be one of {INNER_OPTIMIZERS}, got {inner_optimizer!r}"
            )
        self.inner_optimizer = inner_optimizer
        self.inner_betas = _check_betas(inner_betas)
        if not isinstance(train_on_query, bool):
            raise ConfigError(f"algo.train_on_query must be true or false, got {train_on_query!r}")
        self.train_on_query = train_on_query

    def inner_update(
        self, meta: Params, params: Params, grads: Params, state: dict[str, Any]
    ) -> Params:
        if self.inner_optimizer == "sgd":
            return super().inner_update(meta, params, grads, state)
        # Adam as torch.optim.Adam computes it (bias-corrected moments, eps 1e-8); the paper's
        # code uses beta1 = 0. The moments live for one task's adaptation only.
        beta1, beta2 = self.inner_betas
        if not state:
            state.update(step=0, first={}, second={})
            for name, g in grads.items():
                state["first"][name] = torch.zeros_like(g)
                state["second"][name] = torch.zeros_like(g)
        state["step"] += 1
        step = state["step"]
        adapted = {}
        for name, p in params.items():
            first = state["first"][name] = beta1 * state["first"][name] + (1 - beta1) * grads[name]
            second = state["second"][name] = (
                beta2 * state["second"][name] + (1 - beta2) * grads[name].square()
            )
            first_hat = first / (1 - beta1**step)
            second_hat = second / (1 - beta2**step)
            adapted[name] = p - self.inner_lr * first_hat / (second_hat.sqrt() + 1e-8)
        return adapted

    def adapted_parameters(self, batch: TaskBatch) -> tuple[Params, Tensor]:
        """Every task's ``φ̃`` (``[B, ...]`` per parameter) and its query outputs ``[B, M, ...]``.

        The inner loop starts from detached parameters: Reptile never differentiates through it.
        """
        start = {name: p.detach() for name, p in self.meta_parameters().items()}
        train_x, train_y = batch.support_x, batch.support_y
        if self.train_on_query:
            train_x = torch.cat([batch.support_x, batch.query_x], dim=1)
            train_y = torch.cat([batch.support_y, batch.query_y], dim=1)

        def per_task(
            meta: Params, train_x: Tensor, train_y: Tensor, query_x: Tensor
        ) -> tuple[Params, Tensor]:
            adapted = self.adapt(meta, train_x, train_y, self.inner_steps)
            return adapted, self.forward_with(adapted, self.fast_layout(query_x))

        return self.map_tasks(per_task, start, train_x, train_y, batch.query_x)

    def meta_train_step(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        adapted, outputs = self.adapted_parameters(batch)
        surrogate = sum(
            0.5 * (p - adapted[name].mean(0).detach()).pow(2).sum()
            for name, p in self.inner_module.named_parameters()
        )
        scores = task_scores(outputs.detach(), batch.query_y, self.task_type)
        metrics = {name: value.mean().item() for name, value in scores.items()}
        return surrogate, metrics
