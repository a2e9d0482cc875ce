"""Run under torchrun by tests/test_distributed.py: meta-gradients of a sharded meta-batch.

Each rank computes MAML's float64 meta-loss on its share of one meta-batch of 5 tasks (3 and 2
on two ranks: the weights are unequal), the shares' gradients are summed by
``Parallel.reduce_gradients``, and rank 0 compares them with one process's gradients on the
whole batch. Writes grad-rank<N>.json per rank in the working folder.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from metarun.algorithms.maml import MAML
from metarun.data.sinusoid import Sinusoid
from metarun.distributed import start, stop
from metarun.models.mlp import MLP

parallel = start("cpu")
torch.manual_seed(0)
model = MLP(input_shape=(1,), out_features=1, hidden=[16, 16]).double()
algorithm = MAML(model, "regression", inner_lr=0.05, inner_steps=2, task_batching="loop")
whole = copy.deepcopy(algorithm)
batch = Sinusoid().sampler("train", 1, 5, 7).sample(5, torch.Generator().manual_seed(1))
batch = batch.to("cpu", torch.float64)

shard, share = parallel.shard(batch)
loss, _ = algorithm.meta_train_step(shard)
loss.backward()
parallel.reduce_gradients(algorithm.parameters(), share)

whole_loss, _ = whole.meta_train_step(batch)
whole_loss.backward()
difference = max(float((p.grad - q.grad).abs().max())
                 for p, q in zip(algorithm.parameters(), whole.parameters(), strict=True))
scale = max(float(q.grad.abs().max()) for q in whole.parameters())
report = {"rank": parallel.rank, "world": parallel.world_size, "tasks": shard.support_x.shape[0],
          "share": share, "max_abs_difference": difference, "gradient_scale": scale}
# A file per rank: two processes printing at once can interleave their lines.
Path(f"grad-rank{parallel.rank}.json").write_text(json.dumps(report), encoding="utf-8")
stop(all_finished=True)
