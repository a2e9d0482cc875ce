"""ClassImageSampler: right shapes, distinct classes and drawings, true rotations, reproducible."""

from __future__ import annotations

import pytest
import torch

from metarun.data.episodes import ClassImageSampler, TaskBatch, fixed_episodes

SOURCES, DRAWINGS, PIXELS = 4, 20, 5


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Random 5x5 images: every (source, drawing, rotation) looks different from every other."""
    return torch.randint(0, 256, (SOURCES, DRAWINGS, PIXELS, PIXELS),
                         generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


@pytest.fixture(scope="module")
def identify(images):
    """Maps a sampled float image back to the (source, drawing, quarter turns) it came from."""
    table = {}
    for source in range(SOURCES):
        for drawing in range(DRAWINGS):
            for turns in range(4):
                key = torch.rot90(images[source, drawing], turns).numpy().tobytes()
                table[key] = (source, drawing, turns)
    assert len(table) == SOURCES * DRAWINGS * 4  # the lookup itself is unambiguous

    def lookup(image: torch.Tensor) -> tuple[int, int, int]:
        pixels = (image.squeeze(0) * 255).round().to(torch.uint8)
        return table[pixels.numpy().tobytes()]

    return lookup


# Eight classes: every source unrotated, and every source turned by a different amount.
CLASS_SOURCE = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
CLASS_ROTATION = torch.tensor([0, 0, 0, 0, 1, 2, 3, 1])


def make_sampler(images, ways=5, shots=2, queries=3) -> ClassImageSampler:
    return ClassImageSampler(images, CLASS_SOURCE, CLASS_ROTATION, ways, shots, queries)


def test_shapes_dtypes_and_class_major_labels(images):
    batch = make_sampler(images).sample(6, torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (6, 10, 1, PIXELS, PIXELS)
    assert batch.query_x.shape == (6, 15, 1, PIXELS, PIXELS)
    assert batch.support_x.dtype == batch.query_x.dtype == torch.float32
    assert batch.support_y.dtype == batch.query_y.dtype == torch.int64
    assert float(batch.support_x.min()) >= 0.0 and float(batch.support_x.max()) <= 1.0
    assert batch.support_y.tolist() == [[0, 0, 1, 1, 2, 2, 3, 3, 4, 4]] * 6
    assert batch.query_y.tolist() == [[0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]] * 6


def test_each_task_has_distinct_classes_and_drawings_with_true_rotations(images, identify):
    ways, shots, queries = 5, 2, 3
    batch = make_sampler(images, ways, shots, queries).sample(40, torch.Generator().manual_seed(3))
    valid_classes = set(zip(CLASS_SOURCE.tolist(), CLASS_ROTATION.tolist(), strict=True))
    seen_classes = set()
    for task in range(40):
        classes = []
        for label in range(ways):
            support = batch.support_x[task, label * shots:(label + 1) * shots]
            query = batch.query_x[task, label * queries:(label + 1) * queries]
            found = [identify(image) for image in torch.cat([support, query])]
            # One class per label: same source, same rotation, K+Q different drawings.
            assert len({(source, turns) for source, _, turns in found}) == 1
            assert len({drawing for _, drawing, _ in found}) == shots + queries
            source, _, turns = found[0]
            assert (source, turns) in valid_classes
            classes.append((source, turns))
        assert len(set(classes)) == ways
        seen_classes.update(classes)
    assert seen_classes == valid_classes  # over 40 tasks every class shows up


def test_quarter_turn_is_counter_clockwise():
    image = torch.zeros(1, 20, 3, 3, dtype=torch.uint8)
    image[0, :, 0, 2] = 255  # a dot in the top-right corner
    sampler = ClassImageSampler(image, torch.tensor([0, 0]), torch.tensor([1, 0]), 2, 1, 1)
    batch = sampler.sample(8, torch.Generator().manual_seed(0))
    for task in range(8):
        dots = {tuple(batch.support_x[task, label, 0].nonzero()[0].tolist()) for label in (0, 1)}
        # The unturned class keeps its dot at the top right; the turned one (a quarter turn to
        # the left) has it at the top left. A clockwise turn would put it at the bottom right.
        assert dots == {(0, 2), (0, 0)}


def test_sampled_image_equals_hand_rotated_source(images):
    sampler = ClassImageSampler(images, torch.tensor([2, 3]), torch.tensor([3, 2]), 2, 1, 1)
    batch = sampler.sample(1, torch.Generator().manual_seed(5))
    for image in (batch.support_x[0, 0, 0], batch.query_x[0, 0, 0]):
        pixels = (image * 255).round().to(torch.uint8)
        matches = [d for d in range(DRAWINGS) for source, turns in ((2, 3), (3, 2))
                   if torch.equal(pixels, torch.rot90(images[source, d], turns, dims=(0, 1)))]
        assert len(matches) == 1


def test_same_generator_seed_same_tasks(images):
    sampler = make_sampler(images)
    first = sampler.sample(4, torch.Generator().manual_seed(11))
    again = sampler.sample(4, torch.Generator().manual_seed(11))
    other = sampler.sample(4, torch.Generator().manual_seed(12))
    assert torch.equal(first.support_x, again.support_x)
    assert torch.equal(first.query_x, again.query_x)
    assert not torch.equal(first.support_x, other.support_x)


def test_fixed_episodes_are_reproducible(images):
    sampler = make_sampler(images)
    first = fixed_episodes(sampler, episodes=7, meta_batch_size=3, seed=4)
    again = fixed_episodes(sampler, episodes=7, meta_batch_size=3, seed=4)
    assert [batch.meta_batch_size for batch in first] == [3, 3, 1]
    assert all(torch.equal(a.query_x, b.query_x) for a, b in zip(first, again, strict=True))


def test_sampling_does_not_modify_the_base_images(images):
    before = images.clone()
    batch = make_sampler(images).sample(8, torch.Generator().manual_seed(0))
    assert isinstance(batch, TaskBatch)
    assert torch.equal(images, before)


@pytest.mark.parametrize(("ways", "shots", "queries"), [(9, 1, 1), (2, 15, 6), (2, 0, 1)])
def test_impossible_shapes_are_rejected(images, ways, shots, queries):
    with pytest.raises(ValueError):
        make_sampler(images, ways, shots, queries)
