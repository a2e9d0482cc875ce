"""Task-parallel meta-steps (several tasks at once on CPU threads) give the same meta-gradients
as one task at a time, for every algorithm on MAML's loop driver, in float64."""

from __future__ import annotations

import pytest
import torch

from metarun.algorithms import task_drivers
from metarun.algorithms.anil import ANIL
from metarun.algorithms.maml import MAML
from metarun.algorithms.metasgd import MetaSGD
from tests.test_maml import input_shape, make_batch, make_model


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


def test_chunks_cover_every_task_once_in_order():
    assert task_drivers.chunks(5, 2) == [range(0, 2), range(2, 5)]
    assert [i for r in task_drivers.chunks(32, 3) for i in r] == list(range(32))
    assert task_drivers.cpu_workers(1, torch.device("cpu")) == 1
    assert task_drivers.cpu_workers(8, torch.device("meta")) == 1


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
    original = task_drivers.run_chunks

    def spy(work, tasks, modules):
        used.append(len(modules))
        return original(work, tasks, modules)

    task_drivers.run_chunks = spy
    try:
        loss_one, grads_one = meta_step(algorithm, batch, threads=1)
        loss_two, grads_two = meta_step(algorithm, batch, threads=2)
    finally:
        task_drivers.run_chunks = original
    assert used == [1, 2]  # the second step really ran two workers
    assert loss_two == pytest.approx(loss_one, rel=1e-12)
    assert any(g.abs().max() > 0 for g in grads_one)
    for one, two in zip(grads_one, grads_two, strict=True):
        torch.testing.assert_close(two, one, rtol=1e-10, atol=1e-12)
    # Worker threads leave torch's thread count as they found it.
    assert torch.get_num_threads() == 2
