"""Task-conditioned FiLM on a backbone's batch-norm layers, generated from a task's support set.

FiLM (Perez et al., AAAI 2018, arXiv:1709.07871) scales and shifts every channel of a layer's
output, ``gamma * h + beta``. CNAPs (Requeima, Gordon, Bronskill, Nowozin & Turner, NeurIPS 2019,
arXiv:1906.07697) puts one FiLM after each batch-norm of its feature extractor and generates the
``gamma``/``beta`` of every layer from a task encoding: a DeepSets encoder (Zaheer et al. 2017),
``z = mean_i phi(x_i)`` over the support set, which is invariant to the order of the support set.

Here FiLM is applied without changing the backbone: ``film_applied`` registers forward hooks on
the body's batch-norm layers (found by type, ``norm_layers``) for the duration of one pass, and
removes them after, so outside it the body is exactly the plain body. The generator's last layers
are zero-initialised and ``gamma`` is offset by one, so FiLM is the identity at initialisation
(CNAPs does the same with ``1 + small * out`` for ``gamma``; it also adds an L2 penalty on the
generated parameters, left out here).

Usage::

    norms = norm_layers(body)                     # every batch-norm, in module order
    encoder = SetEncoder(feature_dim, hidden=64)
    generator = FiLMGenerator(64, [norm.num_features for norm in norms])
    film = generator(encoder(body(support_x).flatten(1)))   # [(gamma, beta)] per layer
    with film_applied(norms, film):
        support_features = body(support_x)
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

Film = list[tuple[Tensor, Tensor]]


def norm_layers(body: nn.Module) -> list[_BatchNorm]:
    """The layers FiLM modulates: every batch-norm of ``body`` (1-d, 2-d or 3-d), in order."""
    return [module for module in body.modules() if isinstance(module, _BatchNorm)]


def _modulate(gamma: Tensor, beta: Tensor) -> Callable[[nn.Module, tuple, Tensor], Tensor]:
    def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (output.dim() - 2)  # per channel: dim 1, as batch-norm's
        return output * gamma.reshape(shape) + beta.reshape(shape)

    return hook


@contextmanager
def film_applied(layers: Sequence[nn.Module], film: Film) -> Iterator[None]:
    """Within the block, each layer's output ``h`` becomes ``gamma * h + beta`` (per channel).

    The hooks belong to this block only: the same body runs unmodulated outside it. Not for
    two threads running the same body at once (the hooks are on the shared modules).
    """
    handles = []
    try:
        for layer, (gamma, beta) in zip(layers, film, strict=True):
            handles.append(layer.register_forward_hook(_modulate(gamma, beta)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def fresh_copy(module: nn.Module) -> nn.Module:
    """A module of the same architecture with newly initialised weights (CNAPs' set encoder is a
    network of its own, not the feature extractor)."""
    clone = copy.deepcopy(module)
    for sub in clone.modules():
        reset = getattr(sub, "reset_parameters", None)
        if callable(reset):
            reset()
    return clone


class SetEncoder(nn.Module):
    """DeepSets over a set of embeddings ``[S, D]``: ``mean_i phi(e_i)`` -> ``[hidden]``.

    A mean, not a sum, so the encoding does not grow with the number of shots (CNAPs pools with a
    mean too).
    """

    def __init__(self, in_features: int, hidden: int) -> None:
        super().__init__()
        self.phi = nn.Sequential(
            nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )

    def forward(self, embeddings: Tensor) -> Tensor:
        return self.phi(embeddings).mean(0)


class FiLMGenerator(nn.Module):
    """Task encoding ``[hidden]`` -> ``(gamma, beta)`` for each modulated layer.

    A shared ReLU layer (CNAPs' ``shared_layer``), then one linear map per layer to its
    ``2 * channels`` outputs, zero-initialised: ``gamma = 1 + out[:C]``, ``beta = out[C:]``.
    """

    def __init__(self, hidden: int, channels: Sequence[int]) -> None:
        super().__init__()
        self.channels = list(channels)
        self.shared = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU())
        self.layers = nn.ModuleList(nn.Linear(hidden, 2 * count) for count in self.channels)
        for layer in self.layers:
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, encoding: Tensor) -> Film:
        shared = self.shared(encoding)
        film = []
        for layer, count in zip(self.layers, self.channels, strict=True):
            out = layer(shared)
            film.append((1 + out[:count], out[count:]))
        return film
