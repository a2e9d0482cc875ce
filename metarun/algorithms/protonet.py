"""Prototypical Networks (Snell, Swersky & Zemel, NeurIPS 2017, arXiv:1703.05175).

Each class is represented by the mean of its support embeddings (its prototype), and a query is
classified by a softmax over negative squared Euclidean distances to the prototypes. With the
squared Euclidean distance this is a linear classifier in the embedding space (paper, sec. 2.3),
which is why the paper prefers it to cosine. The embedding is the backbone's body: conv4's
flattened features (64-d on 28x28 Omniglot at 64 channels) or the MLP's last hidden layer.

Training episodes may be wider than test episodes: the paper trains 60-way with 5 queries per
class for Omniglot and finds higher training way helps. ``train_ways``, ``train_shots`` and
``train_queries`` set that shape (``configs/specialize/protonet_omniglot.yaml`` puts the paper's
values); evaluation uses ``task.*``.

Usage::

    protonet = ProtoNet(Conv4((1, 28, 28), 5), "classification", train_ways=60, train_queries=5)
    draw = protonet.training_batches(omniglot, ways=5, shots=1, queries=15, meta_batch_size=1)
    loss, metrics = protonet.meta_train_step(draw(generator))
    loss.backward(); optimizer.step()
    per_task = protonet.evaluate(batch)  # {"loss": [B], "accuracy": [B]}

or ``metarun algo=protonet dataset=omniglot``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from metarun.algorithms.metric import MetricLearner, Params, class_means


def squared_distances(queries: Tensor, prototypes: Tensor) -> Tensor:
    """``[B, Q, D]`` x ``[B, N, D]`` -> ``[B, Q, N]``, by the definition (no expansion tricks).

    The ``|q|^2 - 2 q.c + |c|^2`` expansion is faster but can go slightly negative by cancellation;
    at few-shot sizes the difference tensor is small.
    """
    return (queries.unsqueeze(2) - prototypes.unsqueeze(1)).pow(2).sum(-1)


class ProtoNet(MetricLearner):
    """Logits are negative squared Euclidean distances to the class means of the support set.

    Accepts any backbone with a feature body (``conv4``, ``mlp``); only the body is trained,
    the backbone's head is unused. Tasks run as ``MetricLearner`` drives them (the task
    threads, leaves of each task's own).
    """

    algo_name = "protonet"
    accepts = "a backbone with a feature body (conv4, mlp)"

    def compare(
        self, meta: Params, support: Tensor, support_y: Tensor, query: Tensor, ways: int,
        dtype: torch.dtype,
    ) -> Tensor:
        prototypes = class_means(support[None], support_y[None], ways)
        return -squared_distances(query[None], prototypes)[0]
