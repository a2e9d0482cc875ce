"""ANIL: Almost No Inner Loop (Raghu, Raghu, Bengio & Vinyals, "Rapid Learning or Feature Reuse?
Towards Understanding the Effectiveness of MAML", ICLR 2020, arXiv:1909.09157).

The paper finds that MAML's inner loop barely changes the body of the network: what adapts is the
head. ANIL keeps the body (``model.features``) shared by all tasks and adapts only the head
(``model.head``). Each task's support and query sets pass through the body once; the head adapts
on the support features with MAML's functional inner loop (second order through the head's
steps unless ``first_order``), and the query loss of the adapted head is the meta-loss. The body
gets its meta-gradient only through that loss: through the query features directly and through
the support features the head adapted on. It is never changed in the inner loop.

Cost: the body runs one forward and one backward per task, never the double backward of MAML's
inner steps, and extra inner or test steps touch only the head. How much that saves depends on
how much of MAML's work is the inner loop: little at MAML's Omniglot setting (5-way 1-shot, 1
step, where the query images dominate both), more with more inner steps and shots, and more
again in evaluation (measured against MAML in docs/PERFORMANCE.md, "Measurements behind the
code's choices", "ANIL").

Drivers: ``task_batching`` applies to the body's forward passes and the head's inner loop.
``auto`` loops over tasks for conv bodies (the conv4 body was slower under ``vmap``: see
``uses_vmap``) and uses ``vmap`` otherwise. Either is exact, batch-norm included: the body is
differentiated only once, so the batch-norm caveat of second-order ``vmap`` does not apply, and
each task is its own batch, so batch-norm uses each task's own statistics. The head's inner loop
is MAML's.

Backbones: those with ``.features`` (the body) and ``.head`` (a module with parameters), such as
``conv4`` and ``mlp``; others are refused with a ``ConfigError`` before training.

Usage::

    anil = ANIL(Conv4((1, 28, 28), 5), "classification", inner_lr=0.4, inner_steps=1)
    loss, metrics = anil.meta_train_step(batch)
    loss.backward(); optimizer.step()
    per_task = anil.evaluate(batch)  # {"loss": [B], "accuracy": [B]}

or ``metarun algo=anil dataset=omniglot``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import vmap

from metarun.algorithms.maml import MAML
from metarun.data.episodes import TaskBatch
from metarun.errors import ConfigError
from metarun.execution.drivers import prefers_loop
from metarun.execution.layout import cpu_fast_layout


def check_body_and_head(model: object) -> None:
    """ANIL splits the backbone: refuse, in one line, one that has no body/head split."""
    features = getattr(model, "features", None)
    head = getattr(model, "head", None)
    if not isinstance(features, nn.Module) or not isinstance(head, nn.Module):
        raise ConfigError(
            f"algo=anil adapts only the backbone's head and needs a backbone with .features and "
            f".head submodules (conv4, mlp); {type(model).__name__} has none"
        )
    if not any(True for _ in head.parameters()):
        raise ConfigError(
            f"algo=anil adapts the backbone's head, but {type(model).__name__}.head has no "
            "parameters; use a backbone with a trainable head (conv4, mlp)"
        )


class ANIL(MAML):
    """MAML over ``model.head`` on features from the shared body ``model.features``."""

    def __init__(
        self,
        model: nn.Module,
        task_type: str,
        inner_lr: float = 0.01,
        inner_steps: int = 1,
        test_inner_steps: int | None = None,
        first_order: bool = False,
        task_batching: str = "auto",
    ) -> None:
        check_body_and_head(model)
        super().__init__(
            model, task_type, inner_lr, inner_steps, test_inner_steps, first_order, task_batching
        )

    @property
    def inner_module(self) -> nn.Module:
        return self.model.head

    @property
    def uses_vmap(self) -> bool:
        """``auto``: the loop for conv bodies, ``vmap`` otherwise.

        Under ``vmap`` the shared conv4 body was slower than the loop on the CPU (measured in
        docs/PERFORMANCE.md, "Measurements behind the code's choices", "ANIL"). The body is
        differentiated only once, so either driver is exact whatever its norm layers: the rule
        is about speed.
        """
        if self.task_batching == "auto":
            return not prefers_loop(self.model, first_order=True)
        return self.task_batching == "vmap"

    def body_features(self, inputs: Tensor) -> Tensor:
        """``[B, M, ...]`` inputs to ``[B, M, D]`` features, each task a batch of its own."""
        if self.uses_vmap:
            return vmap(self.model.features)(inputs)
        return torch.stack(
            [self.model.features(cpu_fast_layout(task_inputs)) for task_inputs in inputs]
        )

    def task_inputs(self, batch: TaskBatch) -> TaskBatch:
        return TaskBatch(
            self.body_features(batch.support_x),
            batch.support_y,
            self.body_features(batch.query_x),
            batch.query_y,
        )
