"""Meta-SGD (Li, Zhou, Chen & Li, 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot
Learning", arXiv:1707.09835).

MAML with a learned inner step: every parameter tensor ``θ`` gets a learning-rate tensor ``α`` of
the same shape, and a task adapts with ``θ' = θ - α ⊙ ∇L_support(θ)``. The meta-loss (the query
loss at ``θ'``) is differentiated with respect to both ``θ`` and ``α``, so the optimizer learns
the initialisation, the step size and (through the signs of ``α``) the update direction together.

Everything else is MAML's: the functional inner loop, the ``vmap``/loop drivers and their rule
for batch-norm, evaluation on the support set with ``test_inner_steps`` steps (here with the
learned rates). Only ``inner_update`` differs. The rates start at ``inner_lr`` everywhere; the
paper draws them at random from a small range, but a constant start makes the algorithm equal to
MAML at initialisation, which is what the tests check. They are not constrained to be positive
(the paper does not constrain them either).

Backbones: any ``nn.Module`` with parameters (like MAML).

Usage::

    metasgd = MetaSGD(Conv4((1, 28, 28), 5), "classification", inner_lr=0.4)
    loss, metrics = metasgd.meta_train_step(batch)   # gradients reach weights and rates
    loss.backward(); optimizer.step()                # optimizer over metasgd.parameters()
    per_task = metasgd.evaluate(batch)               # {"loss": [B], "accuracy": [B]}

or ``metarun algo=metasgd dataset=omniglot``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from metarun.algorithms.maml import MAML, Params


def rate_key(name: str) -> str:
    """A parameter name as a ``ParameterDict`` key (module names may not contain dots)."""
    return name.replace(".", "/")


class MetaSGD(MAML):
    """MAML whose inner learning rate is a learned tensor per parameter, initialised to
    ``inner_lr``; second order by default.

    ``first_order=True`` still learns the rates: their gradient needs the inner gradient's value,
    not its derivative, so with one inner step it is exact (with more it drops the terms through
    later steps' gradients, as first-order MAML does for the weights).
    """

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
        super().__init__(
            model, task_type, inner_lr, inner_steps, test_inner_steps, first_order, task_batching
        )
        self.inner_lrs = nn.ParameterDict(
            {
                rate_key(name): nn.Parameter(torch.full_like(p.detach(), self.inner_lr))
                for name, p in self.inner_module.named_parameters()
            }
        )

    def inner_update(
        self, meta: Params, params: Params, grads: Params, state: dict[str, Any]
    ) -> Params:
        return {
            name: p - meta[f"inner_lrs.{rate_key(name)}"] * grads[name]
            for name, p in params.items()
        }
