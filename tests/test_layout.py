"""Channels-last on the CPU: the layout really reaches the convolutions, where the algorithms say
it should, and the meta-gradients are the NCHW ones (float64, images with ties in max-pool)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metarun.algorithms.maml import MAML
from metarun.algorithms.protonet import ProtoNet
from metarun.algorithms.reptile import Reptile
from metarun.data.episodes import TaskBatch
from metarun.execution import layout
from metarun.models.conv4 import Conv4

WAYS, SHOTS, QUERIES, TASKS = 3, 2, 4, 3


def is_channels_last(x: torch.Tensor) -> bool:
    return x.stride(1) == 1 and x.is_contiguous(memory_format=torch.channels_last)


def binary_batch(seed: int, dtype: torch.dtype = torch.float64) -> TaskBatch:
    """Mostly-blank binary images, like Omniglot's: many equal values in each pooling window,
    so a max-pool whose tie-breaking changed with the layout would route gradients elsewhere."""
    g = torch.Generator().manual_seed(seed)
    support_x = (torch.rand(TASKS, WAYS * SHOTS, 1, 16, 16, generator=g) > 0.8).to(dtype)
    query_x = (torch.rand(TASKS, WAYS * QUERIES, 1, 16, 16, generator=g) > 0.8).to(dtype)
    support_y = torch.arange(WAYS).repeat_interleave(SHOTS).repeat(TASKS, 1)
    query_y = torch.arange(WAYS).repeat_interleave(QUERIES).repeat(TASKS, 1)
    return TaskBatch(support_x, support_y, query_x, query_y)


def conv4(seed: int = 0) -> Conv4:
    torch.manual_seed(seed)
    return Conv4((1, 16, 16), WAYS, channels=4).double()


def test_one_channel_images_get_channels_last_strides_as_a_view():
    images = torch.rand(5, 1, 8, 8)
    converted = layout.channels_last(images)
    assert converted.data_ptr() == images.data_ptr()
    assert torch.equal(converted, images)
    assert is_channels_last(converted)
    # What the conversion is for: the convolution then computes channels-last.
    out = F.conv2d(converted, torch.randn(6, 1, 3, 3), padding=1)
    assert is_channels_last(out)


def test_several_channels_are_copied_channels_last():
    images = torch.rand(2, 3, 8, 8)
    converted = layout.cpu_fast_layout(images)
    assert torch.equal(converted, images)
    assert is_channels_last(converted)


@pytest.mark.parametrize(
    "images",
    [
        torch.rand(2, 1, 8, 8, dtype=torch.float64),  # not a measured dtype
        torch.rand(4, 3),  # not images
        layout.channels_last(torch.rand(2, 1, 8, 8)),  # already channels-last
    ],
)
def test_other_inputs_pass_unchanged(images):
    assert layout.cpu_fast_layout(images) is images


def record_first_conv_inputs(model: Conv4) -> list[tuple[int, bool]]:
    """(batch size, channels-last?) of every input the first convolution sees."""
    seen: list[tuple[int, bool]] = []
    first_conv = model.features[0][0]
    first_conv.register_forward_pre_hook(
        lambda _module, args: seen.append((args[0].shape[0], is_channels_last(args[0])))
    )
    return seen


@pytest.fixture
def float64_fast(monkeypatch):
    """Lets float64 take the channels-last path, so it can be compared exactly with NCHW."""
    monkeypatch.setattr(layout, "FAST_DTYPES", (torch.float32, torch.float64))


@pytest.mark.parametrize("first_order", [False, True])
def test_maml_layouts_per_pass(first_order, float64_fast):
    model = conv4()
    seen = record_first_conv_inputs(model)
    maml = MAML(model, "classification", inner_lr=0.3, inner_steps=2, first_order=first_order)
    loss, _ = maml.meta_train_step(binary_batch(seed=1))
    loss.backward()
    support = {cl for n, cl in seen if n == WAYS * SHOTS}
    query = {cl for n, cl in seen if n == WAYS * QUERIES}
    assert query == {True}
    # Second order differentiates the support passes twice: they stay NCHW.
    assert support == {first_order}

    seen.clear()
    maml.evaluate(binary_batch(seed=2))
    assert {cl for _, cl in seen} == {True}


def meta_gradients(algorithm, batch: TaskBatch) -> list[torch.Tensor]:
    algorithm.zero_grad(set_to_none=True)
    loss, _ = algorithm.meta_train_step(batch)
    loss.backward()
    # ProtoNet leaves the backbone's head unused: no gradient there, in either layout.
    return [
        torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in algorithm.parameters()
    ]


@pytest.mark.parametrize("algo", ["maml", "fomaml", "reptile", "protonet"])
def test_channels_last_gives_the_nchw_meta_gradients(algo, monkeypatch):
    def build():
        model = conv4(seed=3)
        if algo == "protonet":
            return ProtoNet(model, "classification")
        if algo == "reptile":
            return Reptile(model, "classification", inner_lr=0.1, inner_steps=2)
        return MAML(model, "classification", 0.3, 2, first_order=algo == "fomaml")

    def run(fast_dtypes: tuple[torch.dtype, ...]) -> tuple[list[torch.Tensor], set[bool]]:
        monkeypatch.setattr(layout, "FAST_DTYPES", fast_dtypes)
        algorithm = build()
        seen = record_first_conv_inputs(algorithm.model)
        return meta_gradients(algorithm, batch), {cl for _, cl in seen}

    batch = binary_batch(seed=4)
    nchw, nchw_layouts = run(())
    fast, fast_layouts = run((torch.float64,))
    assert nchw_layouts == {False}
    assert True in fast_layouts
    largest = max(g.abs().max().item() for g in nchw)
    assert largest > 1e-3
    for reference, got in zip(nchw, fast, strict=True):
        torch.testing.assert_close(got, reference, rtol=1e-9, atol=1e-12)
