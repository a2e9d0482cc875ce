"""Meta-gradients task by task, on the task threads, returned through one surrogate loss.

Any method whose meta-loss is a mean of per-task losses can be differentiated one task at a time:
each task's gradient is taken as soon as its loss exists and its graph freed, instead of one
backward through every task's graph (a second-order conv4 graph per task is large: what holding
a whole meta-batch's costs is in docs/PERFORMANCE.md). The per-task gradients are summed in task
order by the calling thread and handed back as a surrogate whose value is the meta-loss and whose
gradient is exactly their sum, so the trainer calls ``backward`` and the optimizer as for every
other algorithm.

Users: MAML's task loop (``MAML._meta_train_task_by_task``, and so FOMAML, Meta-SGD and ANIL)
and the metric learners (``metarun.algorithms.metric.MetricLearner.meta_train_step``: ProtoNet,
MatchingNet, RelationNet).

**The thread rule** (docs/RELIABILITY.md): no two threads ever build autograd graphs on the same
leaf tensor. Every task is differentiated with respect to leaves of its own: the meta-parameters
detached and marked ``requires_grad`` afresh for that task, never the ``nn.Parameter`` objects
themselves. PyTorch takes a leaf's gradient-accumulator mutex whenever a graph is built on it,
and a Python ``autograd.Function`` (the fused kernels) takes the GIL around the same call: two
threads on one leaf can each hold one and wait for the other, forever. A detached leaf costs a
tensor header, not a copy; it shares the parameter's storage, which nothing writes during a
meta-step.

Inputs that a shared module computed for every task (ANIL's body features, a metric learner's
folded embeddings) enter each task the same way, as detached leaves; their gradients come back
stacked and the surrogate sends them through that module once for the whole batch.

Under fp16 loss scaling each task's loss is differentiated scaled and its gradients unscaled
(``metarun.execution.precision.scaled_task_losses``): the task's float16 backward, where the
scale is needed, runs here inside the meta-step, before the trainer's scaler gets the loss.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from metarun.execution import drivers
from metarun.execution.precision import loss_scale, scaled_grad

Params = dict[str, Tensor]
#: ``task_scores(meta, task, shared)``: one task's scores (``"loss"`` among them, each of shape
#: ``[1]``) from the task's own leaves: ``meta`` (keyed like the meta-parameters) and ``shared``
#: (that task's slice of each shared input).
TaskScores = Callable[[Params, int, list[Tensor]], dict[str, Tensor]]


def own_leaves(values: Params, like: dict[str, nn.Parameter | Tensor]) -> Params:
    """Fresh leaf tensors over ``values``' storage, requiring grad where ``like``'s do."""
    return {name: v.detach().requires_grad_(like[name].requires_grad) for name, v in values.items()}


def meta_gradient_surrogate(
    task_scores: TaskScores,
    meta_params: dict[str, nn.Parameter | Tensor],
    tasks: int,
    shared: Sequence[Tensor],
    modules: Sequence[nn.Module],
) -> tuple[Tensor, dict[str, Tensor]]:
    """The surrogate meta-loss over ``tasks`` tasks, and every task's scores (``[B]`` each).

    ``modules`` are the workers' module copies (``drivers.run_tasks``): one runs every task in
    the calling thread, several run them on the task threads. Either way each task sees only
    leaves of its own, and the results are summed in task order, so the numbers do not depend
    on which thread ran what.
    """
    detached = {name: p.detach() for name, p in meta_params.items()}
    shared_detached = [x.detach() for x in shared]
    names = [name for name, p in meta_params.items() if p.requires_grad]
    totals = InOrderSum(len(names))
    scale = loss_scale()  # read here: it is the calling thread's

    def work(indices: range) -> list[tuple[list[Tensor | None], dict[str, Tensor]]]:
        results = []
        for i in indices:
            leaves = own_leaves(detached, meta_params)
            shared_leaves = [x[i].detach().requires_grad_() for x in shared_detached]
            # Like torch.func.grad in an inner loop, this works under a caller's no_grad.
            with torch.enable_grad():
                scores = task_scores(leaves, i, shared_leaves)
                task_loss = scores["loss"].sum() / tasks
                grads = scaled_grad(
                    task_loss, [*(leaves[name] for name in names), *shared_leaves], scale,
                    allow_unused=True,
                )
            totals.add(i, grads[: len(names)])
            results.append((list(grads[len(names) :]), {k: v.detach() for k, v in scores.items()}))
        return results

    parts = drivers.run_tasks(work, tasks, modules)
    per_task = [result for part in parts for result in part]
    shared_grads = [
        torch.stack(
            [torch.zeros_like(x[0]) if grads[k] is None else grads[k] for grads, _ in per_task]
        )
        for k, x in enumerate(shared_detached)
    ]
    scores = {key: torch.cat([s[key] for _, s in per_task]) for key in per_task[0][1]}
    inputs = [meta_params[name] for name in names] + list(shared)
    surrogate = _Surrogate.apply(scores["loss"].mean(), [*totals.totals, *shared_grads], *inputs)
    return surrogate, scores


class _Surrogate(torch.autograd.Function):
    """Its value is the meta-loss (the trainer's non-finite guard and any caller read the real
    number), its gradient with respect to each input the given one (times the upstream one).

    The value never depends on the gradients: an fp16 task backward that overflowed leaves
    ``inf`` in the gradient for the loss scaler to find, while the loss stays finite.
    """

    @staticmethod
    def forward(ctx: Any, loss: Tensor, grads: list[Tensor | None], *inputs: Tensor) -> Tensor:
        ctx.grads = grads
        return loss.detach().clone()

    @staticmethod
    def backward(ctx: Any, upstream: Tensor) -> tuple[Tensor | None, ...]:
        grads = [None if g is None else g * upstream for g in ctx.grads]
        return (None, None, *grads)


class InOrderSum:
    """Per-task gradients added into running totals in task order, as the tasks finish.

    A task's gradients are added as soon as every task before it has been, and held only until
    then (with two threads, rarely more than one task's): the sums are the same, bit for bit,
    whichever thread ran what, and no meta-batch's worth of gradients is kept until the end.
    Keeping them all interleaved small long-lived tensors with each task's large short-lived
    ones, and the heap grew with the fragments (measured in docs/PERFORMANCE.md).
    """

    def __init__(self, count: int) -> None:
        self.totals: list[Tensor | None] = [None] * count
        self._pending: dict[int, Sequence[Tensor | None]] = {}
        self._next = 0
        self._lock = threading.Lock()

    def add(self, task: int, grads: Sequence[Tensor | None]) -> None:
        with self._lock:
            self._pending[task] = grads
            while self._next in self._pending:
                for k, g in enumerate(self._pending.pop(self._next)):
                    if g is None:
                        continue
                    if self.totals[k] is None:
                        self.totals[k] = g
                    else:
                        self.totals[k].add_(g)
                self._next += 1
