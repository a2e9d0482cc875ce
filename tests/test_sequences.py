"""Episodes as sequences (metarun.data.sequences): the support in a drawn order with its labels
shifted by one step, then the queries with blank label inputs; query labels are never inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metarun.data.episodes import TaskBatch
from metarun.data.sequences import episode_sequence

WAYS, SHOTS, QUERIES, TASKS = 4, 3, 2, 5


def make_batch(seed: int = 0) -> TaskBatch:
    """Class-major labels as the samplers give them; every image is distinct."""
    g = torch.Generator().manual_seed(seed)
    support_x = torch.randn(TASKS, WAYS * SHOTS, 1, 3, 3, generator=g)
    query_x = torch.randn(TASKS, WAYS * QUERIES, 1, 3, 3, generator=g)
    support_y = torch.arange(WAYS).repeat_interleave(SHOTS).repeat(TASKS, 1)
    query_y = torch.arange(WAYS).repeat_interleave(QUERIES).repeat(TASKS, 1)
    return TaskBatch(support_x, support_y, query_x, query_y)


def draw(batch: TaskBatch, seed: int = 0):
    return episode_sequence(batch, WAYS, torch.Generator().manual_seed(seed))


def test_support_is_a_per_task_permutation_with_its_own_labels() -> None:
    batch = make_batch()
    sequence = draw(batch)
    for task in range(TASKS):
        order = sequence.order[task]
        assert sorted(order.tolist()) == list(range(WAYS * SHOTS))
        for position, source in enumerate(order.tolist()):
            assert torch.equal(sequence.support_x[task, position], batch.support_x[task, source])
            assert sequence.support_y[task, position] == batch.support_y[task, source]
    # Class-major order would give the labels away: the drawn orders are not it, and differ.
    identity = torch.arange(WAYS * SHOTS)
    assert not any(torch.equal(order, identity) for order in sequence.order)
    assert len({tuple(order.tolist()) for order in sequence.order}) == TASKS


def test_the_generator_fixes_the_order() -> None:
    batch = make_batch()
    assert torch.equal(draw(batch, seed=3).order, draw(batch, seed=3).order)
    assert not torch.equal(draw(batch, seed=3).order, draw(batch, seed=4).order)


def test_label_input_is_the_previous_position_label() -> None:
    sequence = draw(make_batch())
    previous = sequence.previous_labels
    assert previous.shape == (TASKS, WAYS * SHOTS, WAYS)
    assert torch.equal(previous[:, 0], torch.zeros(TASKS, WAYS))
    for position in range(1, WAYS * SHOTS):
        expected = F.one_hot(sequence.support_y[:, position - 1], WAYS).float()
        assert torch.equal(previous[:, position], expected)
    # The label the shift pushes out, and the unshifted pairs, are the support's own.
    assert torch.equal(sequence.last_label, F.one_hot(sequence.support_y[:, -1], WAYS).float())
    assert torch.equal(sequence.support_labels, F.one_hot(sequence.support_y, WAYS).float())


def test_queries_have_blank_label_inputs_and_their_labels_only_as_targets() -> None:
    batch = make_batch()
    sequence = draw(batch)
    assert torch.equal(sequence.query_labels, torch.zeros(TASKS, WAYS * QUERIES, WAYS))
    assert torch.equal(sequence.query_x, batch.query_x)
    assert torch.equal(sequence.targets, torch.cat([sequence.support_y, batch.query_y], 1))

    # Other query labels change the targets and nothing else.
    permuted = batch.query_y[:, torch.randperm(WAYS * QUERIES)]
    relabelled = draw(TaskBatch(batch.support_x, batch.support_y, batch.query_x, permuted))
    assert torch.equal(relabelled.query_y, permuted)
    for name in ("support_x", "support_y", "previous_labels", "query_x", "query_labels"):
        assert torch.equal(getattr(relabelled, name), getattr(sequence, name)), name


def test_labels_outside_the_ways_are_refused() -> None:
    batch = make_batch()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        episode_sequence(batch, WAYS - 1, torch.Generator())
    floats = TaskBatch(batch.support_x, batch.support_y.float(), batch.query_x, batch.query_y)
    with pytest.raises(ValueError, match="class labels"):
        episode_sequence(floats, WAYS, torch.Generator())


# --- Every sequence learner: no label leakage, and resumable support orders --------------------

from metarun.algorithms.mann import MANN  # noqa: E402
from metarun.algorithms.snail import SNAIL  # noqa: E402
from metarun.models.conv4 import Conv4  # noqa: E402

IMAGE = (1, 16, 16)
SMALL = {
    "mann": lambda model: MANN(model, "classification", controller_size=12, memory_slots=6,
                               memory_size=5, read_heads=2),
    "snail": lambda model: SNAIL(model, "classification", shots=SHOTS, key_sizes=[6, 8],
                                 value_sizes=[4, 5], tc_filters=3),
}


def image_batch(seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    support_x = torch.rand(2, WAYS * SHOTS, *IMAGE, generator=g, dtype=torch.float64)
    query_x = torch.rand(2, WAYS * QUERIES, *IMAGE, generator=g, dtype=torch.float64)
    support_y = torch.arange(WAYS).repeat_interleave(SHOTS).repeat(2, 1)
    query_y = torch.arange(WAYS).repeat_interleave(QUERIES).repeat(2, 1)
    return TaskBatch(support_x, support_y, query_x, query_y)


def learner(name: str, batch_norm: bool = True):
    torch.manual_seed(0)
    return SMALL[name](Conv4(IMAGE, WAYS, channels=4, batch_norm=batch_norm)).double()


@pytest.mark.parametrize("name", list(SMALL))
def test_query_labels_change_no_prediction(name: str) -> None:
    algorithm, batch = learner(name), image_batch()
    outputs = algorithm.evaluation_outputs(batch)
    for seed in range(3):
        shuffled = batch.query_y[:, torch.randperm(WAYS * QUERIES, generator=torch.Generator()
                                                   .manual_seed(seed))]
        other = TaskBatch(batch.support_x, batch.support_y, batch.query_x, shuffled)
        assert torch.equal(algorithm.evaluation_outputs(other), outputs)
    # Training reads the queries the same way: its query accuracy is the same for any labels
    # that score the same, and its loss is finite.
    loss, metrics = algorithm.meta_train_step(batch)
    assert torch.isfinite(loss) and 0.0 <= metrics["accuracy"] <= 1.0


@pytest.mark.parametrize("name", list(SMALL))
def test_other_queries_change_no_prediction(name: str) -> None:
    # Without batch-norm the body embeds every image on its own: any other query may change.
    algorithm, batch = learner(name, batch_norm=False), image_batch()
    outputs = algorithm.evaluation_outputs(batch)
    others = torch.rand_like(batch.query_x)
    others[:, 0] = batch.query_x[:, 0]
    changed = algorithm.evaluation_outputs(
        TaskBatch(batch.support_x, batch.support_y, others, batch.query_y)
    )
    torch.testing.assert_close(changed[:, 0], outputs[:, 0], rtol=0, atol=1e-12)
    assert not torch.allclose(changed[:, 1:], outputs[:, 1:])

    # With batch-norm (statistics over the episode) the queries may be reordered: each query's
    # prediction moves with it.
    algorithm = learner(name)
    outputs = algorithm.evaluation_outputs(batch)
    order = torch.randperm(WAYS * QUERIES, generator=torch.Generator().manual_seed(1))
    reordered = TaskBatch(batch.support_x, batch.support_y, batch.query_x[:, order],
                          batch.query_y[:, order])
    torch.testing.assert_close(algorithm.evaluation_outputs(reordered), outputs[:, order],
                               rtol=0, atol=1e-10)


@pytest.mark.parametrize("name", list(SMALL))
def test_training_orders_resume_from_saved_state(name: str) -> None:
    batch = image_batch()
    first = learner(name)
    first.meta_train_step(batch)
    saved = first.state_dict()
    expected, _ = first.meta_train_step(batch)

    resumed = learner(name)
    resumed.load_state_dict(saved)
    again, _ = resumed.meta_train_step(batch)
    assert torch.equal(again, expected)
    # Evaluation always reads a task in the same order and leaves training's draws alone.
    assert torch.equal(resumed.evaluation_outputs(batch), resumed.evaluation_outputs(batch))
