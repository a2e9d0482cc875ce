"""MAML: Model-Agnostic Meta-Learning (Finn, Abbeel & Levine, ICML 2017, arXiv:1703.03400).

The meta-parameters are an initialisation: each task adapts them with a few gradient steps on its
support set, and the meta-loss is the query loss of the adapted parameters, averaged over tasks.
Second-order MAML differentiates through every inner step; first-order MAML (FOMAML) treats the
inner gradients as constants, so the meta-gradient is the query gradient at the adapted point.

The inner loop is one pure function of ``(params, support_x, support_y)`` built on
``torch.func.grad`` and ``functional_call``, so the same per-task code runs either under
``torch.func.vmap`` over the meta-batch or in a Python loop over tasks (``task_batching``).

Batch-norm: backbones use batch-norm without running statistics (see ``metarun.models.conv4``),
so every forward pass normalises with the statistics of the one task's support or query set it is
given (transductive, per task, as in the MAML reference code). Nothing is shared between tasks in
either driver: under ``vmap`` the statistics are per task because each task is its own batch.
PyTorch's fused batch-norm (and layer-norm) gets second-order gradients wrong under ``vmap``
(pytorch/functorch#534), so second-order ``vmap`` runs batch-norm in plain ops
(``metarun.models.plain_norm``), which is exact; asking for ``vmap`` with second order through
layer- or instance-norm, or a batch-norm that keeps running statistics, is a ``ConfigError``.

Usage::

    maml = MAML(Conv4((1, 28, 28), 5), "classification", inner_lr=0.4, inner_steps=1)
    loss, metrics = maml.meta_train_step(batch)
    loss.backward(); optimizer.step()
    per_task = maml.evaluate(batch)  # {"loss": [B], "accuracy": [B]}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from metarun.algorithms import task_drivers
from metarun.algorithms.base import TASK_TYPES, MetaAlgorithm, task_loss, task_scores
from metarun.algorithms.task_drivers import prefers_loop, stack_results, vmap_is_exact
from metarun.checks import positive_int, positive_number
from metarun.data.episodes import TaskBatch
from metarun.errors import ConfigError
from metarun.models.execution import run_copy
from metarun.models.layout import cpu_fast_layout

Params = dict[str, Tensor]
TASK_BATCHING = ("auto", "vmap", "loop")


class MAML(MetaAlgorithm):
    """Learns an initialisation of ``model`` that adapts to a task in ``inner_steps`` SGD steps.

    ``test_inner_steps`` (default: ``inner_steps``) is used by ``evaluate``; the paper adapts
    longer at test time than during meta-training. ``task_batching`` picks the driver over the
    tasks of a meta-batch: ``vmap``, ``loop`` or ``auto`` (see ``prefers_loop``); both give the
    same numbers.
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
        if task_type not in TASK_TYPES:
            raise ConfigError(f"algo.task_type must be one of {TASK_TYPES}, got {task_type!r}")
        super().__init__(task_type)
        if not isinstance(model, nn.Module) or not any(True for _ in model.parameters()):
            raise ConfigError(
                f"algo.model must be an nn.Module with parameters, got {type(model).__name__}"
            )
        self.model = model
        self.inner_lr = positive_number(inner_lr, "algo.inner_lr")
        self.inner_steps = positive_int(inner_steps, "algo.inner_steps")
        if test_inner_steps is None:
            self.test_inner_steps = self.inner_steps
        else:
            self.test_inner_steps = positive_int(test_inner_steps, "algo.test_inner_steps")
        if not isinstance(first_order, bool):
            raise ConfigError(f"algo.first_order must be true or false, got {first_order!r}")
        self.first_order = first_order
        if task_batching not in TASK_BATCHING:
            raise ConfigError(
                f"algo.task_batching must be one of {TASK_BATCHING}, got {task_batching!r}"
            )
        if task_batching == "vmap" and not vmap_is_exact(self.inner_module, first_order):
            raise ConfigError(
                "algo.task_batching=vmap gives wrong second-order gradients through instance- "
                "or layer-norm, or a batch-norm with running statistics, in PyTorch "
                "(pytorch/functorch#534); use algo.task_batching=auto or loop, or "
                "algo.first_order=true"
            )
        self.task_batching = task_batching
        self._worker_modules = task_drivers.WorkerModules()

    @property
    def inner_module(self) -> nn.Module:
        """The module the inner loop adapts: the whole model here (ANIL adapts only its head)."""
        return self.model

    @property
    def uses_vmap(self) -> bool:
        if self.task_batching == "auto":
            return not prefers_loop(self.inner_module, self.first_order)
        return self.task_batching == "vmap"

    def task_inputs(self, batch: TaskBatch) -> TaskBatch:
        """What the inner module reads: the raw batch here (ANIL: the body's features)."""
        return batch

    # The per-task pure functions: the same code under vmap and in the loop.

    def fast_layout(self, inputs: Tensor) -> Tensor:
        """A task's images channels-last for a conv net on the CPU, in the loop drivers.

        Only for passes differentiated at most once: the query passes, and the support passes
        of first-order or evaluation adaptation. A support pass that second-order MAML
        differentiates twice stays NCHW, where PyTorch's double-backward kernels of batch-norm
        and max-pool are faster (measured: conv4 5-way 5-shot, 2 threads, 5.5 s per meta-step
        all channels-last against 4.8 s all NCHW). See ``metarun.models.layout``.
        """
        if self.uses_vmap or not task_drivers.contains(self.inner_module, (nn.Conv2d,)):
            return inputs
        return cpu_fast_layout(inputs)

    def forward_with(self, params: Params, inputs: Tensor) -> Tensor:
        """The inner module's outputs with ``params`` in place of its own parameters.

        Outside ``vmap`` a copy of the module runs, with the original's buffers: each
        task-parallel worker thread has its own, since ``functional_call`` swaps the parameters
        of the module it is given, and every copy is rewritten to compute the same function
        faster (``metarun.models.execution``: ReLU after max-pool, fused CPU batch-norm).
        """
        module = task_drivers.worker_module()
        if module is None:
            if self.uses_vmap:
                return functional_call(self.inner_module, params, (inputs,))
            module = self._worker_modules.for_module(self.inner_module, 1)[0]
        return run_copy(module, self.inner_module, params, inputs)

    def _support_loss(self, params: Params, support_x: Tensor, support_y: Tensor) -> Tensor:
        outputs = self.forward_with(params, support_x)
        return task_loss(outputs, support_y, self.task_type)

    def inner_update(self, params: Params, grads: Params, state: dict[str, Any]) -> Params:
        """One inner step from the support gradients: plain SGD with ``inner_lr``.

        The hook where the update rule differs (Meta-SGD's learned per-parameter rates,
        Reptile's Adam); ``state`` starts empty for every task's adaptation, for rules that
        carry something from one step to the next.
        """
        return {name: p - self.inner_lr * grads[name] for name, p in params.items()}

    def adapt(self, params: Params, support_x: Tensor, support_y: Tensor, steps: int) -> Params:
        """``steps`` SGD steps on one task's support set; differentiable unless first-order.

        ``torch.func.grad`` composes with the outer autograd graph, so with second order the
        returned parameters carry the full dependence on ``params`` through every step.
        """
        state: dict[str, Any] = {}
        if self.first_order or not any(p.requires_grad for p in params.values()):
            support_x = self.fast_layout(support_x)
        for _ in range(steps):
            grads = self.support_grads(params, support_x, support_y)
            if self.first_order:
                grads = {name: g.detach() for name, g in grads.items()}
            params = self.inner_update(params, grads, state)
        return params

    def support_grads(self, params: Params, support_x: Tensor, support_y: Tensor) -> Params:
        """The support loss's gradient: ``torch.func.grad``, or autograd in a worker thread.

        ``torch.func``'s transforms are not thread-safe (two threads in ``grad`` at once fail),
        so task-parallel workers take the same gradient with ``torch.autograd.grad``, keeping
        the graph unless first-order. Both ignore a caller's ``no_grad``.
        """
        if task_drivers.worker_module() is None:
            return grad(self._support_loss)(params, support_x, support_y)
        # Parameters that carry no graph (evaluation, Reptile) are differentiated as fresh
        # leaves, and a graph is kept only where there is one to extend, as torch.func.grad does.
        keep_graph = not self.first_order and any(p.requires_grad for p in params.values())
        with torch.enable_grad():
            leaves = {
                name: p if p.requires_grad else p.detach().requires_grad_()
                for name, p in params.items()
            }
            loss = self._support_loss(leaves, support_x, support_y)
            grads = torch.autograd.grad(
                loss, list(leaves.values()), create_graph=keep_graph, allow_unused=True
            )
        return {
            name: torch.zeros_like(p) if g is None else g
            for (name, p), g in zip(params.items(), grads, strict=True)
        }

    def _query_outputs(self, steps: int) -> Callable[..., Tensor]:
        def per_task(
            params: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor
        ) -> Tensor:
            adapted = self.adapt(params, support_x, support_y, steps)
            return self.forward_with(adapted, self.fast_layout(query_x))

        return per_task

    def map_tasks(self, per_task: Callable[..., Any], shared: Any, *per_task_args: Tensor) -> Any:
        """``per_task(shared, *args[i])`` for every task ``i``, stacked along a new dim 0.

        The one place the driver is chosen: ``vmap`` over the tasks, or a loop, on the CPU's
        task threads as in meta-training (evaluation and Reptile come here). Under a caller's
        ``inference_mode`` the loop stays in this thread: inference tensors cannot enter the
        autograd graph the threads' inner loop builds, while ``torch.func.grad`` takes them.
        ``per_task`` may return a tensor or a (nested) tuple/dict of tensors.
        """
        if self.uses_vmap:
            in_dims = (None, *(0 for _ in per_task_args))
            with task_drivers.vmap_context(self.first_order):
                return vmap(per_task, in_dims=in_dims)(shared, *per_task_args)
        tasks = per_task_args[0].shape[0]

        def work(indices: range) -> list[Any]:
            return [per_task(shared, *(arg[i] for arg in per_task_args)) for i in indices]

        if torch.is_inference_mode_enabled():
            return stack_results(work(range(tasks)))
        workers = task_drivers.cpu_workers(tasks, per_task_args[0].device)
        modules = self._worker_modules.for_module(self.inner_module, workers)
        parts = task_drivers.run_tasks(work, tasks, modules)
        return stack_results([result for part in parts for result in part])

    def adapted_query_outputs(self, params: Params, batch: TaskBatch, steps: int) -> Tensor:
        """Query outputs ``[B, M, ...]`` after adapting ``params`` on each task's support."""
        per_task = self._query_outputs(steps)
        return self.map_tasks(per_task, params, batch.support_x, batch.support_y, batch.query_x)

    def meta_train_step(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        params = dict(self.inner_module.named_parameters())
        inputs = self.task_inputs(batch)
        if not self.uses_vmap:
            return self._meta_train_task_by_task(params, inputs, batch.query_y)
        outputs = self.adapted_query_outputs(params, inputs, self.inner_steps)
        scores = task_scores(outputs, batch.query_y, self.task_type)
        loss = scores["loss"].mean()
        metrics = {name: value.detach().mean().item() for name, value in scores.items()}
        return loss, metrics

    def _meta_train_task_by_task(
        self, params: Params, inputs: TaskBatch, query_y: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        """The loop driver's meta-step: each task's meta-gradient is taken as soon as its query
        loss exists, and its graph freed, instead of one backward through all tasks' graphs.

        Holding every task's second-order graph until one backward used about 10x the memory of
        a task-by-task backward (conv4, 20-way 1-shot, meta-batch 32: 7.8 GB against 0.8 GB) and
        was about 2x slower on CPU (allocation and cache misses). The gradients are summed here
        and returned through a surrogate whose value is the meta-loss and whose gradient is
        exactly their sum, so the trainer still calls ``backward`` and the optimizer as for
        every algorithm. The surrogate also carries the gradient of inputs computed by a shared
        module (ANIL's body features), so that module is differentiated once for the whole
        batch, not once per task. On the CPU, tasks run on parallel threads, one at a time each (see
        ``task_drivers``); the sums are taken in task order either way.
        """
        tasks = query_y.shape[0]
        per_task = self._query_outputs(self.inner_steps)
        meta_params = [p for p in self.parameters() if p.requires_grad]
        shared = [x for x in (inputs.support_x, inputs.query_x) if x.requires_grad]

        def task_range(indices: range) -> tuple[list[Tensor | None], list[Any], list[Any]]:
            param_grads: list[Tensor | None] = [None] * len(meta_params)
            leaf_grads, task_results = [], []
            for i in indices:
                support_x, query_x = inputs.support_x[i], inputs.query_x[i]
                # A shared module's outputs enter each task as leaves: their gradient is
                # collected here and sent through the module once, by the surrogate.
                leaves = [x[i].detach().requires_grad_() for x in shared]
                if inputs.support_x.requires_grad:
                    support_x = leaves[0]
                if inputs.query_x.requires_grad:
                    query_x = leaves[-1]
                # Like torch.func.grad in the inner loop, this works under a caller's no_grad.
                with torch.enable_grad():
                    outputs = per_task(params, support_x, inputs.support_y[i], query_x)
                    scores = task_scores(outputs[None], query_y[i][None], self.task_type)
                    grads = torch.autograd.grad(
                        scores["loss"].sum() / tasks, [*meta_params, *leaves], allow_unused=True
                    )
                _add_grads(param_grads, grads[: len(meta_params)])
                leaf_grads.append(grads[len(meta_params) :])
                task_results.append({name: value.detach() for name, value in scores.items()})
            return param_grads, leaf_grads, task_results

        workers = task_drivers.cpu_workers(tasks, query_y.device)
        modules = self._worker_modules.for_module(self.inner_module, workers)
        parts = task_drivers.run_tasks(task_range, tasks, modules)
        param_grads: list[Tensor | None] = [None] * len(meta_params)
        for part_grads, _, _ in parts:
            _add_grads(param_grads, part_grads)
        leaf_grads = [g for _, part_leaves, _ in parts for g in part_leaves]
        shared_grads = [
            torch.stack(
                [torch.zeros_like(x[0]) if task[k] is None else task[k] for task in leaf_grads]
            )
            for k, x in enumerate(shared)
        ]
        task_scores_list = [s for _, _, part_scores in parts for s in part_scores]
        scores = {
            name: torch.cat([s[name] for s in task_scores_list]) for name in task_scores_list[0]
        }
        mean_loss = scores["loss"].mean()
        surrogate = sum(
            (p * g).sum() for p, g in zip(meta_params, param_grads, strict=True) if g is not None
        )
        surrogate = surrogate + sum(
            (x * g).sum() for x, g in zip(shared, shared_grads, strict=True)
        )
        # Its value is the meta-loss (so the trainer's non-finite guard and any caller read the
        # real number), its gradient the summed meta-gradient.
        surrogate = surrogate - surrogate.detach() + mean_loss
        metrics = {name: value.mean().item() for name, value in scores.items()}
        return surrogate, metrics

    def evaluate(self, batch: TaskBatch) -> dict[str, Tensor]:
        # Detached params: the meta-parameters get no gradient and no graph is kept. The inner
        # gradients come from torch.autograd.grad under enable_grad on the task threads, or from
        # torch.func.grad under a caller's inference_mode: both ignore a caller's no_grad (a
        # caller may evaluate under one), so adaptation still happens there.
        params = {name: p.detach() for name, p in self.inner_module.named_parameters()}
        with torch.no_grad():
            inputs = self.task_inputs(batch)
        outputs = self.adapted_query_outputs(params, inputs, self.test_inner_steps)
        scores = task_scores(outputs.detach(), batch.query_y, self.task_type)
        return {name: value.detach() for name, value in scores.items()}


def _add_grads(totals: list[Tensor | None], grads: Sequence[Tensor | None]) -> None:
    """``totals[k] += grads[k]`` in place of the list, where None means no gradient (yet)."""
    for k, g in enumerate(grads):
        if g is not None:
            totals[k] = g if totals[k] is None else totals[k] + g
