"""Run under torchrun by tests/test_distributed.py: Meta-LSTM's clipped meta-gradient, sharded.

Each rank takes the trainer's update (``metarun.trainer.meta_update``: backward, the all-reduce,
the algorithm's clip, an SGD step) on its share of a float64 meta-batch of 5 tasks (3 and 2 on two
ranks), with a bound well under the gradient's norm; rank 0 compares the weights with one
process's update on the whole batch. It also reports how far the old rule (each rank clipping its
own share before the sum) lands, so the test knows the two differ here. Writes
clip-rank<N>.json per rank in the working folder.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import nn

from metarun.algorithms.metalstm import MetaLSTM
from metarun.data.episodes import TaskBatch
from metarun.distributed import Parallel, start, stop
from metarun.precision import Precision
from metarun.trainer import meta_update

WAYS, SHOTS, QUERIES, FEATURES, TASKS = 3, 2, 2, 4, 5
MAX_NORM, LR = 1e-3, 1.0

parallel = start("cpu")
torch.manual_seed(0)
algorithm = MetaLSTM(nn.Linear(FEATURES, WAYS), "classification", inner_steps=2,
                     meta_grad_clip=MAX_NORM).double()
whole, per_rank = copy.deepcopy(algorithm), copy.deepcopy(algorithm)
g = torch.Generator().manual_seed(1)
batch = TaskBatch(
    torch.randn(TASKS, WAYS * SHOTS, FEATURES, generator=g, dtype=torch.float64),
    torch.arange(WAYS).repeat_interleave(SHOTS).repeat(TASKS, 1),
    torch.randn(TASKS, WAYS * QUERIES, FEATURES, generator=g, dtype=torch.float64),
    torch.arange(WAYS).repeat_interleave(QUERIES).repeat(TASKS, 1),
)


def sgd(module: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(module.parameters(), lr=LR)


shard, share = parallel.shard(batch)
loss, _ = algorithm.meta_train_step(shard)
_, norm = meta_update(loss, share, algorithm, sgd(algorithm), Precision(), parallel)

whole_loss, _ = whole.meta_train_step(batch)
_, whole_norm = meta_update(whole_loss, 1.0, whole, sgd(whole), Precision(), Parallel())

# The rule before: each rank clips its own share's gradient, then the shares are summed.
old_loss, _ = per_rank.meta_train_step(shard)
old_optimizer = sgd(per_rank)
old_loss.backward()
torch.nn.utils.clip_grad_norm_(list(per_rank.parameters()), MAX_NORM)
parallel.reduce_gradients(per_rank.parameters(), share)
old_optimizer.step()


def farthest(module: nn.Module) -> float:
    pairs = zip(module.parameters(), whole.parameters(), strict=True)
    return max(float((p - q).abs().max()) for p, q in pairs)


report = {"rank": parallel.rank, "tasks": shard.support_x.shape[0], "norm": norm,
          "whole_norm": whole_norm, "max_abs_difference": farthest(algorithm),
          "per_rank_clip_difference": farthest(per_rank)}
Path(f"clip-rank{parallel.rank}.json").write_text(json.dumps(report), encoding="utf-8")
stop(all_finished=True)
