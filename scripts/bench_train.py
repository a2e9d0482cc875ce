"""Meta-training iterations with the data included: each library samples its own meta-batch
with its own pipeline, then takes the same kind of meta-step on the same network.

metarun: its preloaded uint8 sampler (`Omniglot.sampler(...).sample`), then `meta_train_step`,
backward, Adam. learn2learn: `meta_batch_size` draws from its Omniglot `TaskDataset` (decode,
resize, remap and rotate every image of every episode), each task split into K support and Q query
drawings per class as its examples do, then its MAML clone/adapt loop, backward, Adam. The two
start from the same weights and are timed in turns; tasks differ (each library's own sampler and
class split), so only time is compared here, not losses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from bench_data import L2lOmniglot
from bench_measure import median, time_interleaved
from bench_steps import StepCase, TimedStep, make_model

from metarun.data.episodes import TaskBatch
from metarun.data.omniglot import Omniglot


@dataclass(frozen=True)
class TrainCase:
    step: StepCase

    @property
    def name(self) -> str:
        return f"train-{self.step.name}"


def l2l_task_batch(tasks: object, case: StepCase) -> TaskBatch:
    """``meta_batch_size`` learn2learn episodes as a TaskBatch: per class, the first K drawings
    support, the other Q query (its labels are consecutive per class)."""
    support_x, support_y, query_x, query_y = [], [], [], []
    for _ in range(case.meta_batch_size):
        data, labels = tasks.sample()
        order = torch.argsort(labels, stable=True)
        data, labels = data[order], labels[order]
        per_class = case.shots + case.queries
        is_support = (torch.arange(labels.shape[0]) % per_class) < case.shots
        support_x.append(data[is_support])
        support_y.append(labels[is_support])
        query_x.append(data[~is_support])
        query_y.append(labels[~is_support])
    return TaskBatch(
        torch.stack(support_x), torch.stack(support_y), torch.stack(query_x), torch.stack(query_y)
    )


class TrainingIteration(TimedStep):
    """A TimedStep whose meta-batch is sampled anew, by the library's own pipeline, each call
    (MAML only: ProtoNet's learn2learn episodes would still be the first batch's)."""

    def __init__(self, library: str, base: torch.nn.Module, case: StepCase, sample) -> None:
        super().__init__(library, base, case, sample())
        self.sample = sample

    def __call__(self) -> float:
        self.batch = self.sample()
        return super().__call__()


def time_training(case: TrainCase, dataset: Omniglot, l2l_data: L2lOmniglot, seed: int,
                  warmup: int, repeat: int, device: torch.device) -> dict[str, object]:
    step = case.step
    sampler = dataset.sampler("train", step.ways, step.shots, step.queries)
    generator = torch.Generator().manual_seed(seed)
    l2l_tasks = l2l_data.tasksets(step.ways, step.shots + step.queries, seed).train
    check = l2l_task_batch(l2l_tasks, StepCase(**{**step.__dict__, "meta_batch_size": 1}))
    if check.query_x.shape[1] != step.ways * step.queries:
        raise AssertionError(f"learn2learn episode split gave {tuple(check.query_x.shape)}")
    base = make_model(step, seed).to(device)
    iterations = {
        "metarun": TrainingIteration(
            "metarun", base, step,
            lambda: sampler.sample(step.meta_batch_size, generator).to(device)),
        "learn2learn": TrainingIteration(
            "learn2learn", base, step, lambda: l2l_task_batch(l2l_tasks, step).to(device)),
    }
    samples = time_interleaved(iterations, warmup, repeat, device)
    metarun_s, l2l_s = median(samples["metarun"]), median(samples["learn2learn"])
    return {
        "case": case.name, "ways": step.ways, "shots": step.shots, "queries": step.queries,
        "meta_batch_size": step.meta_batch_size, "inner_steps": step.inner_steps,
        "first_order": step.first_order,
        "metarun_s_per_it": metarun_s, "learn2learn_s_per_it": l2l_s, "speedup": l2l_s / metarun_s,
        "metarun_samples_s": samples["metarun"], "learn2learn_samples_s": samples["learn2learn"],
    }
