"""One meta-iteration of MAML / FOMAML / ProtoNet, written the way each library is used, on the
very same network, tasks and optimizer; and the meta-gradient agreement between the two.

Fairness (what is identical on both sides):

- the network: one metarun ``Conv4`` (conv3x3 without bias -> batch-norm without running
  statistics -> ReLU -> max-pool 2, four times, then a linear head), initialised once and deep
  copied for each library. learn2learn's ``OmniglotCNN`` differs (strided convolutions instead of
  max-pooling, conv biases, batch-norm that tracks running statistics, a spatial mean before the
  head), so it is not used: ``l2l.algorithms.MAML`` wraps any ``nn.Module``, and here it wraps
  the same Conv4 that metarun adapts;
- the tasks: one ``TaskBatch`` from metarun's sampler, fed to both (learn2learn's sampling speed
  is measured separately, in bench_data.py);
- batch-norm statistics: both forward the support set and the query set of one task separately
  (MAML), or one task's whole episode in one pass (ProtoNet), so the numbers agree exactly;
- the optimizer: Adam (lr 1e-3) on the meta-parameters, stepped once per meta-iteration.

learn2learn's side follows its examples: ``examples/vision/maml_omniglot.py`` (a loop over tasks
with ``maml.clone()``, ``learner.adapt(loss)`` per inner step, ``evaluation_error.backward()``
per task, the accumulated gradients scaled by 1 / meta-batch) and, for ProtoNet,
``LightningPrototypicalNetworks.meta_learn`` with ``l2l.nn.PrototypicalClassifier`` (sort the
episode by label, embed it in one pass, split support from query with a boolean mask). Its sort is
``stable=True`` here so that support and query are the very drawings metarun uses.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import learn2learn as l2l
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from metarun.algorithms.maml import MAML
from metarun.algorithms.protonet import ProtoNet
from metarun.data.episodes import TaskBatch
from metarun.execution import layout
from metarun.models.conv4 import Conv4

INNER_LR = 0.4  # MAML's Omniglot inner step size (configs/specialize/maml_omniglot.yaml)
META_LR = 1e-3
IMAGE_SHAPE = (1, 28, 28)
GRADIENT_TOLERANCE = 1e-6
# metarun's MAML driver over tasks (its algo.task_batching); bench.py --task-batching sets it, to
# time a driver that ``auto`` does not pick on this device (e.g. vmap on a GPU).
TASK_BATCHING = "auto"


@dataclass(frozen=True)
class StepCase:
    name: str
    algo: str  # "maml" (first_order selects FOMAML) or "protonet"
    ways: int
    shots: int
    queries: int
    meta_batch_size: int
    inner_steps: int = 1
    first_order: bool = False

    @property
    def shape(self) -> str:
        return f"{self.ways}w{self.shots}s"


def _maml_cases() -> list[StepCase]:
    cases = []
    for first_order in (False, True):
        prefix = "fomaml" if first_order else "maml"
        for ways, shots, steps in ((5, 1, 1), (5, 1, 5), (5, 5, 1), (20, 1, 1)):
            cases.append(StepCase(f"{prefix}-{ways}w{shots}s-{steps}step", "maml", ways, shots,
                                  15, 32, steps, first_order))
    return cases


# 15 queries per class everywhere: metarun's Omniglot task default (configs/task/omniglot.yaml).
STEP_CASES: tuple[StepCase, ...] = (
    *_maml_cases(),
    # One 5-way 5-shot episode per update, as in learn2learn's ProtoNet and metarun's Omniglot
    # ProtoNet configuration (meta-batch 1).
    StepCase("protonet-5w5s", "protonet", 5, 5, 15, 1),
)


def make_model(case: StepCase, seed: int) -> Conv4:
    torch.manual_seed(seed)
    return Conv4(IMAGE_SHAPE, case.ways)


class MetarunRunner:
    """metarun's public API, as its trainer calls it: meta_train_step(batch), then backward."""

    def __init__(self, model: Conv4, case: StepCase) -> None:
        self.model = model
        if case.algo == "maml":
            self.algo: MAML | ProtoNet = MAML(model, "classification", inner_lr=INNER_LR,
                                              inner_steps=case.inner_steps,
                                              first_order=case.first_order,
                                              task_batching=TASK_BATCHING)
        else:
            self.algo = ProtoNet(model, "classification")

    def backward(self, batch: TaskBatch, episodes: list[tuple[Tensor, Tensor]]) -> float:
        loss, _metrics = self.algo.meta_train_step(batch)
        loss.backward()
        return loss.item()


class L2lMamlRunner:
    """learn2learn's MAML loop, as in its examples/vision/maml_omniglot.py."""

    def __init__(self, model: Conv4, case: StepCase) -> None:
        self.model = model
        self.maml = l2l.algorithms.MAML(model, lr=INNER_LR, first_order=case.first_order)
        self.inner_steps = case.inner_steps

    def backward(self, batch: TaskBatch, episodes: list[tuple[Tensor, Tensor]]) -> float:
        tasks = batch.meta_batch_size
        meta_train_error = 0.0
        meta_train_accuracy = 0.0
        for task in range(tasks):
            learner = self.maml.clone()
            for _ in range(self.inner_steps):
                support_error = F.cross_entropy(learner(batch.support_x[task]),
                                                batch.support_y[task])
                learner.adapt(support_error)
            predictions = learner(batch.query_x[task])
            evaluation_error = F.cross_entropy(predictions, batch.query_y[task])
            evaluation_error.backward()
            meta_train_error += evaluation_error.item()
            correct = predictions.argmax(dim=1).view(batch.query_y[task].shape)
            meta_train_accuracy += (correct == batch.query_y[task]).float().mean().item()
        for parameter in self.maml.parameters():
            parameter.grad.data.mul_(1.0 / tasks)
        return meta_train_error / tasks


class L2lProtoNetRunner:
    """learn2learn's ProtoNet step (LightningPrototypicalNetworks.meta_learn), one episode each."""

    def __init__(self, model: Conv4, case: StepCase) -> None:
        self.model = model
        self.features = model.features
        self.classifier = l2l.nn.PrototypicalClassifier(distance="euclidean")
        self.ways, self.shots, self.queries = case.ways, case.shots, case.queries

    def backward(self, batch: TaskBatch, episodes: list[tuple[Tensor, Tensor]]) -> float:
        total = 0.0
        for data, labels in episodes:
            sort = torch.sort(labels, stable=True)
            data, labels = data[sort.indices], labels[sort.indices]
            embeddings = self.features(data)
            support_indices = np.zeros(data.size(0), dtype=bool)
            selection = np.arange(self.ways) * (self.shots + self.queries)
            for offset in range(self.shots):
                support_indices[selection + offset] = True
            query_indices = torch.from_numpy(~support_indices).to(data.device)
            support_mask = torch.from_numpy(support_indices).to(data.device)
            self.classifier.fit_(embeddings[support_mask], labels[support_mask])
            logits = self.classifier(embeddings[query_indices])
            loss = F.cross_entropy(logits, labels[query_indices])
            (loss / len(episodes)).backward()
            total += loss.item()
        return total / len(episodes)


Runner = MetarunRunner | L2lMamlRunner | L2lProtoNetRunner


def make_runner(library: str, model: Conv4, case: StepCase) -> Runner:
    if library == "metarun":
        return MetarunRunner(model, case)
    return L2lMamlRunner(model, case) if case.algo == "maml" else L2lProtoNetRunner(model, case)


def l2l_episodes(batch: TaskBatch) -> list[tuple[Tensor, Tensor]]:
    """Each task as learn2learn's TaskDataset hands it over: one ``(data, labels)`` pair with
    every class's drawings together (its K support drawings, then its Q queries)."""
    episodes = []
    for task in range(batch.meta_batch_size):
        support_x, support_y = batch.support_x[task], batch.support_y[task]
        query_x, query_y = batch.query_x[task], batch.query_y[task]
        data, labels = [], []
        for label in torch.unique(support_y).tolist():
            data += [support_x[support_y == label], query_x[query_y == label]]
            labels += [support_y[support_y == label], query_y[query_y == label]]
        episodes.append((torch.cat(data), torch.cat(labels)))
    return episodes


class TimedStep:
    """One library's meta-iteration: zero the gradients, backward, one optimizer step."""

    def __init__(self, library: str, base: Conv4, case: StepCase, batch: TaskBatch) -> None:
        self.model = copy.deepcopy(base)
        self.runner = make_runner(library, self.model, case)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=META_LR)
        self.batch = batch
        self.episodes = l2l_episodes(batch) if library == "learn2learn" else []

    def __call__(self) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.runner.backward(self.batch, self.episodes)
        self.optimizer.step()
        return loss


def meta_gradients(library: str, base: Conv4, case: StepCase, batch: TaskBatch
                   ) -> tuple[float, dict[str, Tensor]]:
    model = copy.deepcopy(base)
    runner = make_runner(library, model, case)
    episodes = l2l_episodes(batch) if library == "learn2learn" else []
    loss = runner.backward(batch, episodes)
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()
             if p.grad is not None}
    return loss, grads


def gradient_agreement(case: StepCase, base: Conv4, batch: TaskBatch) -> dict[str, object]:
    """float64, same weights and tasks: the largest difference between the two meta-gradients.

    metarun's CPU channels-last layout is float32-only; here it is let through for float64 too,
    so the gradients checked are those of the code path that is timed (unless the run turned
    the layout off with --no-channels-last).
    """
    base64 = copy.deepcopy(base).double()
    batch64 = batch.to(batch.support_x.device, dtype=torch.float64)
    timed_dtypes = layout.FAST_DTYPES
    layout.FAST_DTYPES = (*timed_dtypes, torch.float64) if timed_dtypes else ()
    try:
        metarun_loss, metarun_grads = meta_gradients("metarun", base64, case, batch64)
    finally:
        layout.FAST_DTYPES = timed_dtypes
    l2l_loss, l2l_grads = meta_gradients("learn2learn", base64, case, batch64)
    if metarun_grads.keys() != l2l_grads.keys():
        raise AssertionError(f"{case.name}: gradients for different parameters: "
                             f"{sorted(metarun_grads.keys() ^ l2l_grads.keys())}")
    max_abs_diff = max((metarun_grads[k] - l2l_grads[k]).abs().max().item() for k in l2l_grads)
    max_abs_grad = max(g.abs().max().item() for g in l2l_grads.values())
    return {
        "case": case.name,
        "dtype": "float64",
        "meta_batch_size": batch.meta_batch_size,
        "parameters_compared": len(l2l_grads),
        "loss_metarun": metarun_loss,
        "loss_learn2learn": l2l_loss,
        "max_abs_diff": max_abs_diff,
        "max_abs_grad": max_abs_grad,
        "tolerance": GRADIENT_TOLERANCE,
        "agrees": max_abs_diff <= GRADIENT_TOLERANCE,
    }


def check_same_outputs(base: Conv4, batch: TaskBatch) -> None:
    """A wrapped clone must compute what the bare module computes (guards the set-up itself)."""
    clone = l2l.algorithms.MAML(copy.deepcopy(base), lr=INNER_LR).clone()
    inputs = batch.support_x[0]
    if not torch.allclose(clone(inputs), base(inputs)):
        raise AssertionError("learn2learn's clone of Conv4 computes something else than Conv4")

