"""metarun's fused CPU kernels against PyTorch's ops: values, gradients and second derivatives
in float64, the fallbacks, and the build."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

from metarun.execution import kernels
from metarun.execution.kernels import ops


@pytest.fixture(autouse=True)
def fresh_library():
    kernels.reset()
    yield
    kernels.reset()


@pytest.fixture
def built() -> None:
    """Skip a kernel-against-PyTorch comparison where no kernel library exists: the ops would
    fall back to PyTorch and the test would compare PyTorch with itself."""
    if kernels.library() is None:
        pytest.skip("no fused-kernel library was built here (no C compiler, or METARUN_KERNELS=0)")


def test_the_kernels_build_here() -> None:
    # The CI machines have a C compiler: without this the fast path would silently never run.
    assert kernels.library() is not None
    assert ops.usable(torch.zeros(2, 3, 4, 4))


def _bn_derivatives(norm, x, weight, bias, seed: int):
    """Output, first derivatives, and the derivative of a function of those (second order)."""
    x = x.clone().requires_grad_()
    leaves = [x] + [t.clone().requires_grad_() for t in (weight, bias) if t is not None]
    w = leaves[1] if weight is not None else None
    b = leaves[-1] if bias is not None else None
    y = norm(x, w, b)
    g = torch.Generator().manual_seed(seed)
    cotangent = torch.randn(y.shape, generator=g, dtype=y.dtype)
    first = torch.autograd.grad((y * cotangent).sum(), leaves, create_graph=True)
    # A Hessian-vector-like product through every first derivative, and y itself.
    mix = sum((d * torch.randn(d.shape, generator=g, dtype=d.dtype)).sum() for d in first)
    second = torch.autograd.grad(mix + (y.sin() * y).sum(), leaves)
    return y, first, second


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize(
    "shape", [(3, 4, 5, 6), (2, 3, 7, 5), (1, 2, 3, 3), (25, 8, 28, 28), (4, 5, 1, 1)]
)
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_matches_pytorch_to_second_order(shape, affine) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5
    weight = torch.randn(shape[1], generator=g, dtype=torch.float64) if affine else None
    bias = torch.randn(shape[1], generator=g, dtype=torch.float64) if affine else None

    def fused(x, w, b):
        return ops.batch_norm(x, w, b, 1e-5)

    def native(x, w, b):
        return F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5)

    y, first, second = _bn_derivatives(fused, x, weight, bias, seed=1)
    want_y, want_first, want_second = _bn_derivatives(native, x, weight, bias, seed=1)
    torch.testing.assert_close(y, want_y, rtol=1e-10, atol=1e-10)
    for got, want in zip(first, want_first, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    for got, want in zip(second, want_second, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)


@pytest.mark.usefixtures("built")
def test_batch_norm_passes_gradgradcheck() -> None:
    g = torch.Generator().manual_seed(2)
    inputs = (
        torch.randn(3, 2, 3, 5, generator=g, dtype=torch.float64, requires_grad=True),
        torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True),
        torch.randn(2, generator=g, dtype=torch.float64, requires_grad=True),
    )
    assert torch.autograd.gradcheck(lambda x, w, b: ops.batch_norm(x, w, b, 1e-3), inputs)
    assert torch.autograd.gradgradcheck(lambda x, w, b: ops.batch_norm(x, w, b, 1e-3), inputs)


@pytest.mark.usefixtures("built")
def test_batch_norm_float32_is_close_and_third_derivatives_are_refused() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 4, 6, 6, generator=g).requires_grad_()
    w = torch.rand(4, generator=g).requires_grad_()
    y = ops.batch_norm(x, w, None, 1e-5)
    torch.testing.assert_close(y, F.batch_norm(x, None, None, w, None, True, 0.0, 1e-5))
    (gx,) = torch.autograd.grad((y**3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no third derivative; set METARUN_KERNELS=0"):
        torch.autograd.grad((gx**2).sum(), x, create_graph=True)
    # Second order is fine, with or without retaining the graph.
    (gx,) = torch.autograd.grad((y**3).sum(), x, create_graph=True)
    torch.autograd.grad((gx**2).sum(), [x, w])


@pytest.mark.usefixtures("built")
def test_max_pool_matches_pytorch_with_ties_and_nan() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 7, 9, generator=g, dtype=torch.float64)  # odd sizes: floor mode
    x[:, :, :4, :4] = 1.0  # ties: the first maximum in row-major order wins
    x[0, 0, 5, 5] = float("nan")
    x[1, 2, 0:2, 4:6] = -float("inf")
    x = x.requires_grad_()
    y, want = ops.max_pool2x2(x), F.max_pool2d(x, 2)
    torch.testing.assert_close(y, want, equal_nan=True)
    cotangent = torch.randn(y.shape, generator=g, dtype=y.dtype)
    (got_grad,) = torch.autograd.grad((y.nan_to_num() * cotangent).sum(), x, create_graph=True)
    (want_grad,) = torch.autograd.grad((want.nan_to_num() * cotangent).sum(), x, create_graph=True)
    assert torch.equal(got_grad, want_grad)


@pytest.mark.usefixtures("built")
def test_max_pool_second_order_through_the_cotangent() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)
    vector = torch.randn(2, 3, 6, 6, generator=g, dtype=torch.float64)

    def second(pool):
        cotangent = torch.ones(2, 3, 3, 3, dtype=torch.float64, requires_grad=True)
        leaf = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad((pool(leaf) * cotangent).sum(), leaf, create_graph=True)
        return torch.autograd.grad((grad * vector).sum(), cotangent)[0]

    assert torch.equal(second(ops.max_pool2x2), second(lambda t: F.max_pool2d(t, 2)))


def _channels_last_input(seed: int, shape=(3, 4, 7, 9)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    x[:, :, :4, :4] = 1.0  # ties
    return x.contiguous(memory_format=torch.channels_last)


def test_channels_last_max_pool_matches_pytorch_to_second_order() -> None:
    x = _channels_last_input(6)
    vector = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))

    def derivatives(pool):
        leaf = x.clone().requires_grad_()
        y = pool(leaf)
        cotangent = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
        cotangent.requires_grad_()
        (grad,) = torch.autograd.grad((y * cotangent).sum(), leaf, create_graph=True)
        (second,) = torch.autograd.grad((grad * vector).sum(), cotangent)
        return y, grad, second

    got, want = derivatives(ops.max_pool2x2), derivatives(lambda t: F.max_pool2d(t, 2))
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    assert got[1].is_contiguous(memory_format=torch.channels_last)


def test_channels_last_max_pool_keeps_only_its_indices_for_backward() -> None:
    """PyTorch's max-pool keeps its input (a block's batch-norm output, four times its output)
    for the backward pass; metarun's keeps the indices alone, so that input is freed."""

    def saved_shapes(pool) -> list[tuple[int, ...]]:
        shapes: list[tuple[int, ...]] = []

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            shapes.append(tuple(tensor.shape))
            return tensor

        x = _channels_last_input(8).float().requires_grad_()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            pool(x * 2)  # a fresh activation, as a batch-norm output is
        return shapes

    assert (3, 4, 7, 9) in saved_shapes(lambda t: F.max_pool2d(t, 2))  # what it avoids
    assert saved_shapes(ops.max_pool2x2) == [(3, 4, 3, 4)]


def test_other_layouts_and_dtypes_fall_back_to_pytorch(monkeypatch) -> None:
    calls = []
    original = ops._BatchNorm.apply

    def spy(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(ops._BatchNorm, "apply", spy)
    x = torch.randn(4, 3, 5, 5)
    ops.batch_norm(x, None, None, 1e-5)
    ops.batch_norm(x.contiguous(memory_format=torch.channels_last), None, None, 1e-5)
    ops.batch_norm(x.half(), None, None, 1e-5)
    ops.batch_norm(x[:, :, :, 0], None, None, 1e-5)  # 3-D
    assert calls == [x.shape]
    # One value per channel: PyTorch's own error, not a silent division by zero.
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ops.batch_norm(torch.randn(1, 3, 1, 1), None, None, 1e-5)


def test_switched_off_or_unbuildable_kernels_fall_back(monkeypatch, tmp_path, caplog) -> None:
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    want = F.batch_norm(x, None, None, None, None, True, 0.0, 1e-5)
    monkeypatch.setenv("METARUN_KERNELS", "0")
    assert kernels.library() is None and not ops.usable(x)
    torch.testing.assert_close(ops.batch_norm(x, None, None, 1e-5), want)
    monkeypatch.delenv("METARUN_KERNELS")
    monkeypatch.setenv("METARUN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "false")  # a compiler that always fails
    kernels.reset()
    assert kernels.library() is None
    assert "fused CPU kernels unavailable" in caplog.text
    torch.testing.assert_close(ops.batch_norm(x, None, None, 1e-5), want)
    assert not list((tmp_path / "cache").rglob("*.so"))


def test_build_is_cached_by_source_and_flags(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("METARUN_CACHE", str(tmp_path))
    kernels.reset()
    assert kernels.library() is not None
    built = list((tmp_path / "kernels").glob("cpu_kernels-*.so"))
    assert len(built) == 1
    stamp = built[0].stat().st_mtime_ns
    kernels.reset()
    assert kernels.library() is not None  # loaded from the cache, not rebuilt
    assert built[0].stat().st_mtime_ns == stamp
    assert list((tmp_path / "kernels").glob("cpu_kernels-*.so")) == built


@pytest.mark.usefixtures("built")
def test_kernels_run_in_parallel_threads_with_the_same_numbers() -> None:
    g = torch.Generator().manual_seed(6)
    inputs = [torch.randn(6, 8, 12, 12, generator=g, dtype=torch.float64) for _ in range(4)]
    weight = torch.randn(8, generator=g, dtype=torch.float64)

    def hvp(x):
        leaf = x.clone().requires_grad_()
        y = ops.max_pool2x2(ops.batch_norm(leaf, weight, None, 1e-5))
        (grad,) = torch.autograd.grad((y**2).sum(), leaf, create_graph=True)
        return torch.autograd.grad(grad.sum(), leaf)[0]

    want = [hvp(x) for x in inputs]
    got: list[torch.Tensor | None] = [None] * len(inputs)

    def work(k):
        for _ in range(5):
            got[k] = hvp(inputs[k])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
