"""Run under torchrun by tests/test_precision_runs.py: fp16 loss scaling on two processes.

Both ranks take a loss-scaled backward on their share; on the first step rank 1's gradient alone
overflows (an inf, as a float16 backward that overflowed leaves). The scaled gradients are
all-reduced before the scaler looks at them, as the trainer does, so both ranks must skip that
step and halve the scale together; the next step, finite everywhere, both take, to the same
weights. Each rank writes its steps to rank<N>.json in the working folder (two processes printing
to one pipe can interleave their lines).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from metarun.distributed import start, stop
from metarun.precision import Precision

parallel = start("cpu")
torch.manual_seed(0)
model = nn.Linear(3, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
precision = Precision("fp16", torch.device("cpu"))
inputs = torch.randn(4, 3, generator=torch.Generator().manual_seed(1 + parallel.rank))

lines = []
for step in range(2):
    before = [p.detach().clone() for p in model.parameters()]
    with precision.forward():
        loss = model(inputs).float().pow(2).mean()
    optimizer.zero_grad(set_to_none=True)
    precision.backward(loss)
    if step == 0 and parallel.rank == 1:
        model.weight.grad[0, 0] = float("inf")
    parallel.reduce_gradients(model.parameters(), 0.5)
    stepped = precision.step(optimizer)
    changed = any(not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True))
    lines.append({
        "rank": parallel.rank, "step": step, "stepped": stepped, "changed": changed,
        "scale": precision.scaler.get_scale(), "skipped": precision.skipped_steps,
        "weights": [v for p in model.parameters() for v in p.detach().reshape(-1).tolist()],
    })
Path(f"rank{parallel.rank}.json").write_text(json.dumps(lines))
stop(all_finished=True)
