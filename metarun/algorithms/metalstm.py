"""Meta-LSTM: an LSTM meta-learner as the learner's optimiser (Ravi & Larochelle, "Optimization as a
Model for Few-Shot Learning", ICLR 2017; authors' code: github.com/twitter/meta-learning-lstm).

The learner's parameters are the cell state of an LSTM: each of ``T`` updates on a task's support
set computes the support loss ``L_t`` and gradient ``g_t`` at ``θ_{t-1}`` and sets

    θ_t = c_t = f_t ⊙ c_{t-1} - i_t ⊙ g_t,      c_0 = the learner's initial parameters,
    f_t = σ(W_F · [h_t, θ_{t-1}, f_{t-1}] + b_F),  i_t = σ(W_I · [h_t, θ_{t-1}, i_{t-1}] + b_I),

coordinate-wise: every parameter entry is one row of a batch, with the same ``W_F, W_I, b_F, b_I``
for all of them (the paper's parameter sharing). ``h_t`` is the hidden state of a first, ordinary
LSTM layer over each entry's preprocessed ``(L_t, g_t)`` (the paper's 2-layer meta-learner; its
hidden size is 20 in the code). Preprocessing is Andrychowicz et al.'s (2016): ``x`` becomes
``(log|x| / p, sign x)`` if ``|x| >= e^-p``, else ``(-1, e^p x)``, with ``p = 10``. With ``f_t = 1``
and ``i_t = α`` the update is one SGD step of size ``α``; the gate biases start near that (forget
bias in [4, 5], input bias in [-5, -4], as the code initialises them), so training starts close to
SGD with a small step. ``f_{t-1}`` and ``i_{t-1}`` are the previous gate values (the paper's
equations), 0 before the first update; the code feeds the previous pre-activations instead.

The meta-loss is the query loss of ``θ_T``; its gradient reaches the LSTM layers and ``c_0`` (the
backbone's own parameters, which hold ``c_0``) through the cell-state recurrence and the gates.
**The learner's loss and gradient are inputs, not functions of the meta-parameters**: they are
computed on detached copies of ``θ_{t-1}`` and never differentiated through (the paper: "these
contributions to the gradients aren't important and can be ignored", which avoids second
derivatives, as Andrychowicz et al. do; the code takes them from a separate copy of the net).
``θ_{t-1}`` as a gate input is not detached. The meta-gradient's global norm is clipped at
``meta_grad_clip`` (0.25 in the code) before the optimizer step. The trainer clips
(``MetaAlgorithm.meta_grad_clip``, ``metarun.trainer.clip_meta_gradient``), after the gradients of
every process are summed and any fp16 loss scale is divided out, so under torch.distributed the
clipped gradient is the whole meta-batch's, as in one process; its norm before clipping is logged
as ``meta_grad_norm``. ``meta_train_step`` returns the plain meta-loss.

Batch-norm: every support gradient and the query pass use the statistics of the batch they are
given (``metarun.models.conv4`` keeps no running statistics), in meta-training and evaluation
alike. The paper does this in meta-training, but at meta-test normalises the query set with
running averages collected on that episode's support passes and erased before the next episode
(the code: ``learner.reset()`` per episode, ``learner.set('evaluate')`` for the query pass); here
the query set is normalised with its own statistics (transductive, per task, as every metarun
algorithm does).

Tasks of a meta-batch run one after the other in the calling thread (no task threads: every task
builds its graph on the same ``nn.Parameter`` leaves, see docs/RELIABILITY.md's thread rule).

Usage::

    metalstm = MetaLSTM(Conv4((1, 28, 28), 5), "classification", inner_steps=12)
    loss, metrics = metalstm.meta_train_step(batch)
    loss.backward()                                  # the trainer clips before its step:
    clip_grad_norm_(metalstm.parameters(), metalstm.meta_grad_clip); optimizer.step()
    per_task = metalstm.evaluate(batch)              # {"loss": [B], "accuracy": [B]}

or ``metarun algo=metalstm dataset=omniglot``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call

from metarun.algorithms.base import MetaAlgorithm, task_loss, task_scores
from metarun.checks import positive_int, positive_number
from metarun.data.episodes import TaskBatch
from metarun.errors import ConfigError
from metarun.execution.layout import cpu_fast_layout
from metarun.execution.precision import inner_grad

Params = dict[str, Tensor]
#: Andrychowicz et al.'s preprocessing constant (and the paper's).
PREPROCESS_P = 10.0


def preprocess(values: Tensor, p: float = PREPROCESS_P) -> Tensor:
    """``[...]`` -> ``[..., 2]``: ``(log|x| / p, sign x)`` where ``|x| >= e^-p``, else
    ``(-1, e^p x)``.

    Magnitude and sign apart, so gradients and losses of very different scales reach the LSTM on
    one scale."""
    large = values.abs() >= math.exp(-p)
    magnitude = values.abs().clamp_min(math.exp(-p)).log() / p
    first = torch.where(large, magnitude, torch.full_like(values, -1.0))
    second = torch.where(large, values.sign(), values * math.exp(p))
    return torch.stack([first, second], dim=-1)


def _init_range(value: object, key: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ConfigError(f"{key} must be a [low, high] pair of numbers, got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high)) or low > high:
        raise ConfigError(f"{key} must be finite [low, high] with low <= high, got {value!r}")
    return low, high


class MetaLSTM(MetaAlgorithm):
    """A coordinate-wise 2-layer LSTM that trains ``model`` in ``inner_steps`` updates per task.

    Meta-parameters: ``model``'s parameters (``c_0``), the first layer ``lstm`` and the
    meta-learner cell's ``forget_weight``, ``forget_bias``, ``input_weight``, ``input_bias``.
    ``test_inner_steps`` (default: ``inner_steps``) is used in evaluation; the paper trains for
    the number of updates it tests with. ``meta_grad_clip`` (or null) bounds the meta-gradient's
    norm; the trainer applies it. Any backbone with parameters; classification or regression.
    """

    def __init__(
        self,
        model: nn.Module,
        task_type: str,
        inner_steps: int = 12,
        test_inner_steps: int | None = None,
        hidden_size: int = 20,
        weight_init: float = 0.01,
        forget_bias_init: Sequence[float] = (4.0, 5.0),
        input_bias_init: Sequence[float] = (-5.0, -4.0),
        meta_grad_clip: float | None = 0.25,
    ) -> None:
        super().__init__(task_type)
        if not isinstance(model, nn.Module) or not any(True for _ in model.parameters()):
            raise ConfigError(
                f"algo.model must be an nn.Module with parameters, got {type(model).__name__}"
            )
        self.model = model
        self.inner_steps = positive_int(inner_steps, "algo.inner_steps")
        self.test_inner_steps = (
            self.inner_steps
            if test_inner_steps is None
            else positive_int(test_inner_steps, "algo.test_inner_steps")
        )
        hidden_size = positive_int(hidden_size, "algo.hidden_size")
        weight_init = positive_number(weight_init, "algo.weight_init")
        forget_low, forget_high = _init_range(forget_bias_init, "algo.forget_bias_init")
        input_low, input_high = _init_range(input_bias_init, "algo.input_bias_init")
        self.meta_grad_clip = None
        if meta_grad_clip is not None:
            self.meta_grad_clip = positive_number(meta_grad_clip, "algo.meta_grad_clip")
        # Layer 1 reads each entry's preprocessed (loss, gradient): 4 inputs.
        self.lstm = nn.LSTMCell(4, hidden_size)
        # Layer 2's gates read [h_t, θ_{t-1}, previous gate value]: hidden_size + 2 weights each.
        self.forget_weight = nn.Parameter(torch.empty(hidden_size + 2))
        self.input_weight = nn.Parameter(torch.empty(hidden_size + 2))
        self.forget_bias = nn.Parameter(torch.empty(()))
        self.input_bias = nn.Parameter(torch.empty(()))
        with torch.no_grad():
            for weight in (*self.lstm.parameters(), self.forget_weight, self.input_weight):
                weight.uniform_(-weight_init, weight_init)
            self.forget_bias.uniform_(forget_low, forget_high)
            self.input_bias.uniform_(input_low, input_high)

    # ------------------------------------------------------------------ the learner, flattened

    def _flatten(self, params: Params) -> Tensor:
        return torch.cat([p.reshape(-1) for p in params.values()])

    def _unflatten(self, flat: Tensor) -> Params:
        shapes = {name: p.shape for name, p in self.model.named_parameters()}
        pieces = flat.split([math.prod(shape) for shape in shapes.values()])
        pairs = zip(shapes.items(), pieces, strict=True)
        return {name: piece.view(shape) for (name, shape), piece in pairs}

    def learner_outputs(self, theta: Tensor, inputs: Tensor) -> Tensor:
        """``model``'s outputs with the flat parameter vector ``theta`` in place of its own."""
        return functional_call(self.model, self._unflatten(theta), (inputs,))

    def support_loss_and_gradient(
        self, theta: Tensor, support_x: Tensor, support_y: Tensor
    ) -> tuple[Tensor, Tensor]:
        """The support loss and its gradient at ``theta``, as constants (the paper's inputs).

        Taken on a detached copy, so nothing is differentiated through them (no second
        derivatives); works under a caller's ``no_grad``."""
        with torch.enable_grad():
            leaf = theta.detach().requires_grad_()
            loss = task_loss(self.learner_outputs(leaf, support_x), support_y, self.task_type)
            (gradient,) = inner_grad(loss, [leaf])
        return loss.detach(), gradient

    # ------------------------------------------------------------------------ the meta-learner

    @staticmethod
    def _gate(weight: Tensor, bias: Tensor, h: Tensor, theta: Tensor, previous: Tensor) -> Tensor:
        """``σ(W · [h, θ_{t-1}, gate_{t-1}] + b)`` for every coordinate (rows of ``h``)."""
        hidden = weight.shape[0] - 2
        linear = h @ weight[:hidden] + theta * weight[hidden] + previous * weight[-1]
        return torch.sigmoid(linear + bias)

    def adapt(self, support_x: Tensor, support_y: Tensor, steps: int) -> Tensor:
        """``θ_steps``, the learner's flat parameters after ``steps`` meta-learner updates from
        ``c_0`` on one task's support set (the whole set each update, as in the paper)."""
        theta = self._flatten(dict(self.model.named_parameters()))
        forget = torch.zeros_like(theta)
        input_gate = torch.zeros_like(theta)
        state: tuple[Tensor, Tensor] | None = None
        for _ in range(steps):
            loss, gradient = self.support_loss_and_gradient(theta, support_x, support_y)
            features = torch.cat(
                [preprocess(loss).expand(theta.shape[0], 2), preprocess(gradient)], dim=1
            )
            state = self.lstm(features, state)
            h = state[0]
            forget = self._gate(self.forget_weight, self.forget_bias, h, theta, forget)
            input_gate = self._gate(self.input_weight, self.input_bias, h, theta, input_gate)
            theta = forget * theta - input_gate * gradient
        return theta

    def _query_outputs(self, batch: TaskBatch, steps: int) -> Tensor:
        """``[B, M, ...]``: each task adapted on its support set, one task after the other."""
        outputs = []
        for support_x, support_y, query_x in zip(
            batch.support_x, batch.support_y, batch.query_x, strict=True
        ):
            # Images channels-last on the CPU, where conv nets run faster (no pass here is
            # differentiated twice); anything else is left as it is.
            theta = self.adapt(cpu_fast_layout(support_x), support_y, steps)
            outputs.append(self.learner_outputs(theta, cpu_fast_layout(query_x)))
        return torch.stack(outputs)

    def meta_train_step(self, batch: TaskBatch) -> tuple[Tensor, dict[str, float]]:
        outputs = self._query_outputs(batch, self.inner_steps)
        scores = task_scores(outputs, batch.query_y, self.task_type)
        loss = scores["loss"].mean()
        metrics = {name: value.detach().mean().item() for name, value in scores.items()}
        return loss, metrics

    def evaluation_outputs(self, batch: TaskBatch) -> Tensor:
        # No graph is built back to the meta-parameters; the support gradients are taken on
        # detached copies under enable_grad, so adaptation still happens under no_grad.
        with torch.no_grad():
            return self._query_outputs(batch, self.test_inner_steps)
