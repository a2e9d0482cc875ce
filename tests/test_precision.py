"""trainer.precision: bf16/fp16 meta-gradients against float64 references, autocast on the task
threads, loss scaling inside the task-by-task driver, and one-line refusals.

Runs of the trainer in bf16/fp16 (training, exact resume, fp16 overflow, several processes) are
in tests/test_precision_runs.py.
"""

from __future__ import annotations

import copy
import threading

import pytest
import torch
from hydra import compose, initialize_config_module
from torch import Tensor, nn

from metarun.algorithms.maml import MAML
from metarun.config import register_configs, validate
from metarun.data.episodes import TaskBatch
from metarun.errors import ConfigError
from metarun.execution import drivers
from metarun.execution.precision import scaled_task_losses
from metarun.precision import Precision, check_precision
from tests.runs import run_metarun
from tests.test_maml import (
    input_shape,
    make_batch,
    make_model,
    reference_meta_gradient,
    reference_weights,
)

#: How far a low-precision meta-gradient may be from the float64 one: 5% of its norm. bf16
#: rounds each op to 2^-8 (0.4%), fp16 to 2^-11; a 2-step second-order meta-gradient chains
#: dozens of rounded ops (measured on these tasks: bf16 0.3-3.6%, fp16 0.05-1.5%). float32 is
#: within about 1e-6, and first-order MAML's gradient is 17-100% away from second order's here,
#: so the bound tells a low-precision second-order gradient from both.
LOW_PRECISION_TOLERANCE = 5e-2
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
INNER_LR, INNER_STEPS = 0.3, 2
# Batch-norm is left out on purpose: at initialisation on noise images a *plain* gradient of
# conv4 with batch-norm is already 10-17% away from float64 under bf16 (its normalisation
# cancels most of the gradient), so a bound on it would measure the toy task, not metarun.
CASES = [
    ("mlp", "regression", "vmap"),
    ("mlp", "regression", "loop"),
    ("mlp", "classification", "loop"),
    ("conv4-nobn", "classification", "loop"),
]


@pytest.fixture
def two_task_threads():
    """Two intra-op threads, so the loop driver runs the tasks on two task threads."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def relative_error(got: list[Tensor], want: list[Tensor]) -> float:
    got_flat = torch.cat([g.double().reshape(-1) for g in got])
    want_flat = torch.cat([w.reshape(-1) for w in want])
    return ((got_flat - want_flat).norm() / want_flat.norm()).item()


def low_precision_meta_gradient(model64: nn.Module, batch, task_type: str, driver: str,
                                precision: str, device: torch.device | None = None
                                ) -> list[Tensor]:
    """The meta-gradient as the trainer takes it: float32 weights, the forward under the run's
    ``Precision`` (fp16: loss-scaled, here unscaled again to compare). A fresh fp16 scale (2^16)
    can overflow the loss-scaled inner loop (one of these cases does): then, as the trainer, the
    step is skipped, the scale halved and the step taken again."""
    device = device or torch.device("cpu")
    model = copy.deepcopy(model64).to(device, torch.float32)
    maml = MAML(model, task_type, INNER_LR, INNER_STEPS, task_batching=driver)
    run_precision = Precision(precision, device)
    for _ in range(4):
        with run_precision.forward():
            loss, _ = maml.meta_train_step(batch.to(device, torch.float32))
        if torch.isfinite(loss) or not run_precision.inner_overflow_possible:
            break
        run_precision.skip_overflow(torch.optim.SGD(model.parameters(), lr=0.0))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    run_precision.backward(loss)
    scale = 1.0 if run_precision.scaler is None else run_precision.scaler.get_scale()
    return [p.grad / scale for p in model.parameters()]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize(("backbone", "task_type", "driver"), CASES)
def test_second_order_meta_gradient_matches_float64_within_the_stated_tolerance(
    backbone, task_type, driver, precision, two_task_threads
):
    model = make_model(backbone, task_type)
    batch = make_batch(task_type, input_shape(backbone), seed=1)
    _, reference = reference_meta_gradient(
        backbone, reference_weights(model, backbone), batch, task_type, INNER_LR, INNER_STEPS
    )
    got = low_precision_meta_gradient(model, batch, task_type, driver, precision)
    error = relative_error(got, reference)
    assert error < LOW_PRECISION_TOLERANCE
    assert error > 1e-4  # the forward did run in low precision (float32 is ~1e-6 off)
    # First-order MAML's float64 gradient is well outside the bound: the second-order terms
    # that autocast differentiates through are really there.
    fomaml = MAML(copy.deepcopy(model), task_type, INNER_LR, INNER_STEPS, first_order=True,
                  task_batching=driver)
    loss, _ = fomaml.meta_train_step(batch)
    loss.backward()
    first_order = [p.grad for p in fomaml.parameters()]
    assert relative_error(first_order, reference) > 3 * LOW_PRECISION_TOLERANCE


# Shared across deep copies: the copies a driver makes of the model record here too.
SEEN: list[tuple[str, torch.dtype]] = []


class RecordInput(nn.Module):
    def forward(self, inputs: Tensor) -> Tensor:
        SEEN.append((threading.current_thread().name, inputs.dtype))
        return inputs


def test_the_task_threads_run_the_tasks_under_the_callers_autocast(two_task_threads):
    def work(indices: range) -> tuple[str, torch.dtype, bool]:
        product = torch.ones(4, 4) @ torch.ones(4, 4)
        return threading.current_thread().name, product.dtype, torch.is_grad_enabled()

    modules = [nn.Identity(), nn.Identity()]
    with torch.autocast("cpu", torch.bfloat16), torch.no_grad():
        inside = drivers.run_tasks(work, 6, modules)
    assert {dtype for _, dtype, _ in inside} == {torch.bfloat16}
    assert all(name.startswith("metarun-task") for name, _, _ in inside)
    assert not any(grad for _, _, grad in inside)
    # The same pool threads, called without autocast: nothing was left entered.
    outside = drivers.run_tasks(work, 6, modules)
    assert {dtype for _, dtype, _ in outside} == {torch.float32}

    # Through MAML's loop driver: the second layer's input (the first layer's output) is bf16
    # in every task thread.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), RecordInput(), nn.ReLU(), nn.Linear(8, 1))
    maml = MAML(model, "regression", INNER_LR, 1, task_batching="loop")
    batch = make_batch("regression", (2,), seed=0, tasks=4).to("cpu", torch.float32)
    SEEN.clear()
    with torch.autocast("cpu", torch.bfloat16):
        maml.meta_train_step(batch)
    threads = {name for name, _ in SEEN}
    # (which of the two threads took which task depends on the load: each takes the next free)
    assert threads and all(name.startswith("metarun-task") for name in threads)
    assert {dtype for _, dtype in SEEN} == {torch.bfloat16}


def test_the_task_by_task_driver_scales_each_tasks_backward(two_task_threads):
    """A scale that overflows float16 in a task's backward of the meta-loss shows up as inf in the
    meta-gradient (so it reached the per-task backward) while the loss keeps its finite value; a
    moderate one gives the unscaled gradient back. The inner loop is loss-scaled too: the query
    targets are moved 100 away so the meta-loss's gradients are ~100 times the support loss's,
    and a scale overflows the first alone (the inner loop's overflow is the next test's)."""
    model = make_model("mlp", "regression").float()
    batch = make_batch("regression", (2,), seed=1).to("cpu", torch.float32)
    batch = TaskBatch(batch.support_x, batch.support_y, batch.query_x, batch.query_y + 100)
    maml = MAML(model, "regression", INNER_LR, INNER_STEPS, task_batching="loop")
    results = {}
    for scale in (1.0, 2.0**6, 2.0**14):
        maml.zero_grad(set_to_none=True)
        with torch.autocast("cpu", torch.float16), scaled_task_losses(scale):
            loss, _ = maml.meta_train_step(batch)
        loss.backward()
        results[scale] = loss.item(), [p.grad.clone() for p in model.parameters()]
    assert results[1.0][0] == results[2.0**6][0] == results[2.0**14][0]
    assert all(torch.isfinite(g).all() for g in results[2.0**6][1])
    assert relative_error(results[2.0**6][1], [g.double() for g in results[1.0][1]]) < 1e-2
    assert not all(torch.isfinite(g).all() for g in results[2.0**14][1])


def _compose(*overrides: str):
    register_configs()
    with initialize_config_module(config_module="metarun.configs", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("value", ["fp8", "float16", "BF16", "16"])
def test_an_unknown_precision_is_refused_in_one_line(value):
    with pytest.raises(ConfigError) as refused:
        validate(_compose(f"trainer.precision={value}"))
    message = str(refused.value)
    assert "\n" not in message
    assert message == f"trainer.precision={value!r} is not allowed: use fp32, bf16 or fp16"
    validate(_compose("trainer.precision=bf16"))  # the allowed ones pass


def test_autocast_precisions_are_refused_on_other_devices_in_one_line():
    for device in ("mps", "meta"):
        with pytest.raises(ConfigError, match=f"runs on cpu or cuda, not {device}") as refused:
            check_precision("bf16", torch.device(device))
        assert "\n" not in str(refused.value)
    check_precision("fp32", torch.device("meta"))  # float32 needs no autocast


def test_the_cli_refuses_a_bad_precision_before_any_data_loads(tmp_path):
    proc = run_metarun("trainer.precision=half", cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "trainer.precision='half' is not allowed: use fp32, bf16 or fp16"
    ), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.glob("outputs/*/*/checkpoints"))
