"""SNAIL's blocks against their definitions in float64, its causality, its all-queries-at-once
pass against one sequence per query, and learning Omniglot through the real CLI."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from metarun.algorithms.snail import SNAIL, AttentionBlock, DenseBlock, SNAILModel, TCBlock
from metarun.errors import ConfigError
from metarun.models.conv4 import Conv4
from tests.runs import omniglot_learning_run

CHANNELS, LENGTH = 5, 7


def small_model(seed: int = 0) -> SNAILModel:
    torch.manual_seed(seed)
    return SNAILModel(CHANNELS, 3, LENGTH, key_sizes=[4, 6, 5], value_sizes=[3, 4, 2],
                      tc_filters=3).double()


def sequence(length: int = LENGTH, tasks: int = 2, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tasks, length, CHANNELS, generator=g, dtype=torch.float64)


def alone(model: SNAILModel, x: torch.Tensor) -> torch.Tensor:
    """The model over ``x`` as one causal sequence (no query stream)."""
    return model(x, x[:, :0])[0]


def test_dense_block_is_a_gated_causal_dilated_convolution() -> None:
    torch.manual_seed(0)
    block = DenseBlock(CHANNELS, 4, dilation=2).double()
    x = sequence()
    out = block(x, x[:, :0])[0]
    # The same kernel-2 weights as a Conv1d: tap 0 reads x_{t-d}, tap 1 reads x_t.
    weight = torch.stack(block.conv.weight.split(CHANNELS, dim=1)[::-1], dim=-1)
    padded = F.pad(x.transpose(1, 2), (2, 0))
    conv = F.conv1d(padded, weight, block.conv.bias, dilation=2).transpose(1, 2)
    filtered, gate = conv.chunk(2, dim=-1)
    expected = torch.cat([x, torch.tanh(filtered) * torch.sigmoid(gate)], dim=-1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-13)


def test_attention_block_is_causal_scaled_dot_product_attention() -> None:
    torch.manual_seed(0)
    block = AttentionBlock(CHANNELS, 4, 3).double()
    x = sequence()
    out = block(x, x[:, :0])[0]
    for task in range(x.shape[0]):
        for t in range(LENGTH):
            q = block.queries(x[task, t])
            logits = torch.stack(
                [q @ block.keys(x[task, s]) / math.sqrt(4) for s in range(t + 1)]
            )
            weights = torch.softmax(logits, 0)
            read = sum(w * block.values(x[task, s]) for s, w in enumerate(weights))
            torch.testing.assert_close(out[task, t], torch.cat([x[task, t], read]),
                                       rtol=0, atol=1e-13)


def test_tc_block_dilations_cover_the_sequence() -> None:
    for length, blocks in ((2, 1), (6, 3), (8, 3), (9, 4), (26, 5)):
        tc = TCBlock(CHANNELS, length, 2)
        assert [b.dilation for b in tc.blocks] == [2**i for i in range(blocks)]
        assert 1 + sum(b.dilation for b in tc.blocks) >= length


def test_no_position_sees_a_later_one() -> None:
    model = small_model()
    x = sequence()
    out = alone(model, x)
    for t in range(LENGTH):
        changed = x.clone()
        changed[:, t] += torch.randn(CHANNELS, dtype=torch.float64)
        new = alone(model, changed)
        assert torch.equal(new[:, :t], out[:, :t]), f"a position before {t} saw position {t}"
        assert not torch.allclose(new[:, t], out[:, t])


def test_all_queries_at_once_equal_one_sequence_per_query() -> None:
    model = small_model()
    support, queries = sequence(LENGTH - 1), sequence(4, seed=1)
    support_out, query_out = model(support, queries)
    torch.testing.assert_close(support_out, alone(model, support), rtol=0, atol=1e-13)
    for q in range(queries.shape[1]):
        own = alone(model, torch.cat([support, queries[:, q : q + 1]], dim=1))
        torch.testing.assert_close(query_out[:, q], own[:, -1], rtol=0, atol=1e-12)
    # A support set shorter than the longest dilation: the far taps read zeros, as padding does.
    short_out = model(support[:, :2], queries)[1]
    for q in range(queries.shape[1]):
        own = alone(model, torch.cat([support[:, :2], queries[:, q : q + 1]], dim=1))
        torch.testing.assert_close(short_out[:, q], own[:, -1], rtol=0, atol=1e-12)


def test_paper_architecture_and_bad_sizes() -> None:
    snail = SNAIL(Conv4((1, 28, 28), 5, channels=64), "classification", shots=1)
    blocks = snail.snail.blocks
    assert [type(b).__name__ for b in blocks] == [
        "AttentionBlock", "TCBlock", "AttentionBlock", "TCBlock", "AttentionBlock"
    ]
    assert blocks[0].keys.in_features == 64 + 5  # embedding and one-hot label
    assert len(blocks[1].blocks) == math.ceil(math.log2(5 * 1 + 1))
    assert snail.snail.output.out_features == 5
    with pytest.raises(ConfigError, match="one entry per attention block"):
        SNAIL(Conv4((1, 28, 28), 5), "classification", shots=1, key_sizes=[64, 256],
              value_sizes=[32])
    with pytest.raises(ConfigError, match="classification dataset"):
        SNAIL(Conv4((1, 28, 28), 1), "regression", shots=1)


#: SNAIL learns Omniglot through the real CLI, within a CI budget: 250 updates of a meta-batch of
#: 4 episodes, 5-way 1-shot with 5 queries per class, conv4 at 16 channels and the paper's SNAIL
#: sizes, Adam at 1e-3. Chance is 20%; an untrained SNAIL gets 20% (how it reads labels is
#: learned, unlike ProtoNet's class means). Seen with seeds 0 / 1 / 2: 43.8 / 41.4 / 45.4%.
#: Budget: about 27 CPU-seconds on one thread, start-up included.
THRESHOLD = 0.30
ITERATIONS = 250
TEST_EPISODES = 200


def test_learns_omniglot_5way_1shot(tmp_path, shared_data_root, omniglot_cache_dir) -> None:
    results = omniglot_learning_run(
        tmp_path, shared_data_root, omniglot_cache_dir, ITERATIONS, TEST_EPISODES,
        "algo=snail",
        "task.meta_batch_size=4",
    )
    assert results["algo"] == "snail" and results["iterations"] == ITERATIONS
    test = results["meta_test"]
    assert test["metric"] == "accuracy" and test["episodes"] == TEST_EPISODES
    assert test["mean"] >= THRESHOLD, (
        f"snail: 5-way 1-shot meta-test accuracy {test['mean']:.3f} < {THRESHOLD} "
        f"after {ITERATIONS} iterations"
    )
