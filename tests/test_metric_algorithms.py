"""ProtoNet, MatchingNet and RelationNet against their definitions, computed by hand in float64."""

from __future__ import annotations

import math
import types

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_module
from torch import nn
from torch.func import functional_call

from metarun.algorithms.matchingnet import MatchingNet
from metarun.algorithms.protonet import ProtoNet
from metarun.algorithms.relationnet import RelationNet
from metarun.config import register_configs
from metarun.data.episodes import TaskBatch
from metarun.data.omniglot import Omniglot
from metarun.errors import ConfigError
from metarun.models.conv4 import Conv4
from metarun.models.mlp import MLP
from tests.runs import run_metarun

WAYS, SHOTS, QUERIES, TASKS = 3, 2, 2, 3
IMAGE = (1, 16, 16)
ALGORITHMS = {"protonet": ProtoNet, "matchingnet": MatchingNet, "relationnet": RelationNet}


class FlatEmbedding(nn.Module):
    """A backbone whose body is the identity on vectors: embeddings are the inputs themselves."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Flatten()
        self.head = nn.Linear(1, 1)
        self.feature_dim = 4


def make_batch(input_shape: tuple, seed: int, tasks: int = TASKS) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    support_x = torch.randn(tasks, WAYS * SHOTS, *input_shape, generator=g, dtype=torch.float64)
    query_x = torch.randn(tasks, WAYS * QUERIES, *input_shape, generator=g, dtype=torch.float64)
    support_y = torch.arange(WAYS).repeat_interleave(SHOTS).repeat(tasks, 1)
    query_y = torch.arange(WAYS).repeat_interleave(QUERIES).repeat(tasks, 1)
    return TaskBatch(support_x, support_y, query_x, query_y)


def conv_algorithm(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return ALGORITHMS[name](Conv4(IMAGE, WAYS, channels=4), "classification", **kwargs).double()


def test_protonet_logits_are_negative_squared_distances_to_class_means() -> None:
    batch = make_batch((4,), seed=1)
    protonet = ProtoNet(FlatEmbedding(), "classification")
    logits = protonet.query_outputs(batch)
    for t in range(TASKS):
        means = [
            torch.stack([x for x, y in zip(batch.support_x[t], batch.support_y[t], strict=True)
                         if y == c]).mean(0)
            for c in range(WAYS)
        ]
        for q, query in enumerate(batch.query_x[t]):
            for c in range(WAYS):
                expected = -sum((query[d] - means[c][d]) ** 2 for d in range(4))
                torch.testing.assert_close(logits[t, q, c], expected)
    scores = protonet.evaluate(batch)
    log_probs = logits.log_softmax(-1).gather(2, batch.query_y.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(scores["loss"], -log_probs.mean(1))
    expected_accuracy = (logits.argmax(-1) == batch.query_y).double().mean(1)
    torch.testing.assert_close(scores["accuracy"], expected_accuracy.to(scores["accuracy"].dtype))


def test_protonet_prototypes_follow_the_labels_not_their_order() -> None:
    batch = make_batch((4,), seed=2, tasks=1)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    shuffled = TaskBatch(batch.support_x[:, order], batch.support_y[:, order], batch.query_x,
                         batch.query_y)
    protonet = ProtoNet(FlatEmbedding(), "classification")
    torch.testing.assert_close(protonet.query_outputs(shuffled), protonet.query_outputs(batch))


@pytest.mark.parametrize("temperature", [1.0, 0.25])
def test_matchingnet_probabilities_are_cosine_attention_over_support_labels(temperature) -> None:
    batch = make_batch((4,), seed=3)
    matching = MatchingNet(FlatEmbedding(), "classification", temperature=temperature,
                           learn_temperature=False).double()
    probabilities = matching.query_probabilities(batch)
    for t in range(TASKS):
        for q, query in enumerate(batch.query_x[t]):
            cosines = [
                float(query @ x) / math.sqrt(float(query @ query) * float(x @ x))
                for x in batch.support_x[t]
            ]
            weights = [math.exp(c / temperature) for c in cosines]
            for c in range(WAYS):
                votes = sum(w for w, y in zip(weights, batch.support_y[t], strict=True) if y == c)
                assert probabilities[t, q, c].item() == pytest.approx(votes / sum(weights))
    true_class = probabilities.gather(2, batch.query_y.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(matching.evaluate(batch)["loss"], -true_class.log().mean(1))


def test_matchingnet_fce_is_a_residual_on_the_plain_embeddings() -> None:
    """With every LSTM weight zero, g(x_i, S) = g'(x_i) and f(x, S) = f'(x) (the paper's skip
    connections), so full-context embeddings reduce to the plain Matching Network."""
    batch = make_batch((4,), seed=9)
    plain = MatchingNet(FlatEmbedding(), "classification", fce=False).double()
    context = MatchingNet(FlatEmbedding(), "classification", fce=True, fce_steps=3).double()
    expected = plain.query_probabilities(batch)
    assert not torch.allclose(context.query_probabilities(batch), expected)
    with torch.no_grad():
        for param in context.context.parameters():
            param.zero_()
    torch.testing.assert_close(context.query_probabilities(batch), expected)


def test_relationnet_loss_is_mse_of_scores_to_one_hot() -> None:
    relation = conv_algorithm("relationnet")
    batch = make_batch(IMAGE, seed=4)
    scores = relation.relation_scores(batch)
    assert scores.shape == (TASKS, WAYS * QUERIES, WAYS)
    assert bool(((scores > 0) & (scores < 1)).all())
    one_hot = F.one_hot(batch.query_y, WAYS).double()
    result = relation.evaluate(batch)
    torch.testing.assert_close(result["loss"], ((scores - one_hot) ** 2).mean(dim=(1, 2)))
    expected_accuracy = (scores.argmax(-1) == batch.query_y).double().mean(1)
    torch.testing.assert_close(result["accuracy"], expected_accuracy)


def test_relationnet_pairs_class_sum_with_query_maps() -> None:
    """Rebuild every (query, class) pair of one task by hand, in the paper's channel order."""
    relation = conv_algorithm("relationnet")
    batch = make_batch(IMAGE, seed=5, tasks=1)
    maps = relation.embed(torch.cat([batch.support_x[0], batch.query_x[0]]))
    support_maps, query_maps = maps[: WAYS * SHOTS], maps[WAYS * SHOTS :]
    class_maps = [support_maps[batch.support_y[0] == c].sum(0) for c in range(WAYS)]
    pairs = [torch.cat([class_maps[c], query]) for query in query_maps for c in range(WAYS)]
    expected = relation.relation(torch.stack(pairs)).reshape(WAYS * QUERIES, WAYS)
    torch.testing.assert_close(relation.relation_scores(batch)[0], expected)


@pytest.mark.parametrize(("unpooled_blocks", "side"), [(0, 1), (1, 3), (2, 7)])
def test_relationnet_keeps_a_spatial_map_of_omniglot_images(unpooled_blocks, side) -> None:
    relation = RelationNet(Conv4((1, 28, 28), 5, channels=4), "classification",
                           unpooled_blocks=unpooled_blocks)
    assert relation.embed(torch.zeros(3, 1, 28, 28)).shape == (3, 4, side, side)
    # The layers are the backbone's own: nothing is copied or saved twice.
    assert not any(key.startswith("_spatial") for key in relation.state_dict())


@pytest.mark.parametrize("name", [*ALGORITHMS, "matchingnet-fce"])
def test_batch_norm_does_not_leak_between_tasks(name) -> None:
    kwargs = {"fce": True} if name == "matchingnet-fce" else {}
    algorithm = conv_algorithm(name.removesuffix("-fce"), **kwargs)
    batch = make_batch(IMAGE, seed=6)
    together = algorithm.evaluate(batch)
    outputs = algorithm.query_outputs(batch)
    for t in range(TASKS):
        alone = algorithm.evaluate(batch.task(t))
        for metric in ("loss", "accuracy"):
            torch.testing.assert_close(alone[metric][0], together[metric][t])
        torch.testing.assert_close(algorithm.query_outputs(batch.task(t))[0], outputs[t])


@pytest.mark.parametrize("name", [*ALGORITHMS, "matchingnet-fce"])
def test_gradients_reach_the_body_and_evaluation_leaves_none(name) -> None:
    kwargs = {"fce": True} if name == "matchingnet-fce" else {}
    algorithm = conv_algorithm(name.removesuffix("-fce"), **kwargs)
    batch = make_batch(IMAGE, seed=7)
    result = algorithm.evaluate(batch)
    assert all(value.shape == (TASKS,) for value in result.values())
    assert all(p.grad is None for p in algorithm.parameters())
    loss, metrics = algorithm.meta_train_step(batch)
    assert set(metrics) == {"loss", "accuracy"} and 0 <= metrics["accuracy"] <= 1
    loss.backward()
    trained = {n: p for n, p in algorithm.named_parameters() if not n.startswith("model.head")}
    for param_name, param in trained.items():
        assert param.grad is not None and bool(param.grad.abs().sum() > 0), param_name
    assert all(p.grad is None for p in algorithm.model.head.parameters())


def test_protonet_on_mlp_folds_tasks_and_matches_the_per_task_loop() -> None:
    torch.manual_seed(0)
    protonet = ProtoNet(MLP(IMAGE, WAYS, hidden=(8,)), "classification").double()
    assert protonet.fold
    batch = make_batch(IMAGE, seed=8)
    protonet.fold = False
    looped = protonet.query_outputs(batch)
    protonet.fold = True
    torch.testing.assert_close(protonet.query_outputs(batch), looped)


def test_a_body_that_writes_running_statistics_runs_its_tasks_on_one_thread() -> None:
    # metarun's backbones keep no running statistics; one that does writes them in every
    # training forward pass, and two task threads would write the same buffer at once.
    model = FlatEmbedding()
    model.features = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(4))
    protonet = ProtoNet(model, "classification").double()
    batch = make_batch((4,), seed=10)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert protonet.task_workers(batch) == 1
        loss, _ = protonet.meta_train_step(batch)
        loss.backward()
        assert int(model.features[1].num_batches_tracked) == TASKS  # one update per task
        protonet.eval()
        assert protonet.task_workers(batch) == 2  # evaluation only reads them
        assert ProtoNet(Conv4(IMAGE, WAYS, channels=4), "classification").task_workers(batch) == 2
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def fake_omniglot(tmp_path, make_fake_omniglot) -> Omniglot:
    """16 meta-train classes (2 alphabets x 2 characters x 4 rotations), 20 drawings each."""
    make_fake_omniglot(tmp_path)
    return Omniglot(root=str(tmp_path), cache_dir=str(tmp_path / "cache"), download=False)


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_training_batches_use_the_train_shape_and_evaluation_keeps_the_task(name, fake_omniglot):
    algorithm = ALGORITHMS[name](Conv4((1, 28, 28), 5, channels=4), "classification",
                                 train_ways=12, train_shots=2, train_queries=3)
    draw = algorithm.training_batches(fake_omniglot, 5, 1, 15, meta_batch_size=2)
    batch = draw(torch.Generator().manual_seed(0))
    assert batch.support_x.shape == (2, 12 * 2, 1, 28, 28)
    assert batch.query_x.shape == (2, 12 * 3, 1, 28, 28)
    for labels, per_class in ((batch.support_y, 2), (batch.query_y, 3)):
        assert labels.tolist() == [torch.arange(12).repeat_interleave(per_class).tolist()] * 2
    loss, metrics = algorithm.meta_train_step(batch)
    assert loss.isfinite() and 0 <= metrics["accuracy"] <= 1

    same = ALGORITHMS[name](Conv4((1, 28, 28), 5, channels=4), "classification")
    batch = same.training_batches(fake_omniglot, 5, 1, 15, 2)(torch.Generator().manual_seed(0))
    assert batch.support_x.shape[1] == 5 and batch.query_x.shape[1] == 5 * 15


def test_too_wide_training_episodes_name_the_algo_key(fake_omniglot) -> None:
    protonet = ProtoNet(Conv4((1, 28, 28), 5, channels=4), "classification", train_ways=17)
    with pytest.raises(ConfigError, match=r"^algo\.train_ways=17 but .* 16 classes; lower algo"):
        protonet.training_batches(fake_omniglot, 5, 1, 15, 1)
    protonet = ProtoNet(Conv4((1, 28, 28), 5, channels=4), "classification", train_queries=19)
    with pytest.raises(ConfigError, match=r"20 images per class.*algo\.train_queries=19"):
        protonet.training_batches(fake_omniglot, 5, 2, 15, 1)


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_a_regression_dataset_is_refused(name) -> None:
    with pytest.raises(ConfigError, match=f"^algo={name} needs a classification dataset but got "
                                          "a regression dataset; use"):
        ALGORITHMS[name](MLP((1,), 1), "regression")


@pytest.mark.parametrize(
    ("name", "backbone", "message"),
    [
        ("protonet", nn.Linear(4, 3),
         "algo=protonet needs a backbone with a feature body (conv4, mlp) but got Linear; "
         "use backbone=conv4"),
        ("matchingnet", nn.Linear(4, 3),
         "algo=matchingnet needs a backbone with a feature body (conv4, mlp) but got Linear; "
         "use backbone=conv4"),
        ("relationnet", MLP(IMAGE, 3),
         "algo=relationnet needs a convolutional backbone (conv4) but got MLP; "
         "use backbone=conv4"),
    ],
)
def test_an_unsupported_backbone_is_refused(name, backbone, message) -> None:
    with pytest.raises(ConfigError) as caught:
        ALGORITHMS[name](backbone, "classification")
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("name", "kwargs", "key"),
    [
        ("protonet", {"train_ways": 0}, "algo.train_ways"),
        ("protonet", {"train_ways": 1}, "algo.train_ways"),
        ("protonet", {"train_queries": 2.5}, "algo.train_queries"),
        ("matchingnet", {"temperature": 0.0}, "algo.temperature"),
        ("matchingnet", {"learn_temperature": "yes"}, "algo.learn_temperature"),
        ("matchingnet", {"fce_steps": 0}, "algo.fce_steps"),
        ("relationnet", {"unpooled_blocks": 5}, "algo.unpooled_blocks=5"),
        ("relationnet", {"relation_channels": 0}, "algo.relation_channels"),
    ],
)
def test_bad_values_name_their_key(name, kwargs, key) -> None:
    with pytest.raises(ConfigError, match=key):
        ALGORITHMS[name](Conv4(IMAGE, 3, channels=4), "classification", **kwargs)


def test_omniglot_brings_protonets_paper_training_shape() -> None:
    register_configs()
    with initialize_config_module(config_module="metarun.configs", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["algo=protonet", "dataset=omniglot"])
        plain = compose(config_name="config", overrides=["algo=matchingnet", "dataset=omniglot"])
    assert cfg.algo.train_ways == 60 and cfg.algo.train_queries == 5
    assert cfg.algo.train_shots is None and cfg.task.meta_batch_size == 1
    assert plain.algo.train_ways is None and plain.task.meta_batch_size == 32


def test_the_cli_refuses_relationnet_on_an_mlp(tmp_path, make_fake_omniglot) -> None:
    make_fake_omniglot(tmp_path)
    proc = run_metarun(
        "algo=relationnet", "dataset=omniglot", "backbone=mlp", f"dataset.root={tmp_path}",
        "dataset.download=false", "hydra.run.dir=run", cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "metarun: error: algo=relationnet needs a convolutional backbone (conv4) but got MLP; "\
        "use backbone=conv4" in proc.stderr
    assert "Traceback" not in proc.stderr


def run_plainly(learner, key: str, meta: dict, *inputs: torch.Tensor):
    """Module ``key`` of the learner's ``task_modules`` as written (not its executed copy), with
    ``meta``'s parameters."""
    prefix, module = learner.task_modules()[key]
    params = {name: meta[prefix + name] for name, _ in module.named_parameters()}
    return functional_call(module, params, inputs)


def single_graph_meta_gradients(learner, batch: TaskBatch, monkeypatch):
    """The meta-gradient by its definition: every task in the calling thread, the modules as
    written, on the meta-parameters themselves; the mean of the tasks' losses; one backward.
    Zeros where a parameter gets no gradient (the backbone's unused head)."""
    learner.zero_grad(set_to_none=True)
    with monkeypatch.context() as patch:
        patch.setattr(learner, "run_module", types.MethodType(run_plainly, learner))
        outputs = learner.query_outputs(batch)
    loss = learner.scores(outputs, batch.query_y)["loss"].mean()
    loss.backward()
    return loss.item(), gradients(learner)


def gradients(learner) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in learner.parameters()]


@pytest.mark.parametrize("algo", list(ALGORITHMS))
def test_embeddings_run_on_the_executed_copy_with_the_same_gradients(algo, monkeypatch) -> None:
    # The body (and RelationNet's relation module) runs as metarun.execution.executed rewrites
    # it (ReLU after max-pool); the loss and the meta-gradient must be those of the modules as
    # written, ties in the pools included.
    torch.manual_seed(3)
    learner = ALGORITHMS[algo](Conv4(IMAGE, WAYS), "classification").double()
    batch = make_batch(IMAGE, seed=4)
    batch = TaskBatch(*((t > 0.5).double() if t.is_floating_point() else t for t in (
        batch.support_x, batch.support_y, batch.query_x, batch.query_y)))

    learner.zero_grad()
    loss, _ = learner.meta_train_step(batch)
    loss.backward()
    executed_loss, executed_grads = loss.item(), gradients(learner)
    assert learner._executed._copies, "the executed copy was not used"
    plain_loss, plain_grads = single_graph_meta_gradients(learner, batch, monkeypatch)
    assert executed_loss == pytest.approx(plain_loss, rel=1e-12)
    for got, want in zip(executed_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
