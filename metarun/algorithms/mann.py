"""MANN: Meta-Learning with Memory-Augmented Neural Networks (Santoro, Bartunov, Botvinick,
Wierstra & Lillicrap, ICML 2016, arXiv:1605.06065).

An LSTM controller reads the episode one step at a time, its input ``[body(x_t), one-hot
y_{t-1}, r_{t-1}]`` (the label one step late, ``metarun.data.sequences``, and the previous
step's reads), and predicts ``y_t`` from ``[h_t, r_t]``: a label comes one step after its image,
so the network must hold an image until its label arrives (sec. 2). The external memory ``M``
(``memory_slots`` x ``memory_size``) is accessed by Least Recently Used Access (sec. 3):

- read, per head: ``w^r_t(i) = softmax_i(cos(k_t, M_t(i)))``, ``r_t = sum_i w^r_t(i) M_t(i)``;
- write: ``w^w_t = sigmoid(alpha_t) w^r_{t-1} + (1 - sigmoid(alpha_t)) w^lu_{t-1}``, either the
  slot just read or the least-used one, whose content is set to zero before writing;
  ``M_t(i) = M_{t-1}(i) + w^w_t(i) a_t``;
- usage: ``w^u_t = gamma w^u_{t-1} + w^r_t + w^w_t`` (summed over heads). The paper's ``w^lu``
  marks the ``n`` least-used slots for ``n`` heads; here head ``h`` writes to the ``h``-th least
  used (as tristandeleu/ntm-one-shot), so heads never collide, and all ``n`` are zeroed first.

Key ``k_t``, gate ``alpha_t`` and the written vector ``a_t`` come from ``h_t`` by a linear map
(``tanh`` on ``k`` and ``a``). The paper writes the key itself (``a_t = k_t``: ``write_key:
true``); by default a separate vector is written, as in the public implementations
(tristandeleu/ntm-one-shot, snowkylin/ntm), so what a step stores need not be what it looks up.

The episode: the support steps run one by one; then one more step with a blank image and the
last support label (``EpisodeSequence.last_label``), which the one-step shift would otherwise
never show; then every query is one step from that same state, all in parallel, none writing
for another. The loss covers every support step and the queries (``support_loss``), as the
paper trains on every step.

Sizes: 200 LSTM units, a 128 x 40 memory and 4 read heads, the paper's Omniglot model as
tristandeleu/ntm-one-shot sets it; the usage decay ``gamma`` is 0.95 in both public
implementations.

Usage::

    mann = MANN(Conv4((1, 28, 28), 5), "classification")
    loss, metrics = mann.meta_train_step(batch)
    loss.backward(); optimizer.step()

or ``metarun algo=mann dataset=omniglot``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.sequence import SequenceLearner
from metarun.checks import positive_int
from metarun.data.sequences import EpisodeSequence
from metarun.errors import ConfigError

#: What the memory starts from: a small constant, so cosine similarities are defined.
MEMORY_START = 1e-6
#: The write gate's initial bias: sigmoid(-2) ~ 0.12, so an untrained controller writes mostly to
#: the least-used slot (a fresh one per item) rather than smearing over what it last read. On
#: Omniglot (tests/test_mann.py's small sizes) it left chance by iteration 150-250 in three seeds,
#: against about 300 with a zero bias in one.
WRITE_GATE_BIAS = -2.0


class MemoryState(NamedTuple):
    """Everything a step hands the next, each ``[B, ...]``."""

    hidden: Tensor  # [B, controller]
    cell: Tensor  # [B, controller]
    memory: Tensor  # [B, slots, size]
    usage: Tensor  # [B, slots]
    read_weights: Tensor  # [B, heads, slots]
    reads: Tensor  # [B, heads, size]


def cosine_read_weights(keys: Tensor, memory: Tensor, eps: float = 1e-8) -> Tensor:
    """``keys [B, H, D]``, ``memory [B, M, D]`` -> softmax over slots of cosine similarity."""
    dots = keys @ memory.transpose(1, 2)
    norms = keys.norm(dim=-1, keepdim=True) * memory.norm(dim=-1).unsqueeze(1)
    return torch.softmax(dots / norms.clamp_min(eps), dim=-1)


def least_used(usage: Tensor, count: int) -> Tensor:
    """Indices ``[B, count]`` of the ``count`` least-used slots, least used first (ties: lower
    index first)."""
    return usage.argsort(dim=1, stable=True)[:, :count]


def lrua_write(
    memory: Tensor, usage: Tensor, read_weights: Tensor, gate: Tensor, content: Tensor
) -> tuple[Tensor, Tensor]:
    """One LRUA write from the previous step's ``usage [B, M]`` and ``read_weights [B, H, M]``:
    ``gate [B, H, 1]`` is ``sigmoid(alpha)``, ``content [B, H, D]`` what each head writes.
    Returns the new memory and the write weights ``[B, H, M]``."""
    heads, slots = read_weights.shape[1:]
    least = F.one_hot(least_used(usage, heads), slots).to(memory.dtype)  # [B, H, M]
    write_weights = gate * read_weights + (1 - gate) * least
    cleared = memory * (1 - least.sum(1)).unsqueeze(-1)
    return cleared + write_weights.transpose(1, 2) @ content, write_weights


class MANN(SequenceLearner):
    """An LSTM controller with an LRUA memory over the backbone body's embeddings."""

    algo_name = "mann"

    def __init__(
        self,
        model: nn.Module,
        task_type: str,
        controller_size: int = 200,
        memory_slots: int = 128,
        memory_size: int = 40,
        read_heads: int = 4,
        usage_decay: float = 0.95,
        write_key: bool = False,
        support_loss: bool = True,
        embedding_norm: bool = True,
        train_shots: int | None = None,
    ) -> None:
        super().__init__(model, task_type, support_loss, embedding_norm, train_shots)
        self.controller_size = positive_int(controller_size, "algo.controller_size")
        self.memory_slots = positive_int(memory_slots, "algo.memory_slots")
        self.memory_size = positive_int(memory_size, "algo.memory_size")
        self.read_heads = positive_int(read_heads, "algo.read_heads")
        if self.read_heads > self.memory_slots:
            raise ConfigError(
                f"algo.read_heads={read_heads} is more than algo.memory_slots={memory_slots}; "
                "each head writes its own least-used slot, so use at most as many heads as slots"
            )
        is_number = isinstance(usage_decay, int | float) and not isinstance(usage_decay, bool)
        if not is_number or not 0.0 <= usage_decay <= 1.0:
            raise ConfigError(f"algo.usage_decay must be a number in [0, 1], got {usage_decay!r}")
        if not isinstance(write_key, bool):
            raise ConfigError(f"algo.write_key must be true or false, got {write_key!r}")
        self.usage_decay = float(usage_decay)
        self.write_key = write_key
        reads = self.read_heads * self.memory_size
        self.controller = nn.LSTMCell(self.embedding_dim + self.ways + reads, self.controller_size)
        per_head = self.memory_size * (1 if write_key else 2) + 1
        self.interface = nn.Linear(self.controller_size, self.read_heads * per_head)
        with torch.no_grad():
            self.interface.bias.view(self.read_heads, per_head)[:, -1] = WRITE_GATE_BIAS
        self.output = nn.Linear(self.controller_size + reads, self.ways)

    def initial_state(self, tasks: int, like: Tensor) -> MemoryState:
        heads, slots, size = self.read_heads, self.memory_slots, self.memory_size
        zeros = like.new_zeros
        return MemoryState(
            hidden=zeros(tasks, self.controller_size),
            cell=zeros(tasks, self.controller_size),
            memory=like.new_full((tasks, slots, size), MEMORY_START),
            usage=zeros(tasks, slots),
            read_weights=zeros(tasks, heads, slots),
            reads=zeros(tasks, heads, size),
        )

    def step(self, embedding: Tensor, label: Tensor, state: MemoryState) -> tuple[
        Tensor, MemoryState
    ]:
        """One time step: ``embedding [B, D]``, ``label [B, N]`` (the label input) -> logits."""
        inputs = torch.cat([embedding, label, state.reads.flatten(1)], dim=-1)
        hidden, cell = self.controller(inputs, (state.hidden, state.cell))
        interface = self.interface(hidden).unflatten(-1, (self.read_heads, -1))
        size = self.memory_size
        key = torch.tanh(interface[..., :size])
        content = key if self.write_key else torch.tanh(interface[..., size : 2 * size])
        gate = torch.sigmoid(interface[..., -1:])
        memory, write_weights = lrua_write(
            state.memory, state.usage, state.read_weights, gate, content
        )
        read_weights = cosine_read_weights(key, memory)
        reads = read_weights @ memory
        usage = self.usage_decay * state.usage + read_weights.sum(1) + write_weights.sum(1)
        logits = self.output(torch.cat([hidden, reads.flatten(1)], dim=-1))
        return logits, MemoryState(hidden, cell, memory, usage, read_weights, reads)

    def predict(self, sequence: EpisodeSequence, support: Tensor, query: Tensor) -> Tensor:
        tasks, queries = query.shape[:2]
        labels = sequence.previous_labels.to(support.dtype)
        state = self.initial_state(tasks, support)
        support_logits = []
        for t in range(support.shape[1]):
            logits, state = self.step(support[:, t], labels[:, t], state)
            support_logits.append(logits)
        blank = support.new_zeros(tasks, support.shape[-1])
        _, state = self.step(blank, sequence.last_label.to(support.dtype), state)
        # Every query from the same state, as its own next step: nothing passes between them.
        for_queries = MemoryState(*(part.repeat_interleave(queries, 0) for part in state))
        query_labels = sequence.query_labels.to(query.dtype).flatten(0, 1)
        query_logits, _ = self.step(query.flatten(0, 1), query_labels, for_queries)
        query_logits = query_logits.unflatten(0, (tasks, queries))
        return torch.cat([torch.stack(support_logits, 1), query_logits], dim=1)
