"""fp16 loss scaling of MAML's inner loop: support gradients that float16 flushes to zero come
back (against float64), on the task threads and under vmap; fp32/bf16 are untouched; an inner
overflow is the scaler's skip, and a real divergence still stops the run."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from metarun.algorithms.maml import MAML
from metarun.algorithms.metalstm import MetaLSTM
from metarun.data.episodes import TaskBatch
from metarun.execution.precision import scaled_task_losses
from metarun.precision import Precision
from metarun.trainer import NumericalError
from tests.runs import poison_meta_loss
from tests.test_hypernet import WAYS as hypernet_ways
from tests.test_hypernet import hypernet
from tests.test_hypernet import make_batch as make_hypernet_batch
from tests.test_maml import make_batch, make_model
from tests.test_precision import INNER_LR, INNER_STEPS, two_task_threads  # noqa: F401
from tests.test_precision_runs import _big_scale, _trainer

FEATURES, EXAMPLES, TASKS = 3, 6, 2
#: The targets' distance from the predictions. The mean-squared error's gradient per prediction,
#: 2 * 1e-8 / 6 at most, is under half float16's smallest subnormal (6e-8) and flushes to zero.
RESIDUAL = 1e-8


def nearly_fitted_task() -> tuple[nn.Module, TaskBatch]:
    """A linear regressor (zero weights: every prediction exactly 0, in float16 too) and tasks
    whose targets it misses by at most ``RESIDUAL``: a tiny loss with tiny, non-zero gradients."""
    model = nn.Linear(FEATURES, 1)
    with torch.no_grad():
        model.weight.zero_()
        model.bias.zero_()
    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(TASKS, EXAMPLES, FEATURES, generator=g)
    targets = RESIDUAL * (2 * torch.rand(TASKS, EXAMPLES, generator=g) - 1)
    return model, TaskBatch(inputs, targets, inputs, targets)


def support_gradients(maml: MAML, batch: TaskBatch) -> dict[str, Tensor]:
    """Each task's support gradient at the meta-parameters, through the algorithm's own driver
    over tasks (vmap, or the loop on the task threads)."""
    def per_task(meta: dict[str, Tensor], x: Tensor, y: Tensor) -> dict[str, Tensor]:
        return maml.support_grads(maml.inner_params(meta), x, y)

    return maml.map_tasks(per_task, maml.meta_parameters(), batch.support_x, batch.support_y)


@pytest.mark.parametrize("driver", ["vmap", "loop"])
@pytest.mark.parametrize("first_order", [False, True])
def test_scaled_fp16_support_gradients_are_the_float64_ones_where_unscaled_flush_to_zero(
    driver, first_order, two_task_threads  # noqa: F811
):
    model, batch = nearly_fitted_task()
    reference_maml = MAML(nn.Linear(FEATURES, 1).double(), "regression", task_batching="loop")
    reference_maml.model.load_state_dict(model.state_dict())
    expected = support_gradients(reference_maml, batch.to("cpu", torch.float64))
    assert all(g.abs().min() > 1e-11 for g in expected.values())  # tiny, not zero

    maml = MAML(model, "regression", first_order=first_order, task_batching=driver)
    with torch.autocast("cpu", torch.float16):
        unscaled = support_gradients(maml, batch)
        with scaled_task_losses(2.0**16) as scope:
            scaled = support_gradients(maml, batch)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in unscaled.values())  # flushed
    assert scope.inner_scaled  # on whichever thread ran the tasks
    for name, g in scaled.items():
        assert g.dtype == torch.float32
        error = ((g.double() - expected[name]).norm() / expected[name].norm()).item()
        assert error < 2e-3, (name, error)  # float16's rounding (2^-11), not a lost gradient
    if driver == "loop" and not first_order:  # the division is differentiated through
        assert all(g.requires_grad for g in scaled.values())


def test_metalstms_learner_gradient_is_loss_scaled_where_unscaled_it_flushes_to_zero():
    """The gradient Meta-LSTM feeds its meta-learner is an inner-loop float16 backward too."""
    model, batch = nearly_fitted_task()
    x, y = batch.support_x[0], batch.support_y[0]
    reference = MetaLSTM(copy.deepcopy(model), "regression").double()
    theta64 = reference._flatten(dict(reference.model.named_parameters()))
    _, expected = reference.support_loss_and_gradient(theta64, x.double(), y.double())
    assert expected.abs().min() > 1e-11  # tiny, not zero

    algo = MetaLSTM(model, "regression")
    theta = algo._flatten(dict(model.named_parameters()))
    with torch.autocast("cpu", torch.float16):
        _, unscaled = algo.support_loss_and_gradient(theta, x, y)
        with scaled_task_losses(2.0**16) as scope:
            _, scaled = algo.support_loss_and_gradient(theta, x, y)
    assert torch.equal(unscaled, torch.zeros_like(unscaled))  # flushed
    assert scope.inner_scaled
    error = ((scaled.double() - expected).norm() / expected.norm()).item()
    assert error < 2e-3, error


def test_hypernets_finetune_steps_are_loss_scaled_inner_gradients():
    """Scaled by a power of two and divided again, the float64 steps are the same bits: what
    this shows is that the fine-tuning goes through the scaling (``scope.inner_scaled``)."""
    batch = make_hypernet_batch(seed=3)
    algo = hypernet(perturb=True, finetune_steps=2, finetune_lr=0.5)
    support, _ = algo.features(batch)
    head = algo.generate_head(support, batch.support_y, hypernet_ways)
    plain = algo.finetune(head, support, batch.support_y, 2, second_order=True)
    with scaled_task_losses(4.0) as scope:
        scaled = algo.finetune(head, support, batch.support_y, 2, second_order=True)
    assert scope.inner_scaled
    for name, value in plain.items():
        assert torch.equal(scaled[name], value), name
        assert scaled[name].requires_grad  # the division is differentiated through


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fp32_and_bf16_meta_steps_are_bitwise_those_without_loss_scaling(precision):
    model = make_model("mlp", "regression").float()
    batch = make_batch("regression", (2,), seed=1).to("cpu", torch.float32)
    maml = MAML(model, "regression", INNER_LR, INNER_STEPS, task_batching="loop")
    run_precision = Precision(precision)
    results = []
    for context in (run_precision.autocast, run_precision.forward):  # no scale; the trainer's
        with context():
            loss, _ = maml.meta_train_step(batch)
        results.append([loss.detach(), *torch.autograd.grad(loss, list(maml.parameters()))])
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    assert not run_precision.inner_overflow_possible


def test_an_overflowing_inner_loop_makes_the_loss_non_finite_and_is_marked_so():
    model = make_model("mlp", "regression").float()
    batch = make_batch("regression", (2,), seed=1).to("cpu", torch.float32)
    maml = MAML(model, "regression", INNER_LR, INNER_STEPS, task_batching="loop")
    run_precision = Precision("fp16")
    # Support gradients of order 1: times 2^40, float16 overflows.
    run_precision.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    with run_precision.forward():
        loss, _ = maml.meta_train_step(batch)
    assert not torch.isfinite(loss)
    assert run_precision.inner_overflow_possible
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    before = [p.detach().clone() for p in model.parameters()]
    run_precision.skip_overflow(optimizer)  # a fresh scaler: nothing scaled through it yet
    assert run_precision.scaler.get_scale() == 2.0**39 and run_precision.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before, strict=True))
    assert all(p.grad is None for p in model.parameters())


def test_a_diverging_fp16_run_still_stops_once_the_scale_cannot_be_the_cause(tmp_path):
    """Every loss NaN from the first iteration: at scales 4 and 2 that may be the inner loop's
    overflow (skipped, scale halved), at 1 it cannot, and the run stops there."""
    trainer = _trainer(tmp_path, "trainer.precision=fp16", "algo.task_batching=loop")
    _big_scale(trainer, 4.0)
    poison_meta_loss(trainer, set(range(1, 13)))
    with pytest.raises(NumericalError, match="became nan at iteration 3"):
        trainer.run()
    assert trainer.precision.skipped_steps == 2 and trainer.precision.scaler.get_scale() == 1.0
