"""On a CUDA device: meta-gradients against the CPU float64 references, bf16/fp16 against them,
whole runs with trainer.device=cuda, two NCCL processes against one, and the uint8 images held
on the GPU (dataset.on_device) giving the CPU's episodes.

Skipped without CUDA; ``scripts/device_bench.sh run`` runs this module on the device machine
(where metarun is on PYTHONPATH, not installed: runs go through ``python -m metarun``).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from metarun.algorithms.maml import MAML
from metarun.algorithms.protonet import ProtoNet
from metarun.data.images import DeviceImageRows
from metarun.data.omniglot import Omniglot
from metarun.data.on_device import store_device
from tests.runs import SINUSOID_TINY, comparable, read_results
from tests.test_image_data import Fixture
from tests.test_maml import (
    WAYS,
    input_shape,
    make_batch,
    make_model,
    maml_meta_gradient,
    reference_meta_gradient,
    reference_weights,
)
from tests.test_precision import (
    CASES,
    INNER_LR,
    INNER_STEPS,
    LOW_PRECISION_TOLERANCE,
    low_precision_meta_gradient,
    relative_error,
)

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="no CUDA device (scripts/device_bench.sh runs these on a GPU machine)",
)
CUDA = torch.device("cuda")
#: Float64 on the GPU against float64 on the CPU: the same maths summed in another order.
FLOAT64_TOLERANCE = 1e-6


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("driver", ["vmap", "loop"])
@pytest.mark.parametrize("backbone", ["mlp", "conv4", "conv4-nobn"])
def test_maml_meta_gradient_on_cuda_matches_the_cpu_float64_reference(backbone, driver, steps):
    task_type = "classification"
    model = make_model(backbone, task_type)
    batch = make_batch(task_type, input_shape(backbone), seed=1)
    expected_loss, expected = reference_meta_gradient(
        backbone, reference_weights(model, backbone), batch, task_type, INNER_LR, steps
    )
    maml = MAML(copy.deepcopy(model).to(CUDA), task_type, INNER_LR, steps, task_batching=driver)
    loss, grads = maml_meta_gradient(maml, batch.to(CUDA))
    assert loss.device.type == "cuda"
    torch.testing.assert_close(loss.cpu(), expected_loss, rtol=0, atol=1e-10)
    for got, want in zip(grads, expected, strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got.cpu(), want, rtol=FLOAT64_TOLERANCE, atol=FLOAT64_TOLERANCE)


def _conv4_body(weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """conv4's body (tests/test_maml.py's layout: conv, batch-norm scale and shift per block)."""
    h = x
    for block in range(4):
        conv_w, bn_w, bn_b = weights[3 * block : 3 * block + 3]
        h = F.conv2d(h, conv_w, padding=1)
        h = F.batch_norm(h, None, None, bn_w, bn_b, training=True, eps=1e-5)
        h = F.max_pool2d(F.relu(h), 2)
    return h.flatten(1)


def _protonet_reference(weights: list[torch.Tensor], batch) -> list[torch.Tensor]:
    """Snell et al.'s loss by its definition: each episode embedded in one pass, prototypes the
    class means, logits the negative squared distances; the mean over tasks."""
    total = torch.zeros((), dtype=torch.float64)
    shots = batch.support_x.shape[1]
    for t in range(batch.meta_batch_size):
        both = _conv4_body(weights, torch.cat([batch.support_x[t], batch.query_x[t]]))
        support, query = both[:shots], both[shots:]
        prototypes = torch.stack([support[batch.support_y[t] == c].mean(0) for c in range(WAYS)])
        logits = -((query[:, None] - prototypes[None]) ** 2).sum(-1)
        total = total + F.cross_entropy(logits, batch.query_y[t])
    return list(torch.autograd.grad(total / batch.meta_batch_size, weights))


def test_protonet_meta_gradient_on_cuda_matches_the_cpu_float64_reference():
    model = make_model("conv4", "classification")
    batch = make_batch("classification", input_shape("conv4"), seed=2)
    weights = reference_weights(model, "conv4")[:12]  # the body's; the head is unused
    expected = _protonet_reference(weights, batch)
    protonet = ProtoNet(copy.deepcopy(model).to(CUDA), "classification")
    loss, _ = protonet.meta_train_step(batch.to(CUDA))
    loss.backward()
    grads = [p.grad for p in protonet.body.parameters()]
    assert len(grads) == len(expected)
    for got, want in zip(grads, expected, strict=True):
        assert want.abs().max() > 0
        torch.testing.assert_close(got.cpu(), want, rtol=FLOAT64_TOLERANCE, atol=FLOAT64_TOLERANCE)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize(("backbone", "task_type", "driver"), CASES)
def test_low_precision_meta_gradient_on_cuda_is_within_the_stated_tolerance(
    backbone, task_type, driver, precision
):
    model = make_model(backbone, task_type)
    batch = make_batch(task_type, input_shape(backbone), seed=1)
    _, reference = reference_meta_gradient(
        backbone, reference_weights(model, backbone), batch, task_type, INNER_LR, INNER_STEPS
    )
    got = low_precision_meta_gradient(model, batch, task_type, driver, precision, device=CUDA)
    error = relative_error([g.cpu() for g in got], reference)
    assert 1e-4 < error < LOW_PRECISION_TOLERANCE


ENV = {**os.environ, "METARUN_DIST_TIMEOUT": "120"}
ENV.pop("HYDRA_FULL_ERROR", None)


def _metarun(*overrides: str, cwd: Path, launcher: tuple[str, ...] = ()) -> dict:
    """``python [launcher] -m metarun overrides``, checked, and its results.json."""
    command = [sys.executable, *launcher, "-m", "metarun", *overrides]
    proc = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return read_results(Path(overrides[-1].split("=", 1)[1]))


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_short_run_on_cuda_completes_and_saves_loadable_checkpoints(tmp_path, precision):
    run_dir = tmp_path / "run"
    results = _metarun(*SINUSOID_TINY, "trainer.device=cuda", f"trainer.precision={precision}",
                       f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert results["complete"] and results["iterations"] == 40
    assert 0.0 < results["meta_test"]["mean"] < 10.0
    saved = torch.load(run_dir / "checkpoints" / "last.pt", map_location="cpu", weights_only=False)
    assert saved["precision"]["name"] == precision
    assert all(torch.isfinite(t).all() for t in saved["algorithm"].values())


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="NCCL data parallelism needs 2+ GPUs")
def test_two_nccl_processes_match_one(tmp_path):
    tiny = [*SINUSOID_TINY, "task.meta_batch_size=4", "trainer.device=cuda"]
    one = _metarun(*tiny, f"hydra.run.dir={tmp_path / 'one'}", cwd=tmp_path)
    two = _metarun(*tiny, f"hydra.run.dir={tmp_path / 'two'}", cwd=tmp_path,
                   launcher=("-m", "torch.distributed.run", "--standalone",
                             "--nproc_per_node=2"))
    one, two = comparable(one), comparable(two)
    assert one["iterations"] == two["iterations"] == 40
    assert two["meta_test"]["mean"] == pytest.approx(one["meta_test"]["mean"], rel=1e-3)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["one", "two"]


def _same_episodes_on_cuda(host_sample, cuda_sample, tolerance: float) -> None:
    """Generators of one seed: the same episodes, made on the GPU (its float ops may round the
    last bits otherwise), arriving there (the trainer's move copies nothing), and the same
    draws taken from the CPU generator."""
    host_generator = torch.Generator().manual_seed(3)
    cuda_generator = torch.Generator().manual_seed(3)
    for _ in range(3):
        host, placed = host_sample(host_generator), cuda_sample(cuda_generator)
        moved = placed.to(CUDA)
        for name in vars(host):
            value, expected = getattr(placed, name), getattr(host, name)
            assert value.device.type == "cuda", name
            assert getattr(moved, name).data_ptr() == value.data_ptr(), name
            if expected.is_floating_point():
                assert torch.allclose(value.cpu(), expected, rtol=0, atol=tolerance), name
            else:
                assert torch.equal(value.cpu(), expected), name
    assert torch.equal(host_generator.get_state(), cuda_generator.get_state())


@pytest.mark.parametrize("augment", [None, {"enabled": True}], ids=["plain", "augmented"])
def test_image_rows_on_cuda_give_the_cpu_episodes(tmp_path, augment):
    host = Fixture(str(tmp_path), image_size=8, augment=augment)
    placed = Fixture(str(tmp_path), image_size=8, augment=augment, on_device=True)
    placed.place_on(CUDA)
    assert isinstance(placed.images, DeviceImageRows) and placed.images.device.type == "cuda"
    # Normalising is exact up to a rounding; bilinear crops and jitter may differ a little more.
    tolerance = 1e-6 if augment is None else 1e-4
    for split in ("train", "val"):
        _same_episodes_on_cuda(lambda g, d=host, s=split: d.sampler(s, 2, 2, 1).sample(4, g),
                               lambda g, d=placed, s=split: d.sampler(s, 2, 2, 1).sample(4, g),
                               tolerance)
    _same_episodes_on_cuda(host.batch_sampler("train", 7).sample,
                           placed.batch_sampler("train", 7).sample, tolerance)


def test_omniglot_on_cuda_gives_the_cpu_episodes(tmp_path, make_fake_omniglot):
    make_fake_omniglot(tmp_path)
    host = Omniglot(root=str(tmp_path), download=False)
    placed = Omniglot(root=str(tmp_path), download=False)  # on_device=auto: a few MB fit
    placed.place_on(CUDA)
    assert placed.images.device.type == "cuda"
    _same_episodes_on_cuda(lambda g: host.sampler("train", 4, 2, 3).sample(8, g),
                           lambda g: placed.sampler("train", 4, 2, 3).sample(8, g), 1e-6)
    _same_episodes_on_cuda(host.batch_sampler("train", 9).sample,
                           placed.batch_sampler("train", 9).sample, 1e-6)


def test_auto_puts_omniglot_sized_images_on_the_gpu():
    """The real Omniglot at 28 px (about 25 MB) against this GPU's free memory."""
    assert store_device("auto", 32_460 * 28 * 28, CUDA) == CUDA
