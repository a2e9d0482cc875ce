"""Task-parallel meta-steps (several tasks at once on CPU threads) give the same meta-gradients
as one task at a time, for every algorithm on MAML's loop driver and for the metric learners, in
float64; and no task thread builds a graph on the meta-parameters (the thread rule)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from metarun.algorithms.anil import ANIL
from metarun.algorithms.maml import MAML
from metarun.algorithms.matchingnet import MatchingNet
from metarun.algorithms.metasgd import MetaSGD
from metarun.algorithms.protonet import ProtoNet
from metarun.algorithms.relationnet import RelationNet
from metarun.execution import drivers
from tests.test_maml import input_shape, make_batch, make_model
from tests.test_metric_algorithms import single_graph_meta_gradients


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def meta_step(algorithm, batch, threads: int) -> tuple[float, list[torch.Tensor]]:
    torch.set_num_threads(threads)
    algorithm.zero_grad(set_to_none=True)
    loss, _ = algorithm.meta_train_step(batch)
    loss.backward()
    grads = [
        torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in algorithm.parameters()
    ]
    return loss.item(), grads


def test_every_task_runs_once_and_results_come_back_in_task_order():
    modules = [nn.Linear(1, 1), nn.Linear(1, 1)]
    ran = []

    def work(indices: range) -> list[int]:
        ran.extend(indices)
        return [i * 10 for i in indices]

    assert drivers.run_tasks(work, 7, modules) == [[i * 10] for i in range(7)]
    assert sorted(ran) == list(range(7))
    assert drivers.run_tasks(work, 3, modules[:1]) == [[0, 10, 20]]  # one call, in place
    assert drivers.cpu_workers(1, torch.device("cpu")) == 1
    assert drivers.cpu_workers(8, torch.device("meta")) == 1


def test_a_slow_task_holds_up_only_its_own_worker():
    # Task 0 finishes only once every other task has: with fixed halves of the meta-batch its
    # worker would own tasks 1-2 as well and wait forever (here: time out and fail).
    tasks, others_done, done = 6, threading.Event(), []

    def work(indices: range) -> str:
        (task,) = indices
        if task == 0:
            assert others_done.wait(timeout=30), "the other worker did not take the other tasks"
        else:
            done.append(task)
            if len(done) == tasks - 1:
                others_done.set()
        return threading.current_thread().name

    names = drivers.run_tasks(work, tasks, [nn.Linear(1, 1), nn.Linear(1, 1)])
    assert names[0] not in names[1:]  # one worker held task 0 while the other did the rest


@pytest.mark.parametrize(
    ("algo", "first_order"),
    [("maml", False), ("maml", True), ("metasgd", False), ("anil", False)],
)
def test_two_workers_match_one_task_at_a_time(algo, first_order, restore_threads):
    model = make_model("conv4", "classification", seed=5)
    batch = make_batch("classification", input_shape("conv4"), seed=6, tasks=5)
    kind = {"maml": MAML, "metasgd": MetaSGD, "anil": ANIL}[algo]
    algorithm = kind(model, "classification", 0.3, 2, first_order=first_order, task_batching="loop")

    used = []
    original = drivers.run_tasks

    def spy(work, tasks, modules):
        used.append(len(modules))
        return original(work, tasks, modules)

    drivers.run_tasks = spy
    try:
        loss_one, grads_one = meta_step(algorithm, batch, threads=1)
        loss_two, grads_two = meta_step(algorithm, batch, threads=2)
    finally:
        drivers.run_tasks = original
    assert used == [1, 2]  # the second step really ran two workers
    assert loss_two == pytest.approx(loss_one, rel=1e-12)
    assert any(g.abs().max() > 0 for g in grads_one)
    for one, two in zip(grads_one, grads_two, strict=True):
        torch.testing.assert_close(two, one, rtol=1e-10, atol=1e-12)
    # Worker threads leave torch's thread count as they found it.
    assert torch.get_num_threads() == 2


def graph_leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors an autograd graph from ``tensors`` accumulates into."""
    leaves, seen = [], set()
    stack = [t.grad_fn for t in tensors if t.grad_fn is not None]
    leaves += [t for t in tensors if t.grad_fn is None and t.requires_grad]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


METRIC = {"protonet": ProtoNet, "matchingnet": MatchingNet, "relationnet": RelationNet}


def metric_learner(name: str, body: str, seed: int = 5):
    """A metric learner (``matchingnet-fce``: with full-context embeddings) on a float64 conv4
    (batch-norm, so tasks are embedded one by one) or mlp (folded) body."""
    kind, _, fce = name.partition("-")
    kwargs = {"fce": True} if fce else {}
    model = make_model(body, "classification", seed=seed)
    return METRIC[kind](model, "classification", **kwargs).double()


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize(
    ("algo", "body"),
    [
        ("protonet", "conv4"), ("protonet", "mlp"), ("matchingnet", "conv4"),
        ("matchingnet", "mlp"), ("matchingnet-fce", "conv4"), ("matchingnet-fce", "mlp"),
        ("relationnet", "conv4"),
    ],
)
def test_metric_learners_on_the_task_threads_give_the_single_graph_meta_gradients(
    algo, body, workers, restore_threads, monkeypatch, task_thread_counts
):
    # The definition: every task in the calling thread, the modules as written, one graph on the
    # meta-parameters, the mean of the tasks' losses, one backward. The driver: each task on a
    # task thread with leaves of its own, its executed copies, the gradients summed in order.
    algorithm = metric_learner(algo, body)
    batch = make_batch("classification", input_shape(body), seed=6, tasks=4)
    torch.set_num_threads(workers)
    loss, grads = meta_step(algorithm, batch, threads=workers)
    assert task_thread_counts == [workers]
    monkeypatch.undo()
    expected_loss, expected = single_graph_meta_gradients(algorithm, batch, monkeypatch)
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    names = [name for name, _ in algorithm.named_parameters()]
    for name, got, want in zip(names, grads, expected, strict=True):
        if not name.startswith("model.head"):  # the backbone's head, unused
            assert want.abs().max() > 0, name
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


THREAD_RULE_CASES = [
    "maml", "fomaml", "metasgd", "anil", "reptile",
    "protonet", "protonet-mlp", "matchingnet", "matchingnet-fce", "relationnet",
]


@pytest.mark.parametrize("algo", THREAD_RULE_CASES)
def test_worker_threads_never_build_graphs_on_the_meta_parameters(algo, restore_threads):
    # The thread rule (docs/RELIABILITY.md): every graph a task thread builds ends in leaves of
    # that task's own, never in an nn.Parameter another thread builds on too.
    from metarun.algorithms.reptile import Reptile

    name, _, body = algo.partition("-")
    metric = name in METRIC
    if body != "mlp":
        body = "conv4"
    model = make_model(body, "classification", seed=5)
    batch = make_batch("classification", input_shape(body), seed=6, tasks=6)
    if algo == "reptile":
        algorithm = Reptile(model, "classification", 0.1, 2, task_batching="loop")
    elif metric:
        algorithm = metric_learner(algo.removesuffix("-mlp"), body)
    else:
        kind = {"maml": MAML, "fomaml": MAML, "metasgd": MetaSGD, "anil": ANIL}[algo]
        algorithm = kind(model, "classification", 0.3, 2, first_order=algo == "fomaml",
                         task_batching="loop")
    parameters = list(algorithm.parameters())
    main = threading.main_thread()
    seen_threads, offending = set(), []

    def record(outputs, *inputs):
        if threading.current_thread() is not main:
            seen_threads.add(threading.current_thread().name)
            for leaf in graph_leaves(outputs, *inputs):
                if any(leaf is p for p in parameters):
                    offending.append(threading.current_thread().name)

    if metric:
        task_output = algorithm.task_output

        def recording_task_output(meta, task_batch, task, ways, embedded):
            outputs = task_output(meta, task_batch, task, ways, embedded)
            record(outputs, *meta.values(), *([] if embedded is None else [embedded]))
            return outputs

        algorithm.task_output = recording_task_output  # type: ignore[method-assign]
    else:
        forward_with = algorithm.forward_with

        def recording_forward_with(params, inputs):
            outputs = forward_with(params, inputs)
            record(outputs, *params.values(), inputs)
            return outputs

        algorithm.forward_with = recording_forward_with  # type: ignore[method-assign]
    torch.set_num_threads(2)
    loss, _ = algorithm.meta_train_step(batch)
    loss.backward()
    algorithm.evaluate(batch)
    assert len(seen_threads) == 2  # both task threads ran, in training and evaluation
    assert offending == []
    trained = [p for name, p in algorithm.named_parameters()
               if not (metric and name.startswith("model.head"))]  # unused by metric learners
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in trained)
