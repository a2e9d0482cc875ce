"""The runs `metarun-ensemble` blends: found as `metarun-compare` finds them, checked to share one
task shape and dataset, rebuilt from the config saved in their best checkpoint, and evaluated on
tasks fixed by a seed.

Only finished runs take part: a run whose results.json does not say ``complete`` (still
training, interrupted, failed) or that has no ``checkpoints/best.pt`` is skipped, with the reason
printed and written to ensemble.json; the others are blended (at least two are needed).

The tasks: every run draws them from its own copy of the dataset (the same settings, checked), one
task at a time from ``torch.Generator().manual_seed(seed)``, so they are the same for every run,
for any ``batch_size``, and independent of the runs' own seeds. The seeds are not the trainer's
meta-validation and meta-test seeds: the trainer picked each run's best.pt on its
meta-validation tasks, and fitting the blend on other tasks keeps that choice out of the fit.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from metarun.algorithms.base import CLASSIFICATION, MetaAlgorithm
from metarun.build import build
from metarun.checkpoint import load_checkpoint
from metarun.compare_runs import CompareError, describe, distinguishing_keys, read_runs
from metarun.data.episodes import EpisodeSampler, TaskBatch
from metarun.ensemble_fit import task_log_loss, true_class
from metarun.errors import CheckpointError, MetarunError

#: dataset keys that say where the files are, not which data: they may differ between runs.
LOCATION_KEYS = frozenset({"root", "cache_dir", "download", "in_memory", "on_device"})
TASK_SHAPE = ("ways", "shots", "queries")


class EnsembleError(MetarunError):
    """Runs that cannot be blended, or outputs that cannot be written."""


@dataclass
class Member:
    """A finished run: where it is, how it is named in the tables, and its saved config."""

    path: Path
    label: str
    config: DictConfig

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoints" / "best.pt"


def find_members(paths: list[str]) -> tuple[list[Member], list[dict[str, str]]]:
    """The finished runs under ``paths`` and the skipped ones (``{"run", "reason"}``)."""
    try:
        runs = read_runs(paths)
    except CompareError as err:
        raise EnsembleError(str(err)) from None
    keys = distinguishing_keys(runs)
    members, skipped = [], []
    for run in runs:
        values = tuple(run.overrides.get(key, "") for key in keys)
        label = run.label if not keys else f"{run.label} ({describe(keys, values)})"
        best = run.path / "checkpoints" / "best.pt"
        if run.status != "done":
            skipped.append({"run": label, "reason": f"not finished ({run.status})"})
        elif not best.is_file():
            skipped.append({"run": label, "reason": "no checkpoints/best.pt"})
        else:
            config = OmegaConf.create(load_checkpoint(best)["config"])
            members.append(Member(run.path, label, config))
    if len(members) < 2:
        reasons = "; ".join(f"{item['run']}: {item['reason']}" for item in skipped)
        raise EnsembleError(
            f"an ensemble needs at least two finished runs with checkpoints/best.pt, found "
            f"{len(members)}" + (f" (skipped {reasons})" if reasons else "")
        )
    return members, skipped


def _dataset_identity(config: DictConfig) -> dict[str, Any]:
    dataset = OmegaConf.to_container(config.dataset, resolve=True)
    return {key: value for key, value in dataset.items() if key not in LOCATION_KEYS}


def check_same_tasks(members: list[Member]) -> None:
    """Refuse, in one line naming two runs, runs of different task shapes or datasets."""
    first = members[0]
    for other in members[1:]:
        for key in TASK_SHAPE:
            mine, theirs = first.config.task[key], other.config.task[key]
            if mine != theirs:
                raise EnsembleError(
                    f"runs {first.label} and {other.label} have different task shapes "
                    f"(task.{key}={mine} against {theirs}); blend runs of one task shape"
                )
        mine, theirs = _dataset_identity(first.config), _dataset_identity(other.config)
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key) != theirs.get(key):
                raise EnsembleError(
                    f"runs {first.label} and {other.label} have different datasets "
                    f"(dataset.{key}={mine.get(key)} against {theirs.get(key)}); blend runs of "
                    "one dataset"
                )


def rebuild(member: Member, device: str, data_root: str | None) -> tuple[MetaAlgorithm, dict]:
    """The run's algorithm with its best.pt weights, in eval mode, and its val/test samplers."""
    config = copy.deepcopy(member.config)
    config.trainer.device = device
    if data_root is not None:
        config.dataset.root = data_root
    parts = build(config)
    if parts.algorithm.task_type != CLASSIFICATION:
        raise EnsembleError(
            f"run {member.label} is a {parts.algorithm.task_type} run; an ensemble blends class "
            "probabilities, so only classification runs can take part"
        )
    try:
        parts.algorithm.load_state_dict(load_checkpoint(member.checkpoint)["algorithm"])
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(
            f"{member.checkpoint} does not match the model its own config builds "
            f"({type(err).__name__}); was the run's code changed since it was trained?"
        ) from err
    return parts.algorithm.eval(), parts.samplers


def fixed_tasks(
    sampler: EpisodeSampler, count: int, seed: int, batch_size: int
) -> Iterator[TaskBatch]:
    """``count`` tasks drawn one at a time from ``seed``, handed out ``batch_size`` at a time."""
    generator = torch.Generator().manual_seed(seed)
    drawn = 0
    while drawn < count:
        size = min(batch_size, count - drawn)
        tasks = [sampler.sample(1, generator) for _ in range(size)]
        drawn += size
        yield TaskBatch(*(torch.cat(parts) for parts in zip(*(
            (t.support_x, t.support_y, t.query_x, t.query_y) for t in tasks), strict=True)))


def leave_one_shot_out(batch: TaskBatch) -> TaskBatch:
    """Each task's K leave-one-shot-out tasks: fold j adapts on the other K-1 shots of every class
    and queries the j-th (``[B*K, N*(K-1), ...]`` support, ``[B*K, N, ...]`` query, task-major).

    One shot of every class at a time, not one example: the adaptations stay N-way, balanced and
    class-major, the shape every algorithm takes.
    """
    tasks, support = batch.support_y.shape
    ways = int(batch.support_y.max()) + 1
    shots = support // ways
    x = batch.support_x.reshape(tasks, ways, shots, *batch.support_x.shape[2:])
    y = batch.support_y.reshape(tasks, ways, shots)
    keep = [[s for s in range(shots) if s != j] for j in range(shots)]
    support_x = torch.stack([x[:, :, k] for k in keep], 1)  # [B, K, N, K-1, ...]
    support_y = torch.stack([y[:, :, k] for k in keep], 1)
    query_x = torch.stack([x[:, :, j] for j in range(shots)], 1)  # [B, K, N, ...]
    query_y = torch.stack([y[:, :, j] for j in range(shots)], 1)
    image = batch.support_x.shape[2:]
    return TaskBatch(
        support_x.reshape(tasks * shots, ways * (shots - 1), *image),
        support_y.reshape(tasks * shots, ways * (shots - 1)),
        query_x.reshape(tasks * shots, ways, *image),
        query_y.reshape(tasks * shots, ways),
    )


@dataclass
class Evaluation:
    """One run on the fixed tasks: probabilities ``[T, M, N]`` and labels ``[T, M]`` per split;
    ``held_out`` the per-task leave-one-shot-out log-loss on the test tasks (``loo`` only)."""

    probabilities: dict[str, np.ndarray]
    labels: dict[str, np.ndarray]
    fingerprint: str
    held_out: np.ndarray | None = None


def evaluate_member(
    algorithm: MetaAlgorithm,
    samplers: dict,
    counts: dict[str, int],
    seeds: dict[str, int],
    batch_size: int,
    device: torch.device,
    leave_out: bool,
    bar: tqdm,
) -> Evaluation:
    """Query probabilities on the fixed val and test tasks (and the held-out support loss)."""
    probabilities, labels, held_out = {}, {}, []
    digest = hashlib.blake2b(digest_size=8)
    for split in ("val", "test"):
        parts, targets = [], []
        for batch in fixed_tasks(samplers[split], counts[split], seeds[split], batch_size):
            if not targets:  # the first tasks of each split: proof the runs saw the same ones
                digest.update(batch.support_x.numpy().tobytes())
            parts.append(algorithm.query_probabilities(batch.to(device)).cpu().numpy())
            targets.append(batch.query_y.numpy())
            if leave_out and split == "test":
                held_out.append(_held_out_loss(algorithm, batch, device))
            bar.update(batch.meta_batch_size)
        probabilities[split] = np.concatenate(parts)
        labels[split] = np.concatenate(targets)
    loo = np.concatenate(held_out) if leave_out else None
    return Evaluation(probabilities, labels, digest.hexdigest(), loo)


def _held_out_loss(algorithm: MetaAlgorithm, batch: TaskBatch, device: torch.device) -> np.ndarray:
    """Per task, the mean log-loss of its leave-one-shot-out predictions (NaN for 1 shot)."""
    tasks, support = batch.support_y.shape
    shots = support // (int(batch.support_y.max()) + 1)
    if shots < 2:
        return np.full(tasks, np.nan)
    folds = leave_one_shot_out(batch)
    probabilities = algorithm.query_probabilities(folds.to(device)).cpu().numpy()
    picked = true_class(probabilities, folds.query_y.numpy())  # [B*K, N]
    return task_log_loss(picked.reshape(tasks, -1))
