"""Reptile, Meta-SGD and ANIL against their definitions, on tiny float64 tasks.

The references are independent of the algorithms' code: explicit weight lists, the functional
forwards of ``tests/test_maml.py``, ``torch.optim`` for Reptile's inner loop and
``torch.autograd.grad(create_graph=True)`` for the second-order ones.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.anil import ANIL
from metarun.algorithms.maml import MAML
from metarun.algorithms.metasgd import MetaSGD, rate_key
from metarun.algorithms.reptile import Reptile
from metarun.data.episodes import TaskBatch
from metarun.errors import ConfigError
from tests.test_maml import (
    FORWARDS,
    make_batch,
    make_model,
    meta_loss_central_difference,
    reference_loss,
    reference_meta_gradient,
    reference_weights,
)
from tests.test_maml import input_shape as shape_of


def meta_gradient(algo: nn.Module, batch: TaskBatch) -> tuple[Tensor, dict[str, Tensor]]:
    algo.zero_grad(set_to_none=True)
    loss, _ = algo.meta_train_step(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in algo.named_parameters()}


def model_grads(algo: nn.Module, grads: dict[str, Tensor]) -> list[Tensor]:
    """The gradients of the backbone's parameters, in ``model.parameters()`` order."""
    return [grads[f"model.{name}"] for name, _ in algo.model.named_parameters()]


# ----------------------------------------------------------------------------------- Reptile


def reference_reptile_target(
    model: nn.Module, backbone: str, batch: TaskBatch, task_type: str, **settings: object
) -> list[Tensor]:
    """mean_i φ̃_i, each φ̃_i from ``torch.optim`` steps on a fresh copy of the weights."""
    forward = FORWARDS[backbone]
    finals = []
    for t in range(batch.meta_batch_size):
        x, y = batch.support_x[t], batch.support_y[t]
        if settings["train_on_query"]:
            x, y = torch.cat([x, batch.query_x[t]]), torch.cat([y, batch.query_y[t]])
        weights = [p.detach().clone().requires_grad_() for p in model.parameters()]
        if settings["inner_optimizer"] == "adam":
            optimizer = torch.optim.Adam(weights, lr=settings["inner_lr"], betas=(0.0, 0.999))
        else:
            optimizer = torch.optim.SGD(weights, lr=settings["inner_lr"])
        for _ in range(settings["inner_steps"]):
            optimizer.zero_grad()
            reference_loss(forward(weights, x), y, task_type).backward()
            optimizer.step()
        finals.append([w.detach() for w in weights])
    return [torch.stack(per_task).mean(0) for per_task in zip(*finals, strict=True)]


@pytest.mark.parametrize(
    ("backbone", "task_type", "driver", "inner_optimizer", "train_on_query"),
    [
        ("mlp", "regression", "vmap", "sgd", False),
        ("mlp", "classification", "loop", "adam", False),
        ("mlp", "regression", "vmap", "adam", True),
        ("conv4", "classification", "loop", "sgd", True),
        # first order: vmap is exact through batch-norm
        ("conv4", "classification", "vmap", "adam", False),
    ],
)
def test_reptile_step_moves_toward_the_mean_adapted_weights(
    backbone: str, task_type: str, driver: str, inner_optimizer: str, train_on_query: bool
) -> None:
    model = make_model(backbone, task_type)
    batch = make_batch(task_type, shape_of(backbone), seed=1)
    lr = 0.05 if inner_optimizer == "adam" else 0.3
    settings = dict(
        inner_lr=lr, inner_steps=3, inner_optimizer=inner_optimizer, train_on_query=train_on_query
    )
    before = [p.detach().clone() for p in model.parameters()]
    target = reference_reptile_target(model, backbone, batch, task_type, **settings)
    reptile = Reptile(model, task_type, task_batching=driver, **settings)

    epsilon = 0.7  # not 1: the step must be a fraction of the way, not a jump to the mean
    optimizer = torch.optim.SGD(reptile.parameters(), lr=epsilon)
    loss, metrics = reptile.meta_train_step(batch)  # as the trainer drives it
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

    for p, start, goal in zip(model.parameters(), before, target, strict=True):
        assert (goal - start).abs().max() > 1e-4  # every parameter moved in the inner loop
        torch.testing.assert_close(p.detach(), start + epsilon * (goal - start))
    assert set(metrics) == {"loss", "accuracy" if task_type == "classification" else "mse"}


@pytest.mark.parametrize("inner_optimizer", ["sgd", "adam"])
def test_reptile_evaluate_adapts_on_support_with_the_inner_optimizer(inner_optimizer: str) -> None:
    backbone, task_type = "mlp", "classification"
    model = make_model(backbone, task_type)
    batch = make_batch(task_type, shape_of(backbone), seed=2)
    settings = dict(inner_lr=0.1, inner_optimizer=inner_optimizer, train_on_query=False)
    reptile = Reptile(model, task_type, inner_steps=1, test_inner_steps=4, **settings)
    with torch.no_grad():  # as a caller may evaluate
        scores = reptile.evaluate(batch)
    forward = FORWARDS[backbone]
    for t in range(batch.meta_batch_size):
        adapted = reference_reptile_target(
            model, backbone, batch.task(t), task_type, inner_steps=4, **settings
        )
        query = reference_loss(forward(adapted, batch.query_x[t]), batch.query_y[t], task_type)
        torch.testing.assert_close(scores["loss"][t], query)
    assert all(p.grad is None for p in model.parameters())
    # Training metrics are the query scores after the training adaptation (support only here).
    same_steps = Reptile(model, task_type, inner_steps=4, **settings)
    _, metrics = same_steps.meta_train_step(batch)
    assert metrics["loss"] == pytest.approx(scores["loss"].mean().item(), rel=1e-12)
    assert metrics["accuracy"] == pytest.approx(scores["accuracy"].mean().item(), rel=1e-12)


# ----------------------------------------------------------------------------------- Meta-SGD


def reference_metasgd(
    backbone: str,
    weights: list[Tensor],
    rates: list[Tensor],
    batch: TaskBatch,
    task_type: str,
    steps: int,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """θ' = θ − α ⊙ ∇L_support, by hand; the meta-gradient w.r.t. both θ and α."""
    forward = FORWARDS[backbone]
    total = torch.zeros((), dtype=torch.float64)
    for t in range(batch.meta_batch_size):
        fast = weights
        for _ in range(steps):
            inner = reference_loss(forward(fast, batch.support_x[t]), batch.support_y[t], task_type)
            grads = torch.autograd.grad(inner, fast, create_graph=True)
            fast = [w - a * g for w, a, g in zip(fast, rates, grads, strict=True)]
        total = total + reference_loss(forward(fast, batch.query_x[t]), batch.query_y[t], task_type)
    loss = total / batch.meta_batch_size
    grads = torch.autograd.grad(loss, [*weights, *rates])
    return loss, list(grads[: len(weights)]), list(grads[len(weights) :])


def metasgd_rates(metasgd: MetaSGD) -> list[Tensor]:
    return [metasgd.inner_lrs[rate_key(name)] for name, _ in metasgd.model.named_parameters()]


@pytest.mark.parametrize(
    ("backbone", "task_type", "driver", "steps"),
    [
        ("mlp", "regression", "vmap", 1),
        ("mlp", "regression", "vmap", 3),
        ("mlp", "classification", "loop", 2),
        ("conv4", "classification", "loop", 2),
        ("conv4", "classification", "vmap", 1),  # second order: batch-norm in plain ops
        ("conv4-nobn", "regression", "vmap", 1),
    ],
)
def test_metasgd_with_equal_rates_has_mamls_meta_gradient(
    backbone: str, task_type: str, driver: str, steps: int
) -> None:
    model = make_model(backbone, task_type)
    batch = make_batch(task_type, shape_of(backbone), seed=3)
    lr = 0.3
    expected_loss, expected = reference_meta_gradient(
        backbone, reference_weights(model, backbone), batch, task_type, lr, steps
    )
    metasgd = MetaSGD(model, task_type, lr, steps, task_batching=driver)
    loss, grads = meta_gradient(metasgd, batch)
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-10)
    for got, want in zip(model_grads(metasgd, grads), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    for name, _ in model.named_parameters():  # every rate is learned
        assert grads[f"inner_lrs.{rate_key(name)}"].abs().max() > 0


@pytest.mark.parametrize(
    ("backbone", "task_type", "driver", "first_order"),
    [
        ("mlp", "classification", "vmap", False),
        ("conv4", "classification", "loop", False),
        ("conv4", "regression", "vmap", True),
    ],
)
def test_metasgd_rates_get_the_reference_and_finite_difference_gradient(
    backbone: str, task_type: str, driver: str, first_order: bool
) -> None:
    model = make_model(backbone, task_type, seed=4)
    batch = make_batch(task_type, shape_of(backbone), seed=5)
    # First order is exact for the rates only with one step (the first inner gradient does not
    # depend on them); second order must be exact with several.
    steps = 1 if first_order else 2
    metasgd = MetaSGD(model, task_type, 0.2, steps, first_order=first_order, task_batching=driver)
    generator = torch.Generator().manual_seed(6)
    with torch.no_grad():  # distinct rates everywhere: nothing may rely on them being equal
        for rate in metasgd.inner_lrs.values():
            rate.mul_(0.5 + torch.rand(rate.shape, generator=generator, dtype=rate.dtype))
    loss, grads = meta_gradient(metasgd, batch)
    rates = metasgd_rates(metasgd)
    rate_grads = [grads[f"inner_lrs.{rate_key(name)}"] for name, _ in model.named_parameters()]
    if not first_order:
        weights = reference_weights(model, backbone)
        copies = [r.detach().clone().requires_grad_() for r in rates]
        want_loss, want_weights, want_rates = reference_metasgd(
            backbone, weights, copies, batch, task_type, steps
        )
        torch.testing.assert_close(loss, want_loss, rtol=0, atol=1e-10)
        for got, want in zip(
            [*model_grads(metasgd, grads), *rate_grads], [*want_weights, *want_rates], strict=True
        ):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)
    eps = 1e-6
    # The most influential entry of a few rate tensors (dead ReLUs leave some with none).
    for index in (0, 1, len(rates) - 2, len(rates) - 1):
        flat = int(rate_grads[index].abs().argmax())
        numeric = meta_loss_central_difference(metasgd, batch, rates[index], flat, eps)
        assert abs(numeric) > 1e-8  # a rate that changes nothing would pass trivially
        assert rate_grads[index].view(-1)[flat].item() == pytest.approx(numeric, rel=1e-5, abs=1e-9)


def test_metasgd_rates_are_meta_parameters_and_drive_evaluation() -> None:
    model = make_model("mlp", "regression")
    batch = make_batch("regression", (2,), seed=7)
    metasgd = MetaSGD(model, "regression", inner_lr=0.3, inner_steps=1, test_inner_steps=3)
    assert {f"inner_lrs.{rate_key(n)}" for n, _ in model.named_parameters()} <= set(
        metasgd.state_dict()
    )
    optimizer = torch.optim.Adam(metasgd.parameters(), lr=1e-2)
    before = [r.detach().clone() for r in metasgd_rates(metasgd)]
    loss, _ = metasgd.meta_train_step(batch)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(r, b) for r, b in zip(metasgd_rates(metasgd), before, strict=True))

    metasgd.zero_grad(set_to_none=True)
    scores = metasgd.evaluate(batch)
    assert all(p.grad is None for p in metasgd.parameters())
    assert not scores["mse"].requires_grad
    with torch.no_grad():  # zero rates: adaptation is a no-op, whatever test_inner_steps says
        for rate in metasgd.inner_lrs.values():
            rate.zero_()
    unadapted = (model(batch.query_x).squeeze(-1) - batch.query_y).pow(2).mean(1).detach()
    torch.testing.assert_close(metasgd.evaluate(batch)["mse"], unadapted)
    assert not torch.allclose(scores["mse"], unadapted)


# ----------------------------------------------------------------------------------- ANIL

BODY_PARAMETERS = {"mlp": 4, "conv4": 12}


def reference_body(backbone: str, weights: list[Tensor], x: Tensor) -> Tensor:
    if backbone == "mlp":
        h = x.reshape(x.shape[0], -1)
        for i in range(0, len(weights), 2):
            h = F.relu(F.linear(h, weights[i], weights[i + 1]))
        return h
    h = x
    for block in range(4):
        conv_w, bn_w, bn_b = weights[3 * block : 3 * block + 3]
        h = F.conv2d(h, conv_w, padding=1)
        h = F.batch_norm(h, None, None, bn_w, bn_b, training=True, eps=1e-5)
        h = F.max_pool2d(F.relu(h), 2)
    return h.reshape(h.shape[0], -1)


def reference_anil(
    backbone: str, weights: list[Tensor], batch: TaskBatch, task_type: str, lr: float, steps: int
) -> Tensor:
    """Per-task query losses: body features once per task, the head adapted by autograd.grad
    (through the steps when the weights require grad, else on constants)."""
    split = BODY_PARAMETERS[backbone]
    losses = []
    for t in range(batch.meta_batch_size):
        support = reference_body(backbone, weights[:split], batch.support_x[t])
        query = reference_body(backbone, weights[:split], batch.query_x[t])
        fast = [w if w.requires_grad else w.clone().requires_grad_() for w in weights[split:]]
        for _ in range(steps):
            inner = reference_loss(F.linear(support, *fast), batch.support_y[t], task_type)
            grads = torch.autograd.grad(inner, fast, create_graph=weights[0].requires_grad)
            fast = [w - lr * g for w, g in zip(fast, grads, strict=True)]
        losses.append(reference_loss(F.linear(query, *fast), batch.query_y[t], task_type))
    return torch.stack(losses)


@pytest.mark.parametrize(
    ("backbone", "task_type", "driver", "steps"),
    [
        ("mlp", "regression", "vmap", 1),
        ("mlp", "regression", "vmap", 3),
        ("mlp", "classification", "loop", 2),
        ("conv4", "classification", "loop", 1),
        ("conv4", "classification", "vmap", 2),  # the body is differentiated once: vmap is exact
        ("conv4", "regression", "vmap", 1),
    ],
)
def test_anil_meta_gradient_matches_reference(
    backbone: str, task_type: str, driver: str, steps: int
) -> None:
    model = make_model(backbone, task_type)
    batch = make_batch(task_type, shape_of(backbone), seed=8)
    lr = 0.5
    weights = [p.detach().clone().requires_grad_() for p in model.parameters()]
    expected_loss = reference_anil(backbone, weights, batch, task_type, lr, steps).mean()
    expected = torch.autograd.grad(expected_loss, weights)
    anil = ANIL(model, task_type, lr, steps, task_batching=driver)
    adapted_names: set[str] = set()
    inner_update = anil.inner_update

    def recording_update(meta, params, grads, state):
        adapted_names.update(params)
        return inner_update(meta, params, grads, state)

    anil.inner_update = recording_update  # type: ignore[method-assign]
    loss, grads = meta_gradient(anil, batch)
    assert adapted_names == {"weight", "bias"}  # the head's, and nothing of the body
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=1e-10)
    got = model_grads(anil, grads)
    for g, want in zip(got, expected, strict=True):
        torch.testing.assert_close(g, want, rtol=1e-6, atol=1e-9)
    body_grads = got[: BODY_PARAMETERS[backbone]]
    assert all(g.abs().max() > 1e-6 for g in body_grads)  # the body learns through the head
    # Not MAML's gradient (which adapts the body too) and not first order's.
    maml_grads = model_grads(anil, meta_gradient(MAML(model, task_type, lr, steps), batch)[1])
    assert max((a - b).abs().max() for a, b in zip(got, maml_grads, strict=True)) > 1e-6
    first = model_grads(
        anil, meta_gradient(ANIL(model, task_type, lr, steps, first_order=True), batch)[1]
    )
    assert max((a - b).abs().max() for a, b in zip(got, first, strict=True)) > 1e-6


def test_anil_evaluate_adapts_only_the_head_and_leaves_no_gradient() -> None:
    model = make_model("conv4", "classification")
    batch = make_batch("classification", shape_of("conv4"), seed=9)
    anil = ANIL(model, "classification", inner_lr=0.5, inner_steps=1, test_inner_steps=3)
    weights = [p.detach().clone() for p in model.parameters()]
    with torch.inference_mode():  # as a caller may evaluate
        scores = anil.evaluate(batch)
    expected = reference_anil("conv4", weights, batch, "classification", lr=0.5, steps=3)
    torch.testing.assert_close(scores["loss"], expected.detach())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))


def headless_mlp() -> nn.Module:
    model = make_model("mlp", "regression")
    model.head = nn.Identity()
    return model


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: nn.Sequential(nn.Linear(2, 4), nn.ReLU(), nn.Linear(4, 1)), r"\.features and "),
        (lambda: type("Bodyless", (nn.Module,), {})(), r"\.features and "),
        (headless_mlp, "head has no parameters"),
    ],
)
def test_anil_refuses_backbones_without_body_and_head(make, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"^algo=anil .*{message}") as error:
        ANIL(make(), "regression")
    assert "\n" not in str(error.value)


# ----------------------------------------------------------------------------------- shared


@pytest.mark.parametrize(
    ("algorithm", "settings", "backbone", "task_type"),
    [
        (Reptile, {"inner_optimizer": "adam"}, "mlp", "regression"),
        (Reptile, {"train_on_query": True}, "conv4", "classification"),
        (MetaSGD, {}, "mlp", "classification"),
        (MetaSGD, {}, "conv4-nobn", "regression"),
        (MetaSGD, {"first_order": True}, "conv4", "classification"),
        (ANIL, {}, "mlp", "regression"),
        (ANIL, {}, "conv4", "classification"),
    ],
)
def test_vmap_and_loop_drivers_agree(
    algorithm: type, settings: dict, backbone: str, task_type: str
) -> None:
    batch = make_batch(task_type, shape_of(backbone), seed=10)
    results = {}
    for driver in ("vmap", "loop"):
        model = make_model(backbone, task_type)
        algo = algorithm(model, task_type, 0.3, 2, task_batching=driver, **settings)
        assert algo.uses_vmap == (driver == "vmap")
        loss, grads = meta_gradient(algo, batch)
        results[driver] = (loss, grads, algo.meta_train_step(batch)[1], algo.evaluate(batch))
    (loss_v, grads_v, metrics_v, eval_v), (loss_l, grads_l, metrics_l, eval_l) = results.values()
    torch.testing.assert_close(loss_v, loss_l, rtol=0, atol=1e-12)
    assert grads_v.keys() == grads_l.keys()
    for name in grads_v:
        torch.testing.assert_close(grads_v[name], grads_l[name], rtol=0, atol=1e-11)
    assert metrics_v == pytest.approx(metrics_l, abs=1e-12)
    for name in eval_v:
        torch.testing.assert_close(eval_v[name], eval_l[name], rtol=0, atol=1e-11)


def test_auto_drivers() -> None:
    conv, mlp = make_model("conv4", "classification"), make_model("mlp", "regression")
    assert not Reptile(conv, "classification").uses_vmap  # per-task conv weights: loop
    assert Reptile(mlp, "regression").uses_vmap
    assert not MetaSGD(conv, "classification").uses_vmap
    assert MetaSGD(mlp, "regression").uses_vmap
    assert not ANIL(conv, "classification").uses_vmap  # a conv body: the loop is faster
    assert ANIL(mlp, "regression").uses_vmap
    assert ANIL(conv, "classification", task_batching="vmap").uses_vmap  # second order allowed
    # Second order through batch statistics runs under vmap (batch-norm in plain ops); through
    # layer-norm it is refused.
    assert MetaSGD(conv, "classification", task_batching="vmap").uses_vmap
    normed = nn.Sequential(nn.Linear(2, 4), nn.LayerNorm(4), nn.ReLU(), nn.Linear(4, 1))
    with pytest.raises(ConfigError, match=r"algo\.task_batching=vmap"):
        MetaSGD(normed, "regression", task_batching="vmap")


@pytest.mark.parametrize(
    ("algorithm", "overrides", "key"),
    [
        (Reptile, {"inner_optimizer": "rmsprop"}, "algo.inner_optimizer"),
        (Reptile, {"inner_betas": [0.9]}, "algo.inner_betas"),
        (Reptile, {"inner_betas": [0.9, 1.0]}, "algo.inner_betas"),
        (Reptile, {"inner_betas": "abc"}, "algo.inner_betas"),
        (Reptile, {"train_on_query": "yes"}, "algo.train_on_query"),
        (Reptile, {"inner_lr": 0.0}, "algo.inner_lr"),
        (Reptile, {"inner_steps": 0}, "algo.inner_steps"),
        (Reptile, {"test_inner_steps": -1}, "algo.test_inner_steps"),
        (Reptile, {"task_batching": "fast"}, "algo.task_batching"),
        (MetaSGD, {"inner_lr": -0.1}, "algo.inner_lr"),
        (MetaSGD, {"inner_lr": float("inf")}, "algo.inner_lr"),
        (MetaSGD, {"inner_steps": 1.5}, "algo.inner_steps"),
        (MetaSGD, {"first_order": "no"}, "algo.first_order"),
        (ANIL, {"inner_lr": "abc"}, "algo.inner_lr"),
        (ANIL, {"test_inner_steps": 0}, "algo.test_inner_steps"),
        (ANIL, {"task_type": "ranking"}, "algo.task_type"),
    ],
)
def test_bad_hyperparameters_raise_config_error_naming_the_key(
    algorithm: type, overrides: dict, key: str
) -> None:
    kwargs = {"model": make_model("mlp", "regression"), "task_type": "regression", **overrides}
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as error:
        algorithm(**kwargs)
    assert repr(next(iter(overrides.values()))) in str(error.value)
    assert "\n" not in str(error.value)
