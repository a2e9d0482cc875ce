"""Every algorithm's per-query class probabilities (what `metarun-ensemble` blends): distributions
over the task's classes whose argmax is exactly what `evaluate` scores as accurate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from metarun.build import build
from metarun.config import register_configs
from metarun.data.episodes import TaskBatch
from tests.conftest import build_fake_omniglot
from tests.test_all_algorithms import ALGORITHMS

WAYS, SHOTS, QUERIES, TASKS = 3, 2, 3, 4


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fake-omniglot")
    build_fake_omniglot(root, characters=8)  # 64 training classes: ProtoNet trains 60-way
    return root


def built(algo: str, root: Path, *overrides: str):
    """The algorithm and the test sampler, as `metarun algo=<algo>` builds them (untrained)."""
    register_configs()
    with initialize_config_module(config_module="metarun.configs", version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                f"algo={algo}",
                "dataset=omniglot",
                f"dataset.root={root}",
                f"dataset.cache_dir={root / 'cache'}",
                "dataset.download=false",
                "backbone.channels=4",
                f"task.ways={WAYS}",
                f"task.shots={SHOTS}",
                f"task.queries={QUERIES}",
                "task.meta_batch_size=2",
                "trainer.device=cpu",
                *overrides,
            ],
        )
    parts = build(cfg)
    return parts.algorithm.eval(), parts.samplers["test"]


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_probabilities_sum_to_one_and_their_argmax_is_evaluates_accuracy(algo, fake_root) -> None:
    algorithm, sampler = built(algo, fake_root)
    batch = sampler.sample(TASKS, torch.Generator().manual_seed(7))
    probabilities = algorithm.query_probabilities(batch)
    assert probabilities.shape == (TASKS, WAYS * QUERIES, WAYS)
    assert probabilities.dtype == torch.float64
    assert bool((probabilities >= 0).all())
    torch.testing.assert_close(
        probabilities.sum(-1), torch.ones(TASKS, WAYS * QUERIES, dtype=torch.float64),
        rtol=0, atol=1e-12,
    )
    # Compared as counts of correct queries: evaluate's accuracy is in the model's dtype.
    correct = (probabilities.argmax(-1) == batch.query_y).sum(1)
    evaluated = algorithm.evaluate(batch)["accuracy"].double() * WAYS * QUERIES
    assert correct.tolist() == evaluated.round().long().tolist()
    assert all(p.grad is None for p in algorithm.parameters())
    # Evaluation is a function of the task alone: the same task alone gives the same numbers.
    alone = algorithm.query_probabilities(batch.task(2))
    # (float32: a meta-batch of one runs on other threads, with sums in another order)
    torch.testing.assert_close(alone[0], probabilities[2], rtol=1e-3, atol=1e-4)


def test_maml_probabilities_come_after_adaptation(fake_root) -> None:
    """The inner loop still adapts under evaluation's no_grad: with a vanishing inner learning
    rate the probabilities are the unadapted model's softmax, with a real one they differ."""
    algorithm, sampler = built("maml", fake_root, "algo.inner_lr=0.5")
    batch = sampler.sample(TASKS, torch.Generator().manual_seed(3))
    adapted = algorithm.query_probabilities(batch)
    with torch.no_grad():
        unadapted = torch.stack(
            [algorithm.model(x).double().softmax(-1) for x in batch.query_x]
        )
    # float32, the loop's channels-last layout against a plain forward: equal to 1e-5 or so.
    assert (adapted - unadapted).abs().max() > 0.05
    algorithm.inner_lr = 1e-30
    torch.testing.assert_close(algorithm.query_probabilities(batch), unadapted, rtol=0, atol=1e-4)


def test_relationnet_probabilities_are_its_scores_over_their_sum(fake_root) -> None:
    """The relation scores (MSE-trained, not a distribution) become probabilities by dividing
    each query's scores by their sum, not by a softmax over them."""
    algorithm, sampler = built("relationnet", fake_root)
    batch: TaskBatch = sampler.sample(TASKS, torch.Generator().manual_seed(5))
    with torch.no_grad():
        scores = algorithm.relation_scores(batch).double()
    expected = scores / scores.sum(-1, keepdim=True)
    # float32: evaluation runs the executed copies on the task threads (channels-last on two
    # threads), the reference the plain modules, so they agree to rounding, not bit for bit.
    torch.testing.assert_close(algorithm.query_probabilities(batch), expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(algorithm.query_probabilities(batch), scores.softmax(-1))
