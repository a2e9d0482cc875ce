"""MAML against a hand-written reference, finite differences and its own definitions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.maml import MAML
from metarun.data.episodes import TaskBatch
from metarun.errors import ConfigError
from metarun.models.conv4 import Conv4
from metarun.models.mlp import MLP

WAYS, SHOTS, QUERIES, TASKS = 3, 2, 2, 3
IMAGE = (1, 16, 16)  # the smallest image four 2x2 poolings leave one pixel of


def make_batch(task_type: str, input_shape: tuple, seed: int, tasks: int = TASKS) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    support_x = torch.randn(tasks, WAYS * SHOTS, *input_shape, generator=g, dtype=torch.float64)
    query_x = torch.randn(tasks, WAYS * QUERIES, *input_shape, generator=g, dtype=torch.float64)
    if task_type == "classification":
        support_y = torch.arange(WAYS).repeat_interleave(SHOTS).repeat(tasks, 1)
        query_y = torch.arange(WAYS).repeat_interleave(QUERIES).repeat(tasks, 1)
    else:
        support_y = torch.randn(tasks, WAYS * SHOTS, generator=g, dtype=torch.float64)
        query_y = torch.randn(tasks, WAYS * QUERIES, generator=g, dtype=torch.float64)
    return TaskBatch(support_x, support_y, query_x, query_y)


def make_model(backbone: str, task_type: str, seed: int = 0) -> nn.Module:
    """``mlp``, ``conv4`` (batch-norm) or ``conv4-nobn`` (conv bias, no batch-norm), float64."""
    torch.manual_seed(seed)
    out = WAYS if task_type == "classification" else 1
    if backbone == "mlp":
        return MLP((2,), out, hidden=(5, 4)).double()
    return Conv4(IMAGE, out, channels=3, batch_norm=backbone == "conv4").double()


def input_shape(backbone: str) -> tuple:
    return (2,) if backbone == "mlp" else IMAGE


# The independent reference: explicit weight lists, torch.nn.functional, per-task double loop.


def mlp_forward(weights: list[Tensor], x: Tensor) -> Tensor:
    h = x.reshape(x.shape[0], -1)
    layers = len(weights) // 2
    for i in range(layers):
        h = F.linear(h, weights[2 * i], weights[2 * i + 1])
        if i < layers - 1:
            h = F.relu(h)
    return h


def conv4_forward(weights: list[Tensor], x: Tensor) -> Tensor:
    h = x
    for block in range(4):  # conv weight, batch-norm scale, batch-norm shift
        conv_w, bn_w, bn_b = weights[3 * block : 3 * block + 3]
        h = F.conv2d(h, conv_w, padding=1)
        h = F.batch_norm(h, None, None, bn_w, bn_b, training=True, eps=1e-5)
        h = F.max_pool2d(F.relu(h), 2)
    return F.linear(h.reshape(h.shape[0], -1), weights[12], weights[13])


def conv4_nobn_forward(weights: list[Tensor], x: Tensor) -> Tensor:
    h = x
    for block in range(4):  # conv weight, conv bias
        h = F.conv2d(h, weights[2 * block], weights[2 * block + 1], padding=1)
        h = F.max_pool2d(F.relu(h), 2)
    return F.linear(h.reshape(h.shape[0], -1), weights[8], weights[9])


FORWARDS = {"mlp": mlp_forward, "conv4": conv4_forward, "conv4-nobn": conv4_nobn_forward}
PARAMETER_COUNTS = {"mlp": 6, "conv4": 14, "conv4-nobn": 10}


def reference_loss(outputs: Tensor, targets: Tensor, task_type: str) -> Tensor:
    if task_type == "classification":
        return F.cross_entropy(outputs, targets)
    return ((outputs[:, 0] - targets) ** 2).mean()


def reference_weights(model: nn.Module, backbone: str) -> list[Tensor]:
    weights = [p.detach().clone().requires_grad_() for p in model.parameters()]
    assert len(weights) == PARAMETER_COUNTS[backbone]  # the layout the forwards assume
    return weights


def reference_meta_gradient(
    backbone: str, weights: list[Tensor], batch: TaskBatch, task_type: str, lr: float, steps: int
) -> tuple[Tensor, list[Tensor]]:
    forward = FORWARDS[backbone]
    total = torch.zeros((), dtype=torch.float64)
    for t in range(batch.meta_batch_size):
        fast = weights
        for _ in range(steps):
            inner = reference_loss(forward(fast, batch.support_x[t]), batch.support_y[t], task_type)
            grads = torch.autograd.grad(inner, fast, create_graph=True)
            fast = [w - lr * g for w, g in zip(fast, grads, strict=True)]
        total = total + reference_loss(forward(fast, batch.query_x[t]), batch.query_y[t], task_type)
    meta_loss = total / batch.meta_batch_size
    return meta_loss, list(torch.autograd.grad(meta_loss, weights))


def maml_meta_gradient(maml: MAML, batch: TaskBatch) -> tuple[Tensor, list[Tensor]]:
    maml.zero_grad(set_to_none=True)
    loss, _ = maml.meta_train_step(batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in maml.model.parameters()]


def meta_loss_central_difference(
    algorithm: nn.Module, batch: TaskBatch, tensor: Tensor, flat: int, eps: float
) -> float:
    """d(meta-loss)/d(tensor.view(-1)[flat]) by central differences, ``tensor`` restored after."""
    entry = tensor.view(-1)
    with torch.no_grad():
        original = entry[flat].item()
        entry[flat] = original + eps
        plus = algorithm.meta_train_step(batch)[0].item()
        entry[flat] = original - eps
        minus = algorithm.meta_train_step(batch)[0].item()
        entry[flat] = original
    return (plus - minus) / (2 * eps)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("task_type", ["regression", "classification"])
@pytest.mark.parametrize(
    ("backbone", "driver"),
    # Second order through batch-norm under vmap runs it in plain ops
    # (metarun.execution.plain_norm).
    [
        ("mlp", "vmap"),
        ("mlp", "loop"),
        ("conv4", "vmap"),
        ("conv4", "loop"),
        ("conv4-nobn", "vmap"),
        ("conv4-nobn", "loop"),
    ],
)
def test_second_order_meta_gradient_matches_reference(
    backbone: str, task_type: str, steps: int, driver: str
) -> None:
    model = make_model(backbone, task_type)
    batch = make_batch(task_type, input_shape(backbone), seed=1)
    lr = 0.3
    expected_loss, expected = reference_meta_gradient(
        backbone, reference_weights(model, backbone), batch, task_type, lr, steps
    )
    # test_inner_steps differs on purpose: training must use inner_steps.
    maml = MAML(model, task_type, lr, steps, test_inner_steps=steps + 2, task_batching=driver)
    loss, grads = maml_meta_gradient(maml, batch)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-10)
    for got, want in zip(grads, expected, strict=True):
        assert want.abs().max() > 0  # every parameter takes part
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    # The second-order terms matter here: the gradient differs from first-order MAML's.
    fomaml = MAML(model, task_type, lr, steps, first_order=True, task_batching=driver)
    _, fo_grads = maml_meta_gradient(fomaml, batch)
    assert max((a - b).abs().max() for a, b in zip(fo_grads, grads, strict=True)) > 1e-4


@pytest.mark.parametrize(
    ("backbone", "task_type"),
    [("mlp", "regression"), ("mlp", "classification"), ("conv4", "classification")],
)
def test_meta_gradient_matches_central_finite_differences(backbone: str, task_type: str) -> None:
    model = make_model(backbone, task_type, seed=3)
    batch = make_batch(task_type, input_shape(backbone), seed=4)
    maml = MAML(model, task_type, inner_lr=0.2, inner_steps=2, task_batching="loop")
    _, grads = maml_meta_gradient(maml, batch)
    eps = 1e-6
    params = list(model.parameters())
    for index, (i, flat) in enumerate([(0, 0), (0, 3), (1, 1), (len(params) - 2, 2), (-1, 0)]):
        numeric = meta_loss_central_difference(maml, batch, params[i], flat, eps)
        analytic = grads[i].view(-1)[flat].item()
        assert analytic == pytest.approx(numeric, rel=1e-5, abs=1e-7), index


@pytest.mark.parametrize("driver", ["vmap", "loop"])
@pytest.mark.parametrize("backbone", ["mlp", "conv4"])
def test_first_order_is_query_gradient_at_adapted_parameters(backbone: str, driver: str) -> None:
    task_type, lr, steps = "classification", 0.3, 3
    model = make_model(backbone, task_type)
    batch = make_batch(task_type, input_shape(backbone), seed=2)
    forward = FORWARDS[backbone]
    expected = [torch.zeros_like(p) for p in model.parameters()]
    for t in range(batch.meta_batch_size):
        fast = [p.detach().clone().requires_grad_() for p in model.parameters()]
        for _ in range(steps):  # plain SGD on the support set; no graph kept
            inner = reference_loss(forward(fast, batch.support_x[t]), batch.support_y[t], task_type)
            grads = torch.autograd.grad(inner, fast)
            fast = [
                (w - lr * g).detach().requires_grad_() for w, g in zip(fast, grads, strict=True)
            ]
        query = reference_loss(forward(fast, batch.query_x[t]), batch.query_y[t], task_type)
        for total, g in zip(expected, torch.autograd.grad(query, fast), strict=True):
            total += g / batch.meta_batch_size
    maml = MAML(model, task_type, lr, steps, first_order=True, task_batching=driver)
    _, got = maml_meta_gradient(maml, batch)
    for g, want in zip(got, expected, strict=True):
        torch.testing.assert_close(g, want, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize(
    ("backbone", "task_type", "first_order"),
    [
        ("mlp", "regression", False),
        ("mlp", "classification", True),
        ("conv4-nobn", "classification", False),
        ("conv4", "classification", True),
        ("conv4", "classification", False),  # batch-norm in plain ops under vmap
    ],
)
def test_vmap_and_loop_drivers_agree(backbone: str, task_type: str, first_order: bool) -> None:
    model = make_model(backbone, task_type)
    batch = make_batch(task_type, input_shape(backbone), seed=5)
    results = {}
    for driver in ("vmap", "loop"):
        maml = MAML(model, task_type, 0.3, 2, first_order=first_order, task_batching=driver)
        loss, grads = maml_meta_gradient(maml, batch)
        results[driver] = (loss, grads, maml.meta_train_step(batch)[1], maml.evaluate(batch))
    (loss_v, grads_v, metrics_v, eval_v), (loss_l, grads_l, metrics_l, eval_l) = results.values()
    torch.testing.assert_close(loss_v, loss_l, rtol=0, atol=1e-12)
    for a, b in zip(grads_v, grads_l, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    assert metrics_v == pytest.approx(metrics_l, abs=1e-12)
    for name in eval_v:
        torch.testing.assert_close(eval_v[name], eval_l[name], rtol=0, atol=1e-12)


def test_auto_batching_picks_loop_for_conv_and_vmap_for_mlp() -> None:
    assert not MAML(make_model("conv4", "regression"), "regression").uses_vmap
    assert not MAML(make_model("conv4", "regression"), "regression", first_order=True).uses_vmap
    assert MAML(make_model("mlp", "regression"), "regression").uses_vmap
    assert not MAML(make_model("mlp", "regression"), "regression", task_batching="loop").uses_vmap
    # vmap gets second order through layer-norm wrong: auto falls back to the loop.
    normed = nn.Sequential(nn.Linear(2, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 1))
    assert not MAML(normed, "regression").uses_vmap
    assert MAML(normed, "regression", first_order=True).uses_vmap


@pytest.mark.parametrize("backbone", ["conv4-running-stats", "mlp-layernorm"])
def test_vmap_with_second_order_through_norm_layers_is_refused(backbone: str) -> None:
    if backbone == "conv4-running-stats":
        model = nn.Sequential(
            nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2 * 14 * 14, 1)
        )
    else:
        model = nn.Sequential(nn.Linear(2, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(ConfigError, match=r"algo\.task_batching=vmap .*functorch#534"):
        MAML(model, "regression", task_batching="vmap")
    assert MAML(model, "regression", task_batching="vmap", first_order=True).uses_vmap


def test_vmap_with_second_order_through_batch_statistics_is_allowed() -> None:
    assert MAML(make_model("conv4", "regression"), "regression", task_batching="vmap").uses_vmap


@pytest.mark.parametrize("driver", ["vmap", "loop"])
def test_batch_norm_statistics_do_not_leak_between_tasks(driver: str) -> None:
    model = make_model("conv4", "classification")
    batch = make_batch("classification", IMAGE, seed=6, tasks=4)
    # (evaluate never differentiates through the inner loop; first order only allows vmap here)
    maml = MAML(model, "classification", 0.3, 2, first_order=driver == "vmap", task_batching=driver)
    maml.eval()  # as a trainer would before evaluating: batch-norm must still be per task
    together = maml.evaluate(batch)
    for t in range(batch.meta_batch_size):
        alone = maml.evaluate(batch.task(t))
        for name in together:
            torch.testing.assert_close(alone[name], together[name][t : t + 1], rtol=0, atol=1e-12)
    # Other tasks with wildly different statistics change nothing for task 0, in training too.
    others = make_batch("classification", IMAGE, seed=7, tasks=4)
    mixed = TaskBatch(
        torch.cat([batch.support_x[:1], others.support_x[1:] * 10 + 5]),
        torch.cat([batch.support_y[:1], others.support_y[1:].flip(1)]),
        torch.cat([batch.query_x[:1], others.query_x[1:] * 10 + 5]),
        batch.query_y,
    )
    for name, value in maml.evaluate(mixed).items():
        torch.testing.assert_close(value[0], together[name][0], rtol=0, atol=1e-12)
    maml.train()
    params = maml.meta_parameters()
    outputs = maml.adapted_query_outputs(params, batch, steps=2)
    mixed_outputs = maml.adapted_query_outputs(params, mixed, steps=2)
    torch.testing.assert_close(mixed_outputs[0], outputs[0], rtol=0, atol=1e-12)
    assert not torch.allclose(mixed_outputs[1], outputs[1])


def linear_tasks(tasks: int, points: int, generator: torch.Generator) -> TaskBatch:
    """y = a * x with a random slope per task: learnable from a few points."""
    slope = torch.rand(tasks, 1, generator=generator) * 4 - 2
    support_x = torch.rand(tasks, points, 1, generator=generator) * 4 - 2
    query_x = torch.rand(tasks, points, 1, generator=generator) * 4 - 2
    return TaskBatch(support_x, slope * support_x[..., 0], query_x, slope * query_x[..., 0])


@pytest.mark.parametrize("driver", ["vmap", "loop"])
def test_evaluate_adapts_with_test_inner_steps_and_leaves_no_gradient(driver: str) -> None:
    torch.manual_seed(0)
    model = MLP((1,), 1, hidden=(8,))
    batch = linear_tasks(6, 10, torch.Generator().manual_seed(0))
    short = MAML(model, "regression", inner_lr=0.02, inner_steps=1, task_batching=driver)
    long = MAML(model, "regression", 0.02, 1, test_inner_steps=5, task_batching=driver)
    five = MAML(model, "regression", 0.02, inner_steps=5, task_batching=driver)
    with torch.no_grad():  # as the trainer calls it
        short_scores = short.evaluate(batch)
    long_scores = long.evaluate(batch)
    assert set(long_scores) == {"loss", "mse"}
    assert all(v.shape == (6,) and not v.requires_grad for v in long_scores.values())
    torch.testing.assert_close(long_scores["mse"], five.evaluate(batch)["mse"])
    with torch.inference_mode():
        torch.testing.assert_close(long.evaluate(batch)["mse"], long_scores["mse"])
    assert not torch.allclose(long_scores["mse"], short_scores["mse"])
    assert long_scores["mse"].mean() < short_scores["mse"].mean()
    assert all(p.grad is None for p in model.parameters())
    # Between a training backward and the optimizer step, evaluation changes nothing.
    long.meta_train_step(batch)[0].backward()
    before = [(p.detach().clone(), p.grad.clone()) for p in model.parameters()]
    long.evaluate(batch)
    for (value, gradient), p in zip(before, model.parameters(), strict=True):
        assert torch.equal(p, value) and torch.equal(p.grad, gradient)


def test_classification_metrics() -> None:
    model = make_model("mlp", "classification")
    batch = make_batch("classification", (2,), seed=8)
    maml = MAML(model, "classification", 0.3, 1)
    loss, metrics = maml.meta_train_step(batch)
    assert set(metrics) == {"loss", "accuracy"} and all(type(v) is float for v in metrics.values())
    assert metrics["loss"] == pytest.approx(loss.item())
    scores = maml.evaluate(batch)
    assert set(scores) == {"loss", "accuracy"} and scores["accuracy"].shape == (TASKS,)
    assert ((scores["accuracy"] >= 0) & (scores["accuracy"] <= 1)).all()
    assert metrics["accuracy"] == pytest.approx(scores["accuracy"].mean().item())


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"inner_lr": "abc"}, "algo.inner_lr"),
        ({"inner_lr": 0.0}, "algo.inner_lr"),
        ({"inner_lr": -0.1}, "algo.inner_lr"),
        ({"inner_lr": float("nan")}, "algo.inner_lr"),
        ({"inner_steps": 0}, "algo.inner_steps"),
        ({"inner_steps": 1.5}, "algo.inner_steps"),
        ({"inner_steps": "2"}, "algo.inner_steps"),
        ({"inner_steps": True}, "algo.inner_steps"),
        ({"test_inner_steps": 0}, "algo.test_inner_steps"),
        ({"first_order": "yes"}, "algo.first_order"),
        ({"task_batching": "fast"}, "algo.task_batching"),
        ({"task_type": "clustering"}, "algo.task_type"),
    ],
)
def test_bad_hyperparameters_raise_config_error_naming_the_key(overrides: dict, key: str) -> None:
    kwargs = {"model": make_model("mlp", "regression"), "task_type": "regression", **overrides}
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as error:
        MAML(**kwargs)
    assert repr(next(iter(overrides.values()))) in str(error.value)
    assert "\n" not in str(error.value)


def test_short_meta_training_lowers_post_adaptation_error() -> None:
    torch.manual_seed(0)
    maml = MAML(MLP((1,), 1, hidden=(20,)), "regression", inner_lr=0.05, inner_steps=1)
    held_out = linear_tasks(100, 10, torch.Generator().manual_seed(1))
    before = maml.evaluate(held_out)["mse"].mean().item()
    optimizer = torch.optim.Adam(maml.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(2)
    for _ in range(300):
        loss, _ = maml.meta_train_step(linear_tasks(10, 10, generator))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = maml.evaluate(held_out)["mse"].mean().item()
    # Without adaptation nothing beats predicting 0 (slopes are symmetric): mean y^2.
    best_without_adaptation = held_out.query_y.pow(2).mean().item()
    assert after < 0.5 * before
    assert after < 0.35 * best_without_adaptation


@pytest.mark.parametrize("first_order", [False, True])
def test_conv_evaluation_on_the_task_threads_equals_vmap(
    first_order: bool, task_thread_counts
) -> None:
    # Under no_grad and under inference_mode the tasks run on the CPU task threads (autograd
    # inner loop); vmap (torch.func.grad, plain-ops batch-norm) is the reference. Float64.
    torch.manual_seed(0)
    maml = MAML(Conv4((1, 16, 16), WAYS).double(), "classification", 0.4, 1, test_inner_steps=3,
                first_order=first_order)
    batch = make_batch("classification", (1, 16, 16), seed=9, tasks=5)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            threaded = maml.evaluate(batch)
        with torch.inference_mode():
            inference = maml.evaluate(batch)
    finally:
        torch.set_num_threads(threads)
    maml.task_batching = "vmap"
    with torch.no_grad():
        reference = maml.evaluate(batch)
    assert task_thread_counts == [2, 2]  # both calls ran on two threads
    for key in threaded:
        torch.testing.assert_close(threaded[key], reference[key], rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(inference[key], reference[key], rtol=1e-10, atol=1e-12)
    assert all(p.grad is None for p in maml.parameters())
