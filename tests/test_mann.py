"""MANN's least-recently-used access against its definition (Santoro et al. 2016, sec. 3) in
float64 on hand-made memories, its one-step-late labels, its queries, and learning Omniglot."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from metarun.algorithms.mann import MANN, MemoryState, cosine_read_weights, lrua_write
from metarun.data.episodes import TaskBatch
from metarun.data.sequences import EpisodeSequence
from metarun.errors import ConfigError
from metarun.models.conv4 import Conv4
from tests.runs import omniglot_learning_run

SLOTS, SIZE = 6, 4
DOUBLE = torch.float64


def hand_memory(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, SLOTS, SIZE, generator=torch.Generator().manual_seed(seed), dtype=DOUBLE)


def test_write_goes_to_the_least_used_slot_after_zeroing_it() -> None:
    memory = hand_memory()
    usage = torch.tensor([[0.9, 0.4, 1.3, 0.05, 0.7, 0.2]], dtype=DOUBLE)  # least used: slot 3
    read_before = torch.softmax(torch.randn(1, 1, SLOTS, dtype=DOUBLE), -1)
    content = torch.tensor([[[0.5, -0.25, 1.0, 2.0]]], dtype=DOUBLE)
    gate = torch.sigmoid(torch.tensor([[[-60.0]]], dtype=DOUBLE))  # sigmoid(alpha) -> 0
    new, write_weights = lrua_write(memory, usage, read_before, gate, content)
    # All of the write lands on slot 3, and slot 3 holds the content alone: its old row is gone.
    torch.testing.assert_close(write_weights[0, 0], F.one_hot(torch.tensor(3), SLOTS).double(),
                               rtol=0, atol=1e-20)
    torch.testing.assert_close(new[0, 3], content[0, 0], rtol=0, atol=1e-20)
    others = [0, 1, 2, 4, 5]
    torch.testing.assert_close(new[0, others], memory[0, others], rtol=0, atol=1e-20)


def test_write_mixes_the_last_read_and_the_least_used_slot() -> None:
    memory, gate = hand_memory(1), torch.tensor([[[0.3], [0.8]]], dtype=DOUBLE)
    usage = torch.tensor([[0.5, 0.1, 0.9, 0.3, 0.0, 0.6]], dtype=DOUBLE)  # least: 4, then 1
    read_before = torch.softmax(torch.randn(1, 2, SLOTS, dtype=DOUBLE), -1)
    content = torch.randn(1, 2, SIZE, dtype=DOUBLE)
    new, write_weights = lrua_write(memory, usage, read_before, gate, content)
    expected = memory.clone()
    expected[0, 4] = 0.0  # each head's least-used slot is zeroed before anything is written
    expected[0, 1] = 0.0
    for head, least in ((0, 4), (1, 1)):
        weights = gate[0, head] * read_before[0, head]
        weights[least] += 1 - gate[0, head, 0]
        torch.testing.assert_close(write_weights[0, head], weights, rtol=0, atol=1e-15)
        for slot in range(SLOTS):
            expected[0, slot] += weights[slot] * content[0, head]
    torch.testing.assert_close(new, expected, rtol=0, atol=1e-14)


def test_read_weights_are_a_softmax_of_cosine_similarities() -> None:
    memory, keys = hand_memory(2), torch.randn(1, 3, SIZE, dtype=DOUBLE)
    weights = cosine_read_weights(keys, memory)
    for head in range(3):
        cosines = F.cosine_similarity(keys[0, head].expand(SLOTS, SIZE), memory[0], dim=-1)
        torch.testing.assert_close(weights[0, head], torch.softmax(cosines, 0), rtol=0,
                                   atol=1e-13)


def small_mann(**overrides) -> MANN:
    torch.manual_seed(0)
    settings = dict(controller_size=7, memory_slots=SLOTS, memory_size=SIZE, read_heads=2)
    settings.update(overrides)
    return MANN(Conv4((1, 16, 16), 3, channels=4, batch_norm=False), "classification",
                **settings).double()


def test_one_step_reads_after_writing_and_updates_usage() -> None:
    mann = small_mann(usage_decay=0.9)
    heads, per_head = 2, 2 * SIZE + 1
    # A controller-independent interface: the bias alone sets each head's key, content and gate.
    bias = torch.randn(heads, per_head, dtype=DOUBLE)
    with torch.no_grad():
        mann.interface.weight.zero_()
        mann.interface.bias.copy_(bias.flatten())
    key, content = torch.tanh(bias[:, :SIZE]), torch.tanh(bias[:, SIZE:-1])
    gate = torch.sigmoid(bias[:, -1])
    state = MemoryState(
        hidden=torch.randn(1, 7, dtype=DOUBLE), cell=torch.randn(1, 7, dtype=DOUBLE),
        memory=hand_memory(3), usage=torch.tensor([[0.3, 0.8, 0.1, 0.5, 0.9, 0.2]], dtype=DOUBLE),
        read_weights=torch.softmax(torch.randn(1, heads, SLOTS, dtype=DOUBLE), -1),
        reads=torch.randn(1, heads, SIZE, dtype=DOUBLE),
    )
    _, new = mann.step(torch.randn(1, mann.embedding_dim, dtype=DOUBLE),
                       torch.zeros(1, 3, dtype=DOUBLE), state)
    memory = state.memory[0].clone()
    least = (2, 5)  # the two least-used slots, for heads 0 and 1
    memory[list(least)] = 0.0
    writes = torch.zeros(heads, SLOTS, dtype=DOUBLE)
    for head in range(heads):
        writes[head] = gate[head] * state.read_weights[0, head]
        writes[head, least[head]] += 1 - gate[head]
        memory += writes[head].unsqueeze(1) * content[head]
    torch.testing.assert_close(new.memory[0], memory, rtol=0, atol=1e-14)
    reads = torch.stack([torch.softmax(F.cosine_similarity(key[h].expand(SLOTS, SIZE), memory,
                                                          dim=-1), 0) for h in range(heads)])
    torch.testing.assert_close(new.read_weights[0], reads, rtol=0, atol=1e-13)
    torch.testing.assert_close(new.reads[0], reads @ memory, rtol=0, atol=1e-13)
    usage = 0.9 * state.usage[0] + reads.sum(0) + writes.sum(0)
    torch.testing.assert_close(new.usage[0], usage, rtol=0, atol=1e-13)


def hand_batch(seed: int = 0) -> TaskBatch:
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(torch.rand(1, 6, 1, 16, 16, generator=g, dtype=DOUBLE),
                     torch.tensor([[0, 0, 1, 1, 2, 2]]),
                     torch.rand(1, 4, 1, 16, 16, generator=g, dtype=DOUBLE),
                     torch.tensor([[0, 1, 2, 0]]))


def in_order(batch: TaskBatch, support_y: torch.Tensor) -> EpisodeSequence:
    """The batch as a sequence in its own order, labels shifted by hand."""
    one_hot = F.one_hot(support_y, 3).double()
    previous = torch.cat([torch.zeros_like(one_hot[:, :1]), one_hot[:, :-1]], dim=1)
    blank = torch.zeros(1, batch.query_x.shape[1], 3, dtype=DOUBLE)
    order = torch.arange(support_y.shape[1]).unsqueeze(0)
    return EpisodeSequence(batch.support_x, support_y, previous, batch.query_x, batch.query_y,
                           blank, order)


def test_each_support_step_predicts_its_label_before_seeing_it() -> None:
    mann, batch = small_mann(), hand_batch()
    support = mann.embedding_norm(mann.run_body(batch.support_x[0])).unsqueeze(0)
    query = mann.embedding_norm(mann.run_body(batch.query_x[0])).unsqueeze(0)
    logits = mann.predict(in_order(batch, batch.support_y), support, query)
    for t in range(6):
        relabelled = batch.support_y.clone()
        relabelled[0, t] = (relabelled[0, t] + 1) % 3
        new = mann.predict(in_order(batch, relabelled), support, query)
        assert torch.equal(new[:, : t + 1], logits[:, : t + 1]), f"step {t} saw its own label"
        # The next step reads it (after the last support step: the label step, then queries).
        assert not torch.allclose(new[:, t + 1], logits[:, t + 1])


def test_queries_at_once_equal_each_query_alone() -> None:
    mann = small_mann()
    batch = hand_batch()
    together = mann.evaluation_outputs(batch)
    for q in range(batch.query_x.shape[1]):
        one = TaskBatch(batch.support_x, batch.support_y, batch.query_x[:, q : q + 1],
                        batch.query_y[:, q : q + 1])
        torch.testing.assert_close(mann.evaluation_outputs(one)[:, 0], together[:, q], rtol=0,
                                   atol=1e-12)


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ConfigError, match="at most as many heads as slots"):
        small_mann(read_heads=SLOTS + 1)
    with pytest.raises(ConfigError, match=r"usage_decay must be a number in \[0, 1\]"):
        small_mann(usage_decay=1.5)
    with pytest.raises(ConfigError, match="write_key must be true or false"):
        small_mann(write_key="yes")


#: MANN learns Omniglot through the real CLI, within a CI budget. Chance is 20%; an untrained
#: MANN gets 18-20%. 300 updates of a meta-batch of 6 episodes, trained on 5-way 5-shot
#: sequences (algo.train_shots=5: a class recurs within the support sequence, as in the paper's
#: 10-instance episodes; 1-shot training stayed at chance for 1000 iterations) and meta-tested
#: 5-way 1-shot with 5 queries per class; conv4 at 16 channels, a 16 x 40 memory, one head, a
#: 64-unit controller, Adam at 3e-3. Seen with seeds 0 / 1 / 2: 31.1 / 30.8 / 37.4%. Budget:
#: about 32 CPU-seconds on one thread, start-up included.
THRESHOLD = 0.25
ITERATIONS = 300
TEST_EPISODES = 200


def test_learns_omniglot_5way_1shot(tmp_path, shared_data_root, omniglot_cache_dir) -> None:
    results = omniglot_learning_run(
        tmp_path, shared_data_root, omniglot_cache_dir, ITERATIONS, TEST_EPISODES,
        "algo=mann",
        "algo.train_shots=5",
        "algo.memory_slots=16",
        "algo.controller_size=64",
        "algo.read_heads=1",
        "optimizer.lr=3e-3",
        "task.meta_batch_size=6",
    )
    assert results["algo"] == "mann" and results["iterations"] == ITERATIONS
    test = results["meta_test"]
    assert test["metric"] == "accuracy" and test["episodes"] == TEST_EPISODES
    assert test["mean"] >= THRESHOLD, (
        f"mann: 5-way 1-shot meta-test accuracy {test['mean']:.3f} < {THRESHOLD} "
        f"after {ITERATIONS} iterations"
    )
