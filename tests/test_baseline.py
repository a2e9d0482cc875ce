"""Baseline / Baseline++: head fitting, cosine logits, pre-training draws, a frozen body at test
time, per-task batch-norm, refusals, and the labelled mini-batch sampler."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metarun.algorithms.baseline import Baseline, CosineClassifier, cosine_logits
from metarun.data.episodes import ClassImageBatchSampler, LabeledBatch, TaskBatch
from metarun.data.omniglot import Omniglot
from metarun.data.sinusoid import Sinusoid
from metarun.errors import ConfigError
from metarun.models.conv4 import Conv4
from metarun.models.mlp import MLP
from tests.runs import run_metarun

IMAGE = (1, 16, 16)


def identity_body_baseline(dim: int, classifier: str, **kwargs) -> Baseline:
    """An MLP without hidden layers has the identity as its body: tasks can be given as features."""
    return Baseline(MLP((dim,), 2, hidden=()).double(), "classification", classifier, **kwargs)


def clustered_tasks(
    tasks: int, ways: int, shots: int, queries: int, dim: int, seed: int, spread: float = 0.1
) -> TaskBatch:
    """Each class a tight cluster around a random centre (norm ~ sqrt(dim)): separable, also by
    angle."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(tasks, ways, 1, dim, generator=g, dtype=torch.float64)

    def points(per_class: int) -> torch.Tensor:
        noise = torch.randn(tasks, ways, per_class, dim, generator=g, dtype=torch.float64)
        return (centres + spread * noise).reshape(tasks, ways * per_class, dim)

    support_y = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    query_y = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    return TaskBatch(points(shots), support_y, points(queries), query_y)


def image_tasks(tasks: int, seed: int, ways: int = 3, shots: int = 2, queries: int = 3):
    g = torch.Generator().manual_seed(seed)
    support_x = torch.rand(tasks, ways * shots, *IMAGE, generator=g, dtype=torch.float64)
    query_x = torch.rand(tasks, ways * queries, *IMAGE, generator=g, dtype=torch.float64)
    support_y = torch.arange(ways).repeat_interleave(shots).repeat(tasks, 1)
    query_y = torch.arange(ways).repeat_interleave(queries).repeat(tasks, 1)
    return TaskBatch(support_x, support_y, query_x, query_y)


def conv_baseline(classifier: str = "linear", **kwargs) -> Baseline:
    torch.manual_seed(0)
    return Baseline(Conv4(IMAGE, 3, channels=4).double(), "classification", classifier, **kwargs)


# ----------------------------------------------------------------------------- test-time heads


@pytest.mark.parametrize("classifier", ["linear", "cosine"])
def test_head_fit_classifies_a_separable_support_set_and_a_separated_query(classifier):
    algo = identity_body_baseline(16, classifier)
    batch = clustered_tasks(tasks=6, ways=5, shots=3, queries=10, dim=16, seed=1)
    head = algo.fit_heads(batch.support_x, batch.support_y, ways=5)
    assert head["weight"].shape == (6, 5, 16)
    support_predictions = algo.head_logits(head, batch.support_x).argmax(-1)
    assert torch.equal(support_predictions, batch.support_y)
    scores = algo.evaluate(batch)
    assert scores["accuracy"].tolist() == [1.0] * 6
    assert scores["loss"].shape == (6,) and bool((scores["loss"] < 0.5).all())
    # The labels matter: the same points with the query labels permuted score zero.
    permuted = TaskBatch(batch.support_x, batch.support_y, batch.query_x, (batch.query_y + 1) % 5)
    assert algo.evaluate(permuted)["accuracy"].tolist() == [0.0] * 6


def test_linear_head_fit_equals_torch_sgd_on_each_task_alone():
    """The batched fit is plain SGD with momentum and weight decay, task by task."""
    algo = identity_body_baseline(
        6, "linear", finetune_steps=7, finetune_lr=0.05, finetune_weight_decay=0.01
    )
    batch = clustered_tasks(tasks=3, ways=4, shots=2, queries=1, dim=6, seed=2, spread=1.0)
    head = algo.fit_heads(batch.support_x, batch.support_y, ways=4)
    start = algo.initial_head(1, 4, batch.support_x)
    for task in range(3):
        reference = nn.Linear(6, 4).double()
        with torch.no_grad():
            reference.weight.copy_(start["weight"][0])
            reference.bias.copy_(start["bias"][0])
        optimizer = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9,
                                    weight_decay=0.01)
        for _ in range(7):
            optimizer.zero_grad()
            F.cross_entropy(reference(batch.support_x[task]), batch.support_y[task]).backward()
            optimizer.step()
        torch.testing.assert_close(head["weight"][task], reference.weight.detach())
        torch.testing.assert_close(head["bias"][task], reference.bias.detach())


def test_cosine_logits_are_scale_times_cosine_by_hand():
    g = torch.Generator().manual_seed(3)
    features = torch.randn(2, 4, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    algo = identity_body_baseline(5, "cosine", scale=7.5)
    logits = algo.head_logits({"weight": weight}, features)
    classifier = CosineClassifier(5, 3, scale=7.5).double()
    with torch.no_grad():
        classifier.weight.copy_(weight[1])
    assert logits.shape == (2, 4, 3)
    for task in range(2):
        for m in range(4):
            for c in range(3):
                f, w = features[task, m].tolist(), weight[task, c].tolist()
                dot = sum(a * b for a, b in zip(f, w, strict=True))
                cosine = dot / (math.sqrt(sum(a * a for a in f)) * math.sqrt(sum(b * b for b in w)))
                assert logits[task, m, c].item() == pytest.approx(7.5 * cosine, abs=1e-12)
    torch.testing.assert_close(classifier(features[1]), logits[1])
    # Only directions count: rescaling features or weights changes nothing.
    torch.testing.assert_close(cosine_logits(3 * features, 0.1 * weight, 7.5), logits)


# ----------------------------------------------------------------------------- pre-training


@pytest.fixture(scope="module")
def fake_omniglot(tmp_path_factory) -> Omniglot:
    from tests.conftest import build_fake_omniglot

    root = tmp_path_factory.mktemp("fake-omniglot")
    build_fake_omniglot(root)
    return Omniglot(root=str(root), download=False, image_size=16)


@pytest.mark.parametrize("classifier", ["linear", "cosine"])
def test_training_batches_cover_all_train_classes_with_a_matching_classifier(
    fake_omniglot, classifier
):
    torch.manual_seed(0)
    algo = Baseline(Conv4(IMAGE, 5, channels=4), "classification", classifier, batch_size=24)
    assert algo.classifier is None
    draw = algo.training_batches(fake_omniglot, ways=5, shots=1, queries=1, meta_batch_size=3)
    classes = fake_omniglot.num_classes("train")
    assert classes == 16
    assert algo.classifier is not None and algo.classifier.weight.shape == (classes, 4)
    generator = torch.Generator().manual_seed(0)
    batch = draw(generator).to("cpu")
    assert isinstance(batch, LabeledBatch)
    assert batch.x.shape == (24, *IMAGE) and batch.y.shape == (24,)
    seen = set()
    for _ in range(20):
        seen.update(draw(generator).y.tolist())
    assert seen == set(range(classes))  # every train class, and labels only in range

    loss, metrics = algo.meta_train_step(batch)
    assert set(metrics) == {"loss", "accuracy"} and 0 <= metrics["accuracy"] <= 1
    assert metrics["loss"] == pytest.approx(loss.item())
    loss.backward()
    assert all(p.grad is not None for p in algo.parameters())
    assert algo.classifier.weight.grad.abs().sum() > 0  # the classifier is being trained


def test_pretraining_learns_the_training_batch(fake_omniglot):
    torch.manual_seed(0)
    algo = Baseline(Conv4(IMAGE, 5, channels=8), "classification", batch_size=32)
    draw = algo.training_batches(fake_omniglot, 5, 1, 1, 1)
    batch = draw(torch.Generator().manual_seed(1))
    optimizer = torch.optim.Adam(algo.parameters(), lr=1e-2)
    first, _ = algo.meta_train_step(batch)
    for _ in range(30):
        loss, metrics = algo.meta_train_step(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert metrics["loss"] < 0.5 * first.item()


# ----------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize("classifier", ["linear", "cosine"])
def test_evaluation_leaves_the_body_unchanged_and_no_gradient(classifier):
    algo = conv_baseline(classifier)
    batch = image_tasks(4, seed=5)
    before = {name: p.detach().clone() for name, p in algo.named_parameters()}
    algo.eval()
    scores = algo.evaluate(batch)
    assert set(scores) == {"loss", "accuracy"}
    assert all(v.shape == (4,) and not v.requires_grad for v in scores.values())
    assert all(p.grad is None for p in algo.parameters())
    for name, p in algo.named_parameters():
        assert torch.equal(p, before[name]), name
    with torch.no_grad():  # as a caller may evaluate: the heads are still fitted
        torch.testing.assert_close(algo.evaluate(batch)["loss"], scores["loss"])
    with torch.inference_mode():
        torch.testing.assert_close(algo.evaluate(batch)["loss"], scores["loss"])
    unfitted = conv_baseline(classifier, finetune_steps=1)  # the same body, barely fitted heads
    assert not torch.allclose(unfitted.evaluate(batch)["loss"], scores["loss"])


def test_evaluation_between_backward_and_step_changes_no_gradient(fake_omniglot):
    torch.manual_seed(0)
    algo = Baseline(Conv4(IMAGE, 5, channels=4), "classification", batch_size=8)
    draw = algo.training_batches(fake_omniglot, 5, 1, 1, 1)
    algo.meta_train_step(draw(torch.Generator().manual_seed(0)))[0].backward()
    before = [(p.detach().clone(), p.grad.clone()) for p in algo.parameters()]
    algo.evaluate(fake_omniglot.sampler("test", 3, 1, 2).sample(2, torch.Generator()))
    for (value, gradient), p in zip(before, algo.parameters(), strict=True):
        assert torch.equal(p, value) and torch.equal(p.grad, gradient)


@pytest.mark.parametrize("test_embedding", ["separate", "joint"])
@pytest.mark.parametrize("classifier", ["linear", "cosine"])
def test_batch_norm_statistics_do_not_mix_tasks(classifier, test_embedding):
    algo = conv_baseline(classifier, test_embedding=test_embedding)
    algo.eval()
    batch = image_tasks(4, seed=6)
    together = algo.evaluate(batch)
    for task in range(4):
        alone = algo.evaluate(batch.task(task))
        for name in together:
            torch.testing.assert_close(alone[name], together[name][task : task + 1],
                                       rtol=0, atol=1e-10)
    # Other tasks with wildly different statistics change nothing for task 0.
    others = image_tasks(4, seed=7)
    mixed = TaskBatch(
        torch.cat([batch.support_x[:1], others.support_x[1:] * 10 + 5]),
        batch.support_y,
        torch.cat([batch.query_x[:1], others.query_x[1:] * 10 + 5]),
        batch.query_y,
    )
    mixed_scores = algo.evaluate(mixed)
    for name in together:
        torch.testing.assert_close(mixed_scores[name][0], together[name][0], rtol=0, atol=1e-10)
    assert not torch.allclose(mixed_scores["loss"][1:], together["loss"][1:])


def test_joint_embedding_shares_statistics_between_support_and_query():
    separate, joint = conv_baseline(), conv_baseline(test_embedding="joint")
    batch = image_tasks(2, seed=8)
    support_s, query_s = separate.embed(batch)
    support_j, query_j = joint.embed(batch)
    torch.testing.assert_close(support_s[0], separate.body(batch.support_x[0]))
    torch.testing.assert_close(
        torch.cat([support_j[1], query_j[1]]),
        joint.body(torch.cat([batch.support_x[1], batch.query_x[1]])),
    )
    assert not torch.allclose(support_s, support_j)


# ----------------------------------------------------------------------------- refusals


def test_regression_dataset_is_refused():
    with pytest.raises(ConfigError, match="algo=baseline .* needs a classification dataset"):
        Baseline(MLP((1,), 1), "regression")
    with pytest.raises(ConfigError, match="algo=baselinepp .* use a classification dataset"):
        Baseline(MLP((1,), 1), "regression", classifier="cosine")
    with pytest.raises(ConfigError, match="dataset=sinusoid is regression and has no classes"):
        Sinusoid().batch_sampler("train", 8)


def test_regression_dataset_is_refused_by_the_cli_before_training(tmp_path):
    proc = run_metarun("algo=baseline", "trainer.progress=false", cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "needs a classification dataset" in proc.stderr and "dataset=omniglot" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not list(tmp_path.glob("outputs/*/*"))  # refused before any run folder is kept


class NoFeatures(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(3, 2)


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"classifier": "arcface"}, "algo.classifier"),
        ({"scale": 0}, "algo.scale"),
        ({"batch_size": 0}, "algo.batch_size"),
        ({"finetune_steps": 0}, "algo.finetune_steps"),
        ({"finetune_lr": -1.0}, "algo.finetune_lr"),
        ({"finetune_momentum": 1.0}, "algo.finetune_momentum"),
        ({"finetune_weight_decay": -0.1}, "algo.finetune_weight_decay"),
        ({"test_embedding": "both"}, "algo.test_embedding"),
    ],
)
def test_bad_hyperparameters_name_their_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        Baseline(MLP((2,), 2), "classification", **overrides)


def test_backbone_without_features_is_refused():
    with pytest.raises(ConfigError, match=r"needs a backbone with a feature extractor.*NoFeatures"):
        Baseline(NoFeatures(), "classification")


# ----------------------------------------------------------------------------- the sampler

SOURCES, DRAWINGS, PIXELS = 3, 6, 5
CLASS_SOURCE = torch.tensor([0, 1, 2, 0, 1, 2])
CLASS_ROTATION = torch.tensor([0, 0, 0, 1, 2, 3])


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randint(0, 256, (SOURCES, DRAWINGS, PIXELS, PIXELS),
                         generator=torch.Generator().manual_seed(1), dtype=torch.uint8)


def test_labeled_batches_have_shapes_labels_in_range_and_true_rotations(images):
    before = images.clone()
    sampler = ClassImageBatchSampler(images, CLASS_SOURCE, CLASS_ROTATION, batch_size=200)
    batch = sampler.sample(torch.Generator().manual_seed(0))
    assert batch.x.shape == (200, 1, PIXELS, PIXELS) and batch.x.dtype == torch.float32
    assert batch.y.shape == (200,) and batch.y.dtype == torch.int64
    assert set(batch.y.tolist()) == set(range(6))  # all six classes, nothing else
    drawings_seen = set()
    for image, label in zip(batch.x, batch.y.tolist(), strict=True):
        pixels = (image[0] * 255).round().to(torch.uint8)
        source, turns = CLASS_SOURCE[label].item(), CLASS_ROTATION[label].item()
        matches = [d for d in range(DRAWINGS)
                   if torch.equal(pixels, torch.rot90(images[source, d], turns, dims=(0, 1)))]
        assert len(matches) == 1, label
        drawings_seen.add(matches[0])
    assert drawings_seen == set(range(DRAWINGS))
    assert torch.equal(images, before)  # rotating the batch never touches the base images
    moved = batch.to("cpu", dtype=torch.float64)
    assert moved.x.dtype == torch.float64 and moved.y.dtype == torch.int64 and len(moved) == 200


def test_labeled_batches_are_fixed_by_the_seed(images):
    sampler = ClassImageBatchSampler(images, CLASS_SOURCE, CLASS_ROTATION, batch_size=16)
    first = sampler.sample(torch.Generator().manual_seed(4))
    again = sampler.sample(torch.Generator().manual_seed(4))
    other = sampler.sample(torch.Generator().manual_seed(5))
    assert torch.equal(first.x, again.x) and torch.equal(first.y, again.y)
    assert not torch.equal(first.x, other.x)


def test_omniglot_batch_sampler_uses_the_split_classes(fake_omniglot):
    sampler = fake_omniglot.batch_sampler("val", 50)
    assert sampler.num_classes == fake_omniglot.num_classes("val") == 8
    labels = sampler.sample(torch.Generator().manual_seed(0)).y
    assert int(labels.max()) < 8
    with pytest.raises(ConfigError, match="batch size 0"):
        fake_omniglot.batch_sampler("train", 0)
