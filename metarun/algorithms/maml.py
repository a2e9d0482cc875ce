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
(``metarun.execution.plain_norm``), which is exact; asking for ``vmap`` with second order through
layer- or instance-norm, or a batch-norm that keeps running statistics, is a ``ConfigError``.

Usage::

    maml = MAML(Conv4((1, 28, 28), 5), "classification", inner_lr=0.4, inner_steps=1)
    loss, metrics = maml.meta_train_step(batch)
    loss.backward(); optimizer.step()
    per_task = maml.evaluate(batch)  # {"loss": [B], "accuracy": [B]}
    probabilities = maml.query_probabilities(batch)  # [B, N*Q, N], after adaptation
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from metarun.algorithms.base import TASK_TYPES, MetaAlgorithm, task_loss, task_scores
from metarun.checks import positive_int, positive_number
from metarun.data.episodes import TaskBatch
from metarun.errors import ConfigError
from metarun.execution import drivers
from metarun.execution.drivers import prefers_loop, stack_results, vmap_is_exact
from metarun.execution.executed import run_copy
from metarun.execution.layout import cpu_fast_layout
from metarun.execution.precision import inner_grad, inner_loss_scale
from metarun.execution.task_gradients import meta_gradient_surrogate

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
        self._worker_modules = drivers.WorkerModules()
        self._inner_name_map: dict[str, str] | None = None

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
        and max-pool are faster: a second-order meta-step all channels-last was slower than all
        NCHW (measured in docs/PERFORMANCE.md, "Measurements behind the code's choices",
        "Layout"). See ``metarun.execution.layout``.
        """
        if self.uses_vmap or not drivers.contains(self.inner_module, (nn.Conv2d,)):
            return inputs
        return cpu_fast_layout(inputs)

    def forward_with(self, params: Params, inputs: Tensor) -> Tensor:
        """The inner module's outputs with ``params`` in place of its own parameters.

        Outside ``vmap`` a copy of the module runs, with the original's buffers: each
        task-parallel worker thread has its own, since ``functional_call`` swaps the parameters
        of the module it is given, and every copy is rewritten to compute the same function
        faster (``metarun.execution.executed``: ReLU after max-pool, fused CPU batch-norm).
        """
        module = drivers.worker_module()
        if module is None:
            if self.uses_vmap:
                return functional_call(self.inner_module, params, (inputs,))
            module = self._worker_modules.for_module(self.inner_module, 1)[0]
        return run_copy(module, self.inner_module, params, inputs)

    def _support_loss(self, params: Params, support_x: Tensor, support_y: Tensor) -> Tensor:
        outputs = self.forward_with(params, support_x)
        return task_loss(outputs, support_y, self.task_type)

    def meta_parameters(self) -> Params:
        """Every meta-parameter by name (``named_parameters``): what the per-task functions read.

        They read the meta-parameters only from the ``meta`` they are given, never from the
        module: the task-by-task driver hands each task leaves of its own
        (``metarun.execution.task_gradients``), evaluation and Reptile detached tensors.
        """
        return dict(self.named_parameters())

    def inner_params(self, meta: Params) -> Params:
        """The inner module's entries of ``meta``, keyed by the inner module's own names."""
        return {inner: meta[full] for inner, full in self._inner_names().items()}

    def _inner_names(self) -> dict[str, str]:
        """Inner module's parameter name -> the algorithm's, found once (every task asks)."""
        if self._inner_name_map is None:
            prefix = next(
                name for name, module in self.named_modules() if module is self.inner_module
            )
            prefix = f"{prefix}." if prefix else ""
            self._inner_name_map = {
                name: prefix + name for name, _ in self.inner_module.named_parameters()
            }
        return self._inner_name_map

    def inner_update(
        self, meta: Params, params: Params, grads: Params, state: dict[str, Any]
    ) -> Params:
        """One inner step from the support gradients: plain SGD with ``inner_lr``.

        The hook where the update rule differs (Meta-SGD's learned per-parameter rates, read
        from ``meta``; Reptile's Adam); ``state`` starts empty for every task's adaptation, for
        rules that carry something from one step to the next.
        """
        return {name: p - self.inner_lr * grads[name] for name, p in params.items()}

    def adapt(
        self, meta: Params, support_x: Tensor, support_y: Tensor, steps: int
    ) -> Params:
        """``steps`` SGD steps on one task's support set from the inner module's entries of
        ``meta``; differentiable unless first-order.

        ``torch.func.grad`` composes with the outer autograd graph, so with second order the
        returned parameters carry the full dependence on ``meta`` through every step.
        """
        state: dict[str, Any] = {}
        params = self.inner_params(meta)
        if self.first_order or not any(p.requires_grad for p in params.values()):
            support_x = self.fast_layout(support_x)
        for _ in range(steps):
            grads = self.support_grads(params, support_x, support_y)
            if self.first_order:
                grads = {name: g.detach() for name, g in grads.items()}
            params = self.inner_update(meta, params, grads, state)
        return params

    def support_grads(self, params: Params, support_x: Tensor, support_y: Tensor) -> Params:
        """The support loss's gradient: ``torch.func.grad`` under ``vmap``, autograd in the loop.

        ``torch.func``'s transforms are not thread-safe (two threads in ``grad`` at once fail),
        so the loop, on one thread or several, takes the same gradient with
        ``torch.autograd.grad``, keeping the graph unless first-order. Both ignore a caller's
        ``no_grad``.

        Under fp16 loss scaling the gradient is taken of ``scale * loss`` and divided by
        ``scale`` (differentiably), so its float16 backward keeps small values
        (``metarun.execution.precision``, "Inner loops"); elsewhere the scale is 1 and the
        code path is the unscaled one.
        """
        if self.uses_vmap:
            scale = inner_loss_scale()
            if scale == 1.0:
                return grad(self._support_loss)(params, support_x, support_y)
            scaled = grad(lambda *args: self._support_loss(*args) * scale)
            return {name: g / scale for name, g in
                    scaled(params, support_x, support_y).items()}
        # Parameters that carry no graph (evaluation, Reptile) are differentiated as fresh
        # leaves, and a graph is kept only where there is one to extend, as torch.func.grad does.
        keep_graph = not self.first_order and any(p.requires_grad for p in params.values())
        with torch.enable_grad():
            leaves = {
                name: p if p.requires_grad else p.detach().requires_grad_()
                for name, p in params.items()
            }
            loss = self._support_loss(leaves, support_x, support_y)
            grads = inner_grad(loss, list(leaves.values()), create_graph=keep_graph,
                               allow_unused=True)
        return {
            name: torch.zeros_like(p) if g is None else g
            for (name, p), g in zip(params.items(), grads, strict=True)
        }

    def _query_outputs(self, steps: int) -> Callable[..., Tensor]:
        def per_task(
            meta: Params, support_x: Tensor, support_y: Tensor, query_x: Tensor
        ) -> Tensor:
            adapted = self.adapt(meta, support_x, support_y, steps)
            return self.forward_with(adapted, self.fast_layout(query_x))

        return per_task

    def map_tasks(self, per_task: Callable[..., Any], shared: Any, *per_task_args: Tensor) -> Any:
        """``per_task(shared, *args[i])`` for every task ``i``, stacked along a new dim 0.

        The one place the driver is chosen: ``vmap`` over the tasks, or the loop, on the CPU's
        task threads as in meta-training (evaluation and Reptile come here). Under a caller's
        ``inference_mode`` the loop leaves it: its inner gradients are autograd's, and
        inference tensors cannot enter an autograd graph, so such inputs come in as normal
        copies. ``per_task`` may return a tensor or a (nested) tuple/dict of tensors.
        """
        if self.uses_vmap:
            in_dims = (None, *(0 for _ in per_task_args))
            with drivers.vmap_context(self.first_order):
                return vmap(per_task, in_dims=in_dims)(shared, *per_task_args)
        tasks = per_task_args[0].shape[0]

        def work(indices: range) -> list[Any]:
            return [per_task(shared, *(arg[i] for arg in per_task_args)) for i in indices]

        if torch.is_inference_mode_enabled():
            with torch.inference_mode(False), torch.no_grad():
                return self.map_tasks(
                    per_task, _normal_tensors(shared), *_normal_tensors(per_task_args)
                )
        workers = drivers.cpu_workers(tasks, per_task_args[0].device)
        modules = self._worker_modules.for_module(self.inner_module, workers)
        parts = drivers.run_tasks(work, tasks, modules)
        return stack_results([result for part in parts for result in part])

    def adapted_query_outputs(self, meta: Params, batch: TaskBatch, steps: int) -> Tensor:
        """Query outputs ``[B, M, ...]`` after adapting ``meta`` on each task's support."""
        per_task = self._query_outputs(steps)
        return self.map_tasks(per_task, meta, batch.support_x, batch.support_y, batch.query_x)

    def meta_train_step(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        meta = self.meta_parameters()
        inputs = self.task_inputs(batch)
        if self.uses_vmap:
            outputs = self.adapted_query_outputs(meta, inputs, self.inner_steps)
            scores = task_scores(outputs, batch.query_y, self.task_type)
            loss = scores["loss"].mean()
        else:
            loss, scores = self._meta_train_task_by_task(meta, inputs, batch.query_y)
        metrics = {name: value.detach().mean().item() for name, value in scores.items()}
        return loss, metrics

    def _meta_train_task_by_task(
        self, meta: Params, inputs: TaskBatch, query_y: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loop driver's meta-step: ``metarun.execution.task_gradients`` takes each task's
        meta-gradient on the task threads, with leaves of its own, and sums them.

        Inputs computed by a shared module (ANIL's body features) enter as shared inputs, so
        that module is differentiated once for the whole batch, not once per task.
        """
        per_task = self._query_outputs(self.inner_steps)
        shared = [x for x in (inputs.support_x, inputs.query_x) if x.requires_grad]
        support_x, query_x = inputs.support_x.detach(), inputs.query_x.detach()

        def one_task(leaves: Params, i: int, shared_leaves: list[Tensor]) -> dict[str, Tensor]:
            task_support_x, task_query_x = support_x[i], query_x[i]
            if inputs.support_x.requires_grad:
                task_support_x = shared_leaves[0]
            if inputs.query_x.requires_grad:
                task_query_x = shared_leaves[-1]
            outputs = per_task(leaves, task_support_x, inputs.support_y[i], task_query_x)
            return task_scores(outputs[None], query_y[i][None], self.task_type)

        tasks = query_y.shape[0]
        workers = drivers.cpu_workers(tasks, query_y.device)
        modules = self._worker_modules.for_module(self.inner_module, workers)
        return meta_gradient_surrogate(one_task, meta, tasks, shared, modules)

    def evaluation_outputs(self, batch: TaskBatch) -> Tensor:
        """Query outputs after ``test_inner_steps`` steps on each support set (the base class's
        ``evaluate`` and ``query_probabilities`` call this under ``no_grad``)."""
        # Detached params: the meta-parameters get no gradient and no graph is kept. The inner
        # gradients (torch.autograd.grad under enable_grad in the loop, torch.func.grad under
        # vmap) ignore a caller's no_grad or inference_mode, so adaptation still happens there.
        meta = {name: p.detach() for name, p in self.meta_parameters().items()}
        with torch.no_grad():
            inputs = self.task_inputs(batch)
        return self.adapted_query_outputs(meta, inputs, self.test_inner_steps).detach()


def _normal_tensors(values: Any) -> Any:
    """``values`` (a tensor, or a tuple/list/dict of them) with inference tensors cloned."""
    if isinstance(values, Tensor):
        return values.clone() if values.is_inference() else values
    if isinstance(values, dict):
        return {key: _normal_tensors(value) for key, value in values.items()}
    return type(values)(_normal_tensors(value) for value in values)
