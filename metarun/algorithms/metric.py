"""What the metric-based meta-learners share: per-task embedding, class prototypes, the task
driver, checks.

Prototypical Networks, Matching Networks and Relation Networks learn an embedding and classify a
query by comparing it with the support set; none adapts any weights per task. So each task's
loss is an ordinary forward pass through the backbone's body (``model.features``) and a
comparison (``MetricLearner.compare``, with any head module of the algorithm's own: Matching
Networks' full-context LSTMs, Relation Networks' relation module), and evaluation
(``evaluation_outputs``, which ``evaluate`` and ``query_probabilities`` build on) is the same
pass without gradients.

Batch-norm: the backbones keep no running statistics, so one forward pass normalises with the
statistics of what it is given. Each task's support and query images are embedded together, in
one pass per task (``MetricLearner.episode_embeddings``): statistics come from that one episode
only (transductive over the episode, like the Prototypical Networks reference code in training
mode) and never mix tasks. A body or head whose batch-norm does keep running statistics (none of
metarun's) writes them in every training forward pass; such a learner runs its tasks on one
thread, in task order (``task_workers``), so no two threads write the same buffer.

How tasks are driven: as MAML's loop (``metarun.execution.task_gradients``). ``meta_train_step``
hands each task to the task threads (``metarun.execution.drivers.cpu_workers``: on the CPU, as
many tasks at once as torch has intra-op threads, one intra-op thread each), where the task's
scores are computed from leaves of its own (the meta-parameters detached per task, never the
``nn.Parameter`` objects: the thread rule of docs/RELIABILITY.md) through that worker's own
executed copy of the body and of each head module (``run_module``: ``functional_call`` swaps the
parameters of the module it is given, so two threads never share one). The per-task gradients
are summed in task order and come back through a surrogate loss whose backward gives the
meta-gradient, so the trainer sees what it always did. Evaluation runs the same per-task code on
the task threads without a graph.

The task loop was measured on the CPU for conv4 (docs/PERFORMANCE.md, "Measurements behind the
code's choices", "Metric learners"): it beat both ``torch.func.vmap`` and folding the tasks into
one batch (exact for batch-norm only by reshaping each batch-norm's input): convolutions ran
fastest on batches of about one episode. Folding won only for a small fully connected body, and
is exact there (no batch-norm mixes the examples), so a body without convolutions or batch-norm
(``can_fold_tasks``) is still run once over every task's images, in the calling thread on the
meta-parameters themselves (the only thread building a graph on them, so the thread rule holds;
as ANIL's body features do), and its embeddings enter each task as leaves of that task's own,
whose gradients the surrogate sends back through that one pass. The comparisons still run task
by task on the task threads. (Folding was measured against the loop on one thread; against the
loop on two task threads it is not yet measured.) On a GPU one big batch probably wins; not yet
measured.

Usage (a subclass implements ``compare``, and lists any head module in ``task_modules``)::

    loss, metrics = learner.meta_train_step(batch)  # the surrogate: backward, then the optimizer
    outputs = learner.query_outputs(batch)  # [B, N*Q, N], one graph on the meta-parameters
    prototypes = class_means(support, support_y, ways)  # [B, N, D] from [B, N*K, D] embeddings
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
from metarun.execution import drivers
from metarun.execution.drivers import WorkerModules
from metarun.execution.executed import run_copy
from metarun.execution.layout import cpu_fast_layout
from metarun.execution.task_gradients import meta_gradient_surrogate

Embed = Callable[[Tensor], Tensor]
Params = dict[str, Tensor]

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


def writes_buffers_in_training(module: nn.Module) -> bool:
    """Whether a training forward pass writes a buffer (batch-norm's running statistics)."""
    return any(
        isinstance(m, _MIXES_EXAMPLES) and m.track_running_stats for m in module.modules()
    )


def embed_tasks(embed: Embed, x: Tensor, fold: bool = False) -> Tensor:
    """``[B, M, ...]`` inputs to ``[B, M, ...]`` embeddings, one forward pass per task.

    ``fold=True`` runs all tasks as one batch: only for bodies where ``can_fold_tasks``.
    """
    if fold:
        return embed(x.flatten(0, 1)).unflatten(0, x.shape[:2])
    return torch.stack([embed(cpu_fast_layout(task_x)) for task_x in x])


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

    Subclasses set ``algo_name`` and ``accepts`` (for messages) and implement ``compare`` (one
    task's outputs from its embeddings); one with head modules of its own lists them in
    ``task_modules``. ``train_ways``, ``train_shots`` and ``train_queries`` (``None``: the
    run's ``task.*``) shape the meta-training episodes only: Prototypical Networks train with
    more ways than they are tested on. Evaluation always uses ``task.*``.

    Every per-task function reads the meta-parameters only from the ``meta`` it is given, never
    from the modules: the task threads hand each task leaves of its own, evaluation detached
    tensors, ``query_outputs`` the parameters themselves.
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
        self.fold = can_fold_tasks(self.body)

    @property
    def body(self) -> nn.Module:
        """The embedding: the backbone's body (kept under ``model`` only, so saved once)."""
        return self.model.features

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

    # The modules a task runs, and how a task runs them.

    def task_modules(self) -> dict[str, tuple[str, nn.Module]]:
        """The modules a task runs, by key: (the prefix of their parameters' names among the
        meta-parameters, the module). The body here; subclasses add their heads."""
        return {"body": ("model.features.", self.body)}

    def meta_parameters(self) -> Params:
        """Every meta-parameter by name (``named_parameters``)."""
        return dict(self.named_parameters())

    def _task_net(self) -> tuple[nn.ModuleDict, dict[str, list[tuple[str, str]]]]:
        """``task_modules`` as one module (what ``WorkerModules`` copies per worker), and each
        module's parameter names paired with the meta-parameters'; made once, and again only if
        a module is replaced. Kept out of the registered submodules (its modules are saved
        where they belong)."""
        modules = self.task_modules()
        identity = tuple((key, prefix, id(module)) for key, (prefix, module) in modules.items())
        cached = self.__dict__.get("_task_net_cache")
        if cached is None or cached[0] != identity:
            known = set(self.meta_parameters())
            names = {
                key: [(local, prefix + local) for local, _ in module.named_parameters()]
                for key, (prefix, module) in modules.items()
            }
            missing = [full for pairs in names.values() for _, full in pairs if full not in known]
            if missing:
                name = type(self).__name__
                raise RuntimeError(f"{name}.task_modules: not meta-parameters: {missing}")
            net = nn.ModuleDict({key: module for key, (_, module) in modules.items()})
            cached = (identity, net, names)
            object.__setattr__(self, "_task_net_cache", cached)  # not a registered submodule
        return cached[1], cached[2]

    def run_module(self, key: str, meta: Params, *inputs: Tensor) -> Any:
        """Module ``key`` of ``task_modules`` on ``inputs`` with ``meta``'s parameters, computed
        by this thread's executed copy of it (``metarun.execution.executed``: the same function
        and gradients, faster). Each task thread has its own copies, since ``functional_call``
        swaps the parameters of the module it is given; the calling thread uses the first."""
        net, names = self._task_net()
        copies = drivers.worker_module()
        if copies is None:
            copies = self._executed.for_module(net, 1)[0]
        params = {local: meta[full] for local, full in names[key]}
        return run_copy(copies[key], net[key], params, *inputs)

    def embed_with(self, meta: Params, x: Tensor) -> Tensor:
        """The body's embeddings of ``x``, one vector per example, with ``meta``'s parameters."""
        return self.run_module("body", meta, x).flatten(1)

    def embed(self, x: Tensor) -> Tensor:
        """``embed_with`` the meta-parameters themselves."""
        return self.embed_with(self.meta_parameters(), x)

    def episode_embeddings(
        self, meta: Params, support_x: Tensor, query_x: Tensor
    ) -> tuple[Tensor, Tensor]:
        """One task's support and query embeddings, from one pass over its whole episode."""
        shots = support_x.shape[0]
        both = self.embed_with(meta, cpu_fast_layout(torch.cat([support_x, query_x])))
        return both[:shots], both[shots:]

    def folded_embeddings(self, meta: Params, batch: TaskBatch) -> Tensor | None:
        """Every task's episode embedded in one pass ``[B, S + Q, ...]`` where the body folds
        (``can_fold_tasks``); ``None`` where tasks are embedded one by one."""
        if not self.fold:
            return None
        images = torch.cat([batch.support_x, batch.query_x], dim=1)
        return self.embed_with(meta, images.flatten(0, 1)).unflatten(0, images.shape[:2])

    def compare(
        self, meta: Params, support: Tensor, support_y: Tensor, query: Tensor, ways: int,
        dtype: torch.dtype,
    ) -> Tensor:
        """One task's per-class outputs ``[N*Q, N]`` from its support embeddings and labels
        and its query embeddings; ``dtype`` is the batch's input dtype. ``scores`` turns the
        outputs into metrics."""
        raise NotImplementedError

    def task_output(
        self, meta: Params, batch: TaskBatch, task: int, ways: int, embedded: Tensor | None
    ) -> Tensor:
        """Task ``task``'s outputs ``[N*Q, N]``: its episode embedded (or its slice of the folded
        embeddings, ``embedded``), then compared."""
        if embedded is None:
            support, query = self.episode_embeddings(
                meta, batch.support_x[task], batch.query_x[task]
            )
        else:
            shots = batch.support_x.shape[1]
            support, query = embedded[:shots], embedded[shots:]
        return self.compare(
            meta, support, batch.support_y[task], query, ways, batch.support_x.dtype
        )

    def task_workers(self, batch: TaskBatch) -> int:
        """How many task threads run the tasks: ``cpu_workers``, or one where a module writes
        buffers in a training forward pass (two threads would write the same buffer)."""
        if self.training and writes_buffers_in_training(self._task_net()[0]):
            return 1
        return drivers.cpu_workers(batch.meta_batch_size, batch.query_y.device)

    def outputs_by_task(self, meta: Params, batch: TaskBatch, workers: int) -> Tensor:
        """Every task's outputs ``[B, N*Q, N]`` from ``meta``, on ``workers`` task threads (one:
        in the calling thread)."""
        ways = num_ways(batch)
        embedded = self.folded_embeddings(meta, batch)

        def work(indices: range) -> list[Tensor]:
            return [
                self.task_output(meta, batch, i, ways, None if embedded is None else embedded[i])
                for i in indices
            ]

        modules = self._executed.for_module(self._task_net()[0], workers)
        parts = drivers.run_tasks(work, batch.meta_batch_size, modules)
        return torch.stack([outputs for part in parts for outputs in part])

    def query_outputs(self, batch: TaskBatch) -> Tensor:
        """Per-class outputs ``[B, N*Q, N]`` for each query, computed in the calling thread on the
        meta-parameters themselves (one graph over every task; the definition, as tests read it:
        meta-training and evaluation use ``outputs_by_task`` on the task threads)."""
        return self.outputs_by_task(self.meta_parameters(), batch, workers=1)

    def scores(self, outputs: Tensor, query_y: Tensor) -> dict[str, Tensor]:
        """Per-task ``loss`` and ``accuracy`` ``[B]``; cross-entropy of ``outputs`` as logits."""
        return task_scores(outputs, query_y, self.task_type)

    def meta_train_step(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        """The mean of the tasks' losses, as a surrogate whose backward gives its gradient:
        each task differentiated on a task thread with leaves of its own
        (``metarun.execution.task_gradients``), the gradients summed in task order."""
        meta = self.meta_parameters()
        ways = num_ways(batch)
        embedded = self.folded_embeddings(meta, batch)
        shared = [embedded] if embedded is not None and embedded.requires_grad else []

        def one_task(leaves: Params, i: int, shared_leaves: list[Tensor]) -> dict[str, Tensor]:
            # Folded embeddings with a graph enter as this task's own leaf, never as a slice of
            # the calling thread's graph.
            task_embedded = shared_leaves[0] if shared else None
            if embedded is not None and not shared:
                task_embedded = embedded[i]
            outputs = self.task_output(leaves, batch, i, ways, task_embedded)
            return self.scores(outputs[None], batch.query_y[i][None])

        modules = self._executed.for_module(self._task_net()[0], self.task_workers(batch))
        loss, scores = meta_gradient_surrogate(
            one_task, meta, batch.meta_batch_size, shared, modules
        )
        metrics = {name: value.detach().mean().item() for name, value in scores.items()}
        return loss, metrics

    def evaluation_outputs(self, batch: TaskBatch) -> Tensor:
        """The training pass's outputs (nothing is adapted per task) from detached
        meta-parameters, on the task threads; the base class's ``evaluate`` runs it without a
        graph and scores it as logits."""
        return self.outputs_on_task_threads(batch)

    def outputs_on_task_threads(self, batch: TaskBatch) -> Tensor:
        """``outputs_by_task`` from the meta-parameters detached (no graph ends in them), on the
        task threads."""
        meta = {name: p.detach() for name, p in self.meta_parameters().items()}
        return self.outputs_by_task(meta, batch, self.task_workers(batch)).detach()
