"""Meta-LSTM (Ravi & Larochelle 2017) against its definition on tiny float64 tasks.

References are independent of the module's code: the SGD step of a linear softmax classifier is
written out by hand ((softmax - onehot)^T x / n), meta-gradients are checked against central
finite differences of the meta-loss, the trainer's clip against the surrogate clip it replaced
(itself ``clip_grad_norm_``'s rule). Learning the real Omniglot is tests/test_metalstm_learning.py.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.metalstm import MetaLSTM, preprocess
from metarun.data.episodes import TaskBatch
from metarun.distributed import Parallel
from metarun.errors import ConfigError
from metarun.models.conv4 import Conv4
from metarun.models.mlp import MLP
from metarun.precision import Precision
from metarun.trainer import meta_update

WAYS, SHOTS, QUERIES, FEATURES = 3, 2, 2, 4
IMAGE = (1, 16, 16)


def make_batch(input_shape: tuple, seed: int, tasks: int = 2) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    support_x = torch.randn(tasks, WAYS * SHOTS, *input_shape, generator=g, dtype=torch.float64)
    query_x = torch.randn(tasks, WAYS * QUERIES, *input_shape, generator=g, dtype=torch.float64)
    support_y = torch.arange(WAYS).repeat_interleave(SHOTS).repeat(tasks, 1)
    query_y = torch.arange(WAYS).repeat_interleave(QUERIES).repeat(tasks, 1)
    return TaskBatch(support_x, support_y, query_x, query_y)


def make_algo(model: nn.Module, seed: int = 0, **settings) -> MetaLSTM:
    torch.manual_seed(seed)
    settings = {"meta_grad_clip": None, **settings}
    return MetaLSTM(model, "classification", **settings).double()


def linear_algo(steps: int, seed: int = 0, **settings) -> MetaLSTM:
    torch.manual_seed(seed)
    return make_algo(nn.Linear(FEATURES, WAYS).double(), seed, inner_steps=steps, **settings)


def test_preprocessing_is_andrychowicz_et_al() -> None:
    p = 10.0
    values = torch.tensor([1.0, -math.exp(-5.0), 3e-5, -1e-6, 0.0, 250.0], dtype=torch.float64)
    expected = [
        (0.0, 1.0),
        (-0.5, -1.0),
        (-1.0, 3e-5 * math.exp(p)),  # 3e-5 < e^-10 = 4.54e-5
        (-1.0, -1e-6 * math.exp(p)),
        (-1.0, 0.0),
        (math.log(250.0) / p, 1.0),
    ]
    assert torch.allclose(preprocess(values), torch.tensor(expected, dtype=torch.float64))


def fix_gates(algo: MetaLSTM, alpha: float) -> None:
    """Forget gate 1 and input gate alpha whatever the inputs: zero gate weights, and biases
    whose sigmoid is 1 (in float64: sigmoid(50) = 1 - 2e-22 rounds to 1) and alpha."""
    with torch.no_grad():
        algo.forget_weight.zero_()
        algo.input_weight.zero_()
        algo.forget_bias.fill_(50.0)
        algo.input_bias.fill_(math.log(alpha / (1 - alpha)))


def hand_sgd(weight: Tensor, bias: Tensor, x: Tensor, y: Tensor, lr: float, steps: int):
    """Plain SGD on mean softmax cross-entropy of ``x @ weight.T + bias``, gradients by hand."""
    onehot = F.one_hot(y, WAYS).double()
    for _ in range(steps):
        error = torch.softmax(x @ weight.T + bias, dim=1) - onehot  # dL/dlogits, times n
        weight = weight - lr * error.T @ x / len(x)
        bias = bias - lr * error.mean(0)
    return weight, bias


@pytest.mark.parametrize("steps", [1, 3])
def test_forget_gate_one_and_input_gate_alpha_is_sgd_with_step_alpha(steps: int) -> None:
    alpha = 0.3
    algo = linear_algo(steps)
    fix_gates(algo, alpha)
    batch = make_batch((FEATURES,), seed=1)
    x, y = batch.support_x[0], batch.support_y[0]
    with torch.no_grad():
        theta = algo.adapt(x, y, steps)
    model = algo.model
    weight, bias = hand_sgd(model.weight.detach(), model.bias.detach(), x, y, alpha, steps)
    assert torch.allclose(theta, torch.cat([weight.reshape(-1), bias]), rtol=0, atol=1e-13)
    assert not torch.allclose(weight, model.weight)  # the step moved the parameters


def meta_loss(algo: MetaLSTM, batch: TaskBatch) -> float:
    with torch.no_grad():
        return algo.meta_train_step(batch)[0].item()


def central_difference(algo: MetaLSTM, batch: TaskBatch, name: str, index: tuple) -> float:
    param = dict(algo.named_parameters())[name]
    eps = 1e-6
    with torch.no_grad():
        original = param[index].item()
        param[index] = original + eps
        plus = meta_loss(algo, batch)
        param[index] = original - eps
        minus = meta_loss(algo, batch)
        param[index] = original
    return (plus - minus) / (2 * eps)


def autograd_meta_gradient(algo: MetaLSTM, batch: TaskBatch) -> dict[str, Tensor]:
    algo.zero_grad(set_to_none=True)
    algo.meta_train_step(batch)[0].backward()
    return {name: p.grad.clone() for name, p in algo.named_parameters()}


#: Gates far from their start near SGD and large weights, so every derivative checked is sizeable.
GATES_IN_PLAY = {"input_bias_init": [-1, -1], "forget_bias_init": [2, 2], "weight_init": 0.5}
LSTM_ENTRIES = [
    ("lstm.weight_ih", (3, 1)),
    ("lstm.bias_hh", (70,)),
    ("forget_weight", (0,)),
    ("forget_weight", (-2,)),  # the weight on θ_{t-1}
    ("input_weight", (7,)),
    ("forget_bias", ()),
    ("input_bias", ()),
]


def test_one_update_meta_gradient_of_the_lstm_is_the_meta_loss_derivative() -> None:
    # With one update the learner's loss and gradient (inputs to the LSTM) are taken at c_0 and
    # do not depend on the LSTM's parameters: the meta-gradient is the exact derivative.
    algo = linear_algo(1, **GATES_IN_PLAY)
    batch = make_batch((FEATURES,), seed=2)
    grads = autograd_meta_gradient(algo, batch)
    for name, index in LSTM_ENTRIES:
        expected = central_difference(algo, batch, name, index)
        assert grads[name][index].item() == pytest.approx(expected, rel=1e-6, abs=1e-10), name
        assert abs(expected) > 1e-8, name  # a meaningful derivative, not 0 == 0


class FrozenInputs:
    """Records the learner's (loss, gradient) at the first meta-loss, then replays them: the
    meta-loss as the paper differentiates it, with those inputs held constant."""

    def __init__(self, algo: MetaLSTM) -> None:
        self.original = algo.support_loss_and_gradient
        self.recorded: list[tuple[Tensor, Tensor]] = []
        self.replaying = False
        self.position = 0
        algo.support_loss_and_gradient = self  # type: ignore[method-assign]

    def __call__(self, theta: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        if not self.replaying:
            self.recorded.append(self.original(theta, x, y))
            return self.recorded[-1]
        value = self.recorded[self.position % len(self.recorded)]
        self.position += 1
        return value


def test_meta_gradient_over_several_updates_holds_the_learners_gradients_constant() -> None:
    steps = 3
    # weight_hh reads the previous hidden state: it matters from the second update on.
    entries = [*LSTM_ENTRIES, ("lstm.weight_hh", (41, 5))]
    entries += [("model.weight", (1, 2)), ("model.bias", (0,))]
    algo = linear_algo(steps, **GATES_IN_PLAY)
    batch = make_batch((FEATURES,), seed=3)
    frozen = FrozenInputs(algo)
    grads = autograd_meta_gradient(algo, batch)
    frozen.replaying = True
    for name, index in entries:
        expected = central_difference(algo, batch, name, index)
        assert grads[name][index].item() == pytest.approx(expected, rel=1e-6, abs=1e-10), name
    # The meta-loss's full derivative in c_0 (through the learner's gradients too) differs:
    # the check above does distinguish the paper's first-order meta-gradient.
    frozen.replaying = False
    del algo.support_loss_and_gradient
    full = central_difference(algo, batch, "model.weight", (1, 2))
    assert abs(full - grads["model.weight"][1, 2].item()) > 1e-4


def conv_algo(seed: int = 0, **settings) -> MetaLSTM:
    torch.manual_seed(seed)
    return make_algo(Conv4(IMAGE, WAYS, channels=3).double(), seed, inner_steps=2, **settings)


def test_meta_gradient_reaches_the_lstm_layers_and_c0() -> None:
    algo = conv_algo()
    grads = autograd_meta_gradient(algo, make_batch(IMAGE, seed=4))
    assert set(grads) == {name for name, _ in algo.named_parameters()}
    for name, grad in grads.items():
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert any(name.startswith("model.features") for name in grads)  # c_0 includes the body


def surrogate_clip_update(algo: MetaLSTM, batch: TaskBatch, max_norm: float, lr: float) -> float:
    """The update Meta-LSTM made before the trainer clipped: the meta-train step returned a
    surrogate of the loss whose gradient is the clipped one, then a plain SGD step. Returns the
    norm before clipping."""
    loss, _ = algo.meta_train_step(batch)
    params = [p for p in algo.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    surrogate = sum((p * (g * scale)).sum() for p, g in zip(params, grads, strict=True))
    algo.zero_grad(set_to_none=True)
    (loss.detach() + (surrogate - surrogate.detach())).backward()
    torch.optim.SGD(params, lr=lr).step()
    return norm.item()


def trainer_update(algo: MetaLSTM, batch: TaskBatch, lr: float) -> float | None:
    """The trainer's update: backward, the (one-process) reduction, its clip, the step."""
    optimizer = torch.optim.SGD(algo.parameters(), lr=lr)
    loss, metrics = algo.meta_train_step(batch)
    assert "meta_grad_norm" not in metrics  # the algorithm no longer measures or clips it
    stepped, norm = meta_update(loss, 1.0, algo, optimizer, Precision(), Parallel())
    assert stepped
    return norm


def test_the_trainers_clip_makes_the_update_of_the_surrogate_clip_it_replaced() -> None:
    batch = make_batch(IMAGE, seed=5)
    plain = conv_algo(seed=1)
    reference = autograd_meta_gradient(plain, batch)
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in reference.values()])).item()
    max_norm, lr = norm / 4, 0.5
    before = conv_algo(seed=1, meta_grad_clip=max_norm)
    after = conv_algo(seed=1, meta_grad_clip=max_norm)
    start = {name: p.detach().clone() for name, p in before.named_parameters()}
    assert surrogate_clip_update(before, batch, max_norm, lr) == pytest.approx(norm, rel=1e-12)
    assert trainer_update(after, batch, lr) == pytest.approx(norm, rel=1e-12)
    moved = 0.0
    for (name, p), q in zip(before.named_parameters(), after.parameters(), strict=True):
        assert torch.allclose(q, p, rtol=0, atol=1e-15), name
        moved = max(moved, (p - start[name]).abs().max().item())
    assert moved > 1e-4  # a real, clipped step: |step| = lr * max_norm at most
    # Without a bound the trainer clips nothing and reports no norm.
    unclipped = conv_algo(seed=1)
    assert trainer_update(unclipped, batch, lr) is None
    assert any(not torch.allclose(p, q) for p, q in zip(unclipped.parameters(),
                                                         after.parameters(), strict=True))


def test_permuting_a_tasks_labels_permutes_its_outputs() -> None:
    # Equivariance needs a head that treats every class alike at c_0: its rows made equal.
    batch = make_batch(IMAGE, seed=6, tasks=1)
    permutation = torch.tensor([2, 0, 1])  # class c becomes permutation[c]
    relabelled = TaskBatch(
        batch.support_x, permutation[batch.support_y], batch.query_x, permutation[batch.query_y]
    )
    algo = conv_algo(seed=2, input_bias_init=[-1.0, -1.0])
    random_head = algo.evaluation_outputs(batch)
    assert not torch.allclose(algo.evaluation_outputs(relabelled)[..., permutation], random_head)
    with torch.no_grad():
        algo.model.head.weight.copy_(algo.model.head.weight[:1].expand(WAYS, -1))
        algo.model.head.bias.fill_(0.1)
    outputs = algo.evaluation_outputs(batch)
    assert outputs.std(-1).abs().max() > 1e-3  # the classes are told apart after adaptation
    permuted = algo.evaluation_outputs(relabelled)
    assert torch.allclose(permuted[..., permutation], outputs, rtol=0, atol=1e-10)
    # The query labels are never read: changing them changes no prediction.
    other_query_y = TaskBatch(batch.support_x, batch.support_y, batch.query_x, batch.query_y * 0)
    assert torch.equal(algo.evaluation_outputs(other_query_y), outputs)


def test_evaluation_leaves_no_gradient_on_the_meta_parameters() -> None:
    algo = conv_algo(seed=3, meta_grad_clip=0.25)
    before = {name: p.detach().clone() for name, p in algo.named_parameters()}
    batch = make_batch(IMAGE, seed=7)
    scores = algo.evaluate(batch)
    probabilities = algo.query_probabilities(batch)
    assert set(scores) == {"loss", "accuracy"} and scores["loss"].shape == (2,)
    assert not scores["loss"].requires_grad and not probabilities.requires_grad
    assert torch.allclose(probabilities.sum(-1), torch.ones(2, WAYS * QUERIES).double())
    for name, p in algo.named_parameters():
        assert p.grad is None, name
        assert torch.equal(p, before[name]), name


def test_regression_backbone_runs() -> None:
    torch.manual_seed(0)
    algo = MetaLSTM(MLP((1,), 1, hidden=(8,)), "regression", inner_steps=2)
    g = torch.Generator().manual_seed(0)
    batch = TaskBatch(*(torch.randn(2, 5, *shape, generator=g) for shape in [(1,), (), (1,), ()]))
    loss, metrics = algo.meta_train_step(batch)
    loss.backward()
    assert math.isfinite(metrics["mse"]) and algo.input_bias.grad is not None


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ({"inner_steps": 0}, "algo.inner_steps must be an integer >= 1"),
        ({"test_inner_steps": 1.5}, "algo.test_inner_steps must be an integer >= 1"),
        ({"hidden_size": 0}, "algo.hidden_size must be an integer >= 1"),
        ({"forget_bias_init": [5.0, 4.0]}, "algo.forget_bias_init must be finite [low, high]"),
        ({"input_bias_init": "low"}, "algo.input_bias_init must be a [low, high] pair"),
        ({"meta_grad_clip": 0}, "algo.meta_grad_clip must be a positive number"),
    ],
)
def test_bad_settings_fail_in_one_line(setting: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")) as error:
        MetaLSTM(nn.Linear(2, 2), "classification", **setting)
    assert "\n" not in str(error.value)
