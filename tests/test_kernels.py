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

    _assert_same_derivatives(fused, native, x, weight, bias, seed=1)


def _assert_same_derivatives(op, reference, x, weight, bias, seed: int) -> torch.Tensor:
    """``op`` and ``reference`` agree in value, first and second derivatives (float64); returns
    ``op``'s output."""
    y, first, second = _bn_derivatives(op, x, weight, bias, seed)
    want_y, want_first, want_second = _bn_derivatives(reference, x, weight, bias, seed)
    torch.testing.assert_close(y, want_y, rtol=1e-10, atol=1e-10)
    for got, want in zip(first, want_first, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    for got, want in zip(second, want_second, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-8)
    return y


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
@pytest.mark.parametrize("fused_pool", [False, True], ids=["batch_norm", "batch_norm_then_pool"])
def test_float32_is_close_and_third_derivatives_are_refused(fused_pool) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8, 4, 6, 6, generator=g)
    if fused_pool:  # (the channels-last kernel; its double backward runs NCHW)
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w = torch.rand(4, generator=g).requires_grad_()
    y = (ops.batch_norm_max_pool2x2 if fused_pool else ops.batch_norm)(x, w, None, 1e-5)
    want = F.batch_norm(x, None, None, w, None, True, 0.0, 1e-5)
    torch.testing.assert_close(y, F.max_pool2d(want, 2) if fused_pool else want)
    (gx,) = torch.autograd.grad((y**3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="no third derivative; set METARUN_KERNELS=0"):
        torch.autograd.grad((gx**2).sum(), x, create_graph=True)
    # Second order is fine, with or without retaining the graph.
    (gx,) = torch.autograd.grad((y**3).sum(), x, create_graph=True)
    torch.autograd.grad((gx**2).sum(), [x, w])


LAYOUTS = [torch.contiguous_format, torch.channels_last]


def _pool_input(seed: int, layout: torch.memory_format, shape=(3, 4, 7, 9)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)  # odd sizes: floor mode
    x[:, :, :4, :4] = 1.0  # ties: the first maximum in row-major order wins
    x[0, 0, 5, 5] = float("nan")
    x[1, 2, 0:2, 4:6] = -float("inf")
    return x.contiguous(memory_format=layout)


def _pool_derivatives(pool, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The pool's output, the gradient of its input, the derivative of a function of that
    gradient with respect to the cotangent (the pool's double backward), and of that with
    respect to the function's vector (a third backward)."""
    leaf = x.clone().requires_grad_()
    y = pool(leaf)
    cotangent = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape).requires_grad_()
    (grad,) = torch.autograd.grad((y.nan_to_num() * cotangent).sum(), leaf, create_graph=True)
    vector = torch.linspace(2, -1, x.numel(), dtype=x.dtype).reshape(x.shape).requires_grad_()
    (second,) = torch.autograd.grad((grad * vector).sum(), cotangent, create_graph=True)
    (third,) = torch.autograd.grad((second**2).sum(), vector)
    return y, grad, second, third


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
def test_max_pool_matches_pytorch_to_third_order_with_ties_and_nan(layout) -> None:
    x = _pool_input(4, layout)
    got = _pool_derivatives(ops.max_pool2x2, x)
    want = _pool_derivatives(lambda t: F.max_pool2d(t, 2), x)
    torch.testing.assert_close(got[0], want[0], equal_nan=True)
    for a, b in zip(got[1:], want[1:], strict=True):
        assert torch.equal(a, b)
    # the input's gradient in the input's layout, as PyTorch's pool gives it
    assert got[1].is_contiguous(memory_format=layout)
    assert got[1].stride() == want[1].stride()


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
def test_max_pool_takes_upstream_gradients_of_another_layout(layout) -> None:
    other = torch.channels_last if layout == torch.contiguous_format else torch.contiguous_format
    x = _pool_input(5, layout, shape=(2, 3, 6, 8))

    def pool_then_relayout(pool):
        def run(t):
            return pool(t).contiguous(memory_format=other) * 3

        return run

    got = _pool_derivatives(pool_then_relayout(ops.max_pool2x2), x)
    want = _pool_derivatives(pool_then_relayout(lambda t: F.max_pool2d(t, 2)), x)
    for a, b in zip(got[1:], want[1:], strict=True):
        assert torch.equal(a, b)


def _saved(pool, layout: torch.memory_format) -> list[tuple[tuple[int, ...], torch.dtype]]:
    saved: list[tuple[tuple[int, ...], torch.dtype]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append((tuple(tensor.shape), tensor.dtype))
        return tensor

    x = _pool_input(8, layout).float().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pool(x * 2)  # a fresh activation, as a batch-norm output is
    return saved


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
def test_max_pool_keeps_one_byte_per_output_for_backward(layout) -> None:
    """PyTorch's max-pool keeps its input (a block's batch-norm output, four times its output)
    and 8-byte indices for the backward pass; metarun's keeps which of the window's four it
    took, one byte per output, so a block's pool keeps a sixteenth of what its input takes."""
    assert ((3, 4, 7, 9), torch.float32) in _saved(lambda t: F.max_pool2d(t, 2), layout)
    assert _saved(ops.max_pool2x2, layout) == [((3, 4, 3, 4), torch.uint8)]


def _bn_pool_native(x, w, b):
    return F.max_pool2d(F.batch_norm(x, None, None, w, b, True, 0.0, 1e-5), 2)


def _bn_pool_fused(x, w, b):
    return ops.batch_norm_max_pool2x2(x, w, b, 1e-5)


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 3, 7, 5), (1, 2, 3, 3), (25, 8, 28, 28)])
@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_then_pool_in_one_op_matches_pytorch_to_second_order(
    layout, shape, affine
) -> None:
    g = torch.Generator().manual_seed(11)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).contiguous(
        memory_format=layout
    )
    weight = torch.randn(shape[1], generator=g, dtype=torch.float64) if affine else None
    bias = torch.randn(shape[1], generator=g, dtype=torch.float64) if affine else None
    y = _assert_same_derivatives(_bn_pool_fused, _bn_pool_native, x, weight, bias, seed=12)
    assert y.is_contiguous(memory_format=layout)


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
def test_batch_norm_then_pool_takes_pytorchs_element_on_ties_and_negative_weights(
    layout,
) -> None:
    # finite values: a NaN or infinity would make every statistic of its channel NaN
    x = _pool_input(13, layout).nan_to_num(nan=0.0, neginf=-5.0)
    x[2] = (x[2] > 0.3).double()  # Omniglot-like flat windows: exact ties
    weight = torch.tensor([1.5, -2.0, 0.5, -1.0], dtype=torch.float64)  # negative: min wins
    bias = torch.tensor([0.1, 0.0, -0.3, 2.0], dtype=torch.float64)
    # same element taken everywhere: any other pick moves a gradient by O(1), not by rounding
    _assert_same_derivatives(_bn_pool_fused, _bn_pool_native, x, weight, bias, seed=14)


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("layout", LAYOUTS, ids=["nchw", "channels_last"])
def test_batch_norm_then_pool_keeps_only_its_input_and_a_byte_per_output(layout) -> None:
    """Separately, the two ops keep the input and the normalised tensor (the pool's input);
    as one op only the input, the statistics and the pool's codes: the normalised tensor, the
    size of the block's convolution output, is never written."""
    w = torch.ones(4, requires_grad=True)
    saved = _saved(lambda t: ops.batch_norm_max_pool2x2(t, w, None, 1e-5), layout)
    assert sorted(saved, key=str) == sorted(
        [((3, 4, 7, 9), torch.float32), ((4,), torch.float32), ((3, 4, 3, 4), torch.uint8),
         ((4,), torch.float32), ((4,), torch.float32)], key=str
    )


@pytest.mark.parametrize("kernels_on", ["1", "0"])
def test_batch_norm_then_pool_falls_back_where_the_kernels_do_not_apply(
    monkeypatch, kernels_on
) -> None:
    monkeypatch.setenv("METARUN_KERNELS", kernels_on)
    calls = _shapes_applied(monkeypatch, ops._BatchNormMaxPool)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    for t in (x, x.bfloat16(), x.permute(0, 1, 3, 2)):  # the kernels' dtypes and layouts only
        torch.testing.assert_close(
            ops.batch_norm_max_pool2x2(t, None, None, 1e-5), _bn_pool_native(t, None, None)
        )
    assert calls == ([x.shape] if kernels_on == "1" and kernels.library() else [])


def test_without_kernels_the_channels_last_pool_still_keeps_only_indices(monkeypatch) -> None:
    monkeypatch.setenv("METARUN_KERNELS", "0")
    assert _saved(ops.max_pool2x2, torch.channels_last) == [((3, 4, 3, 4), torch.int64)]
    x = _pool_input(9, torch.channels_last)
    got = _pool_derivatives(ops.max_pool2x2, x)
    want = _pool_derivatives(lambda t: F.max_pool2d(t, 2), x)
    for a, b in zip(got[1:], want[1:], strict=True):
        assert torch.equal(a, b)


def _shapes_applied(monkeypatch, function: type) -> list[torch.Size]:
    """The input shape of every ``function.apply`` call from now on (the kernels' ops)."""
    calls: list[torch.Size] = []
    original = function.apply

    def spy(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(function, "apply", spy)
    return calls


def test_other_layouts_and_dtypes_fall_back_to_pytorch(monkeypatch) -> None:
    calls = _shapes_applied(monkeypatch, ops._BatchNorm)
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
