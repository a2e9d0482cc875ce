"""On a CUDA device: meta-gradients against the CPU float64 references, bf16/fp16 against them,
whole runs with trainer.device=cuda, and two NCCL processes against one.

Skipped without CUDA; ``scripts/device_bench.sh run`` runs this module on the device machine
(where metarun is on PYTHONPATH, not installed: runs go through ``python -m metarun``). The uint8
dataset resident on the GPU does not exist yet, so nothing here tests it.
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
from tests.runs import SINUSOID_TINY, comparable, read_results
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
