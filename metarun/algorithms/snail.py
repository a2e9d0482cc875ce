"""SNAIL: A Simple Neural Attentive Meta-Learner (Mishra, Rohaninejad, Chen & Abbeel, ICLR 2018,
arXiv:1707.03141).

A task is read as a sequence of (embedding, one-hot label) pairs, the support items in a random
order, followed by a query with a blank label, and the model outputs the query's class logits
(paper, sec. 3 and 4.1). The sequence model alternates two causal blocks (appendix):

- **TC block** ``TCBlock(T, D)``: dense blocks of causal dilated 1-d convolutions with kernel
  size 2, each ``concat(x, tanh(conv_f(x)) * sigmoid(conv_g(x)))`` with ``D`` filters, one per
  dilation 1, 2, 4, ... until the receptive field covers the sequence length ``T`` (``ceil(log2
  T)`` blocks). The paper's pseudocode counts dilations from 2; with kernel size 2 that would
  never reach an odd distance, so they start at 1 here.
- **Attention block** ``AttentionBlock(K, V)``: single-head key/query/value attention with a
  causal mask (position t attends to positions <= t), logits scaled by ``1/sqrt(K)``, the read
  concatenated to the input.

The Omniglot / mini-ImageNet model (appendix): ``AttentionBlock(64, 32), TCBlock(T, 128),
AttentionBlock(256, 128), TCBlock(T, 128), AttentionBlock(512, 256)``, then a 1x1 convolution to
N logits (a linear map per position), with ``T = N*K + 1``. ``key_sizes``, ``value_sizes`` and
``tc_filters`` set those sizes.

Labels are the unshifted pairs (x_t, y_t) of the paper (``EpisodeSequence.support_labels``); the
query's label input is all zeros, and the loss is on the queries alone, since a support
position is shown its own label.

All queries in one pass: the support positions see no query (causality), so their activations
are computed once. Each query is then the position right after the support in a sequence of its
own: at every layer, its convolution taps are its own features and the support's at the tap's
distance, and its attention covers the support positions and itself. That is exactly the model
run on each (support + one query) sequence separately (tested against that), at the cost of one
extra position per query.

Usage::

    snail = SNAIL(Conv4((1, 28, 28), 5), "classification", shots=1)
    loss, metrics = snail.meta_train_step(batch)
    loss.backward(); optimizer.step()

or ``metarun algo=snail dataset=omniglot``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from metarun.algorithms.sequence import SequenceLearner
from metarun.checks import positive_int, positive_ints
from metarun.data.sequences import EpisodeSequence
from metarun.errors import ConfigError

Streams = tuple[Tensor, Tensor]


class DenseBlock(nn.Module):
    """A gated causal convolution (kernel 2, ``dilation``) whose output is appended to its input.

    Works on two streams: ``support [B, S, C]``, a causal sequence, and ``query [B, Q, C]``, each
    query the position ``S`` of its own sequence after the same support.
    """

    def __init__(self, in_channels: int, filters: int, dilation: int) -> None:
        super().__init__()
        self.dilation = dilation
        # One kernel-2 convolution is a linear map of [x_t, x_{t-d}]: filter and gate in one.
        self.conv = nn.Linear(2 * in_channels, 2 * filters)

    def forward(self, support: Tensor, query: Tensor) -> Streams:
        d = self.dilation
        shots = support.shape[1]
        earlier = nn.functional.pad(support, (0, 0, d, 0))[:, :shots]  # x_{t-d}, zeros before 0
        if shots - d >= 0:
            tap = support[:, shots - d].unsqueeze(1).expand_as(query)
        else:
            tap = torch.zeros_like(query)
        return self._gate(support, earlier), self._gate(query, tap)

    def _gate(self, current: Tensor, earlier: Tensor) -> Tensor:
        filtered, gate = self.conv(torch.cat([current, earlier], -1)).chunk(2, dim=-1)
        return torch.cat([current, torch.tanh(filtered) * torch.sigmoid(gate)], dim=-1)


class TCBlock(nn.Module):
    """Dense blocks at dilations 1, 2, 4, ... covering ``length`` positions."""

    def __init__(self, in_channels: int, length: int, filters: int) -> None:
        super().__init__()
        layers = max(1, math.ceil(math.log2(length)))
        self.blocks = nn.ModuleList(
            DenseBlock(in_channels + i * filters, filters, 2**i) for i in range(layers)
        )
        self.out_channels = in_channels + layers * filters

    def forward(self, support: Tensor, query: Tensor) -> Streams:
        for block in self.blocks:
            support, query = block(support, query)
        return support, query


class AttentionBlock(nn.Module):
    """Causal single-head attention; the read is appended to the input."""

    def __init__(self, in_channels: int, key_size: int, value_size: int) -> None:
        super().__init__()
        self.keys = nn.Linear(in_channels, key_size)
        self.queries = nn.Linear(in_channels, key_size)
        self.values = nn.Linear(in_channels, value_size)
        self.scale = 1.0 / math.sqrt(key_size)
        self.out_channels = in_channels + value_size

    def forward(self, support: Tensor, query: Tensor) -> Streams:
        keys, values = self.keys(support), self.values(support)
        logits = self.queries(support) @ keys.transpose(1, 2) * self.scale  # [B, S, S]
        shots = support.shape[1]
        future = torch.ones(shots, shots, dtype=torch.bool, device=support.device).triu(1)
        weights = torch.softmax(logits.masked_fill(future, float("-inf")), dim=-1)
        support_read = weights @ values

        asked = self.queries(query)
        to_support = asked @ keys.transpose(1, 2) * self.scale  # [B, Q, S]
        to_itself = (asked * self.keys(query)).sum(-1, keepdim=True) * self.scale  # [B, Q, 1]
        weights = torch.softmax(torch.cat([to_support, to_itself], dim=-1), dim=-1)
        query_read = weights[..., :shots] @ values + weights[..., shots:] * self.values(query)
        return torch.cat([support, support_read], -1), torch.cat([query, query_read], -1)


class SNAILModel(nn.Module):
    """Attention and TC blocks alternating, then a linear map to ``ways`` logits per position."""

    def __init__(
        self,
        in_channels: int,
        ways: int,
        length: int,
        key_sizes: Sequence[int],
        value_sizes: Sequence[int],
        tc_filters: int,
    ) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        channels = in_channels
        for index, (key_size, value_size) in enumerate(zip(key_sizes, value_sizes, strict=True)):
            if index > 0:
                blocks.append(TCBlock(channels, length, tc_filters))
                channels = blocks[-1].out_channels
            blocks.append(AttentionBlock(channels, key_size, value_size))
            channels = blocks[-1].out_channels
        self.blocks = nn.ModuleList(blocks)
        self.output = nn.Linear(channels, ways)

    def forward(self, support: Tensor, query: Tensor) -> Streams:
        """``support [B, S, C]`` (a causal sequence) and ``query [B, Q, C]`` (each one position
        after the support) -> logits ``[B, S, N]`` and ``[B, Q, N]``. With ``Q = 0`` this is the
        plain causal model over one sequence."""
        for block in self.blocks:
            support, query = block(support, query)
        return self.output(support), self.output(query)


class SNAIL(SequenceLearner):
    """SNAIL over the backbone body's embeddings; ``shots`` (``task.shots``) or ``train_shots``,
    whichever is larger, sets ``T``."""

    algo_name = "snail"

    def __init__(
        self,
        model: nn.Module,
        task_type: str,
        shots: int,
        key_sizes: Sequence[int] = (64, 256, 512),
        value_sizes: Sequence[int] = (32, 128, 256),
        tc_filters: int = 128,
        embedding_norm: bool = True,
        train_shots: int | None = None,
    ) -> None:
        # A support position is shown its own label: only the queries are predictions.
        super().__init__(model, task_type, False, embedding_norm, train_shots)
        shots = max(positive_int(shots, "algo.shots"), self.train_shots or 0)
        key_sizes = positive_ints(key_sizes, "algo.key_sizes")
        value_sizes = positive_ints(value_sizes, "algo.value_sizes")
        if not key_sizes or len(key_sizes) != len(value_sizes):
            raise ConfigError(
                f"algo.key_sizes and algo.value_sizes need one entry per attention block, "
                f"equally many; got {list(key_sizes)} and {list(value_sizes)}"
            )
        self.snail = SNAILModel(
            self.embedding_dim + self.ways,
            self.ways,
            self.ways * shots + 1,
            key_sizes,
            value_sizes,
            positive_int(tc_filters, "algo.tc_filters"),
        )

    def predict(self, sequence: EpisodeSequence, support: Tensor, query: Tensor) -> Tensor:
        support_in = torch.cat([support, sequence.support_labels.to(support.dtype)], dim=-1)
        query_in = torch.cat([query, sequence.query_labels.to(query.dtype)], dim=-1)
        support_out, query_out = self.snail(support_in, query_in)
        return torch.cat([support_out, query_out], dim=1)
