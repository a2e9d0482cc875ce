"""Sinusoid tasks follow the MAML protocol: y = A sin(x - phase) with the paper's ranges."""

from __future__ import annotations

import math

import pytest
import torch

from metarun.data.sinusoid import Sinusoid
from metarun.errors import ConfigError


def fit_amplitude_and_phase(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Least squares on A sin(x - p) = (A cos p) sin x - (A sin p) cos x, per task."""
    design = torch.stack([torch.sin(x), torch.cos(x)], dim=-1).double()  # [B, M, 2]
    coefficients = torch.linalg.lstsq(design, y.double().unsqueeze(-1)).solution.squeeze(-1)
    a, b = coefficients[:, 0], coefficients[:, 1]
    return torch.hypot(a, b), torch.atan2(-b, a), design, coefficients


def test_shapes_and_dtypes():
    dataset = Sinusoid()
    batch = dataset.sampler("train", ways=5, shots=10, queries=7).sample(
        4, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (4, 10, 1) and batch.support_y.shape == (4, 10)
    assert batch.query_x.shape == (4, 7, 1) and batch.query_y.shape == (4, 7)
    assert all(t.dtype == torch.float32 for t in (batch.support_x, batch.support_y,
                                                  batch.query_x, batch.query_y))
    assert dataset.task_type == "regression" and dataset.input_shape == (1,)
    assert dataset.output_size(5) == 1 and dataset.num_classes("test") is None


def test_tasks_cover_the_paper_ranges():
    batch = Sinusoid().sampler("train", 1, 25, 25).sample(2000, torch.Generator().manual_seed(1))
    x = torch.cat([batch.support_x, batch.query_x], dim=1).squeeze(-1)
    y = torch.cat([batch.support_y, batch.query_y], dim=1)
    assert float(x.min()) >= -5.0 and float(x.max()) <= 5.0
    assert float(x.min()) < -4.9 and float(x.max()) > 4.9
    amplitude, phase, _, _ = fit_amplitude_and_phase(x, y)
    assert 0.1 - 1e-4 <= float(amplitude.min()) < 0.2
    assert 4.9 < float(amplitude.max()) <= 5.0 + 1e-4
    assert -1e-4 <= float(phase.min()) < 0.05
    assert math.pi - 0.05 < float(phase.max()) <= math.pi + 1e-4


def test_support_and_query_come_from_the_same_function():
    batch = Sinusoid().sampler("val", 1, 5, 30).sample(16, torch.Generator().manual_seed(2))
    _, _, _, coefficients = fit_amplitude_and_phase(batch.support_x.squeeze(-1), batch.support_y)
    query_x = batch.query_x.squeeze(-1).double()
    predicted = coefficients[:, :1] * torch.sin(query_x) + coefficients[:, 1:] * torch.cos(query_x)
    assert torch.allclose(predicted, batch.query_y.double(), atol=1e-4)


def test_custom_ranges_are_respected():
    dataset = Sinusoid(amplitude=[2.0, 2.0], phase=[0.5, 0.5], x_range=[0.0, 1.0])
    batch = dataset.sampler("train", 1, 20, 1).sample(3, torch.Generator().manual_seed(0))
    x = batch.support_x.squeeze(-1)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert torch.allclose(batch.support_y, 2.0 * torch.sin(x - 0.5))


def test_same_seed_same_tasks():
    sampler = Sinusoid().sampler("train", 1, 5, 5)
    first = sampler.sample(8, torch.Generator().manual_seed(7))
    again = sampler.sample(8, torch.Generator().manual_seed(7))
    other = sampler.sample(8, torch.Generator().manual_seed(8))
    assert torch.equal(first.support_x, again.support_x)
    assert torch.equal(first.query_y, again.query_y)
    assert not torch.equal(first.support_y, other.support_y)


@pytest.mark.parametrize(("shots", "queries", "key"), [(0, 5, "task.shots"),
                                                       (5, 0, "task.queries")])
def test_empty_support_or_query_is_a_config_error(shots, queries, key):
    with pytest.raises(ConfigError, match=rf"{key}=0 but it must be at least 1"):
        Sinusoid().sampler("train", 1, shots, queries)


@pytest.mark.parametrize("amplitude", [[5.0, 0.1], [1.0], ["a", "b"]])
def test_bad_interval_is_a_config_error(amplitude):
    with pytest.raises(ConfigError, match=r"dataset.amplitude=.* must be two numbers"):
        Sinusoid(amplitude=amplitude)
