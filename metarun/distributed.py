"""Data-parallel meta-batches over torch.distributed: torchrun or SLURM start the processes.

Every rank draws the same full meta-batch from the same generator (drawing is a few indexing
ops), keeps its contiguous share of the tasks, and computes the meta-loss on them; the gradients,
weighted by each rank's share of the tasks, are summed over ranks in one all-reduce, and every
rank takes the same optimizer step. So a run on W processes makes the same updates as one process
with the same meta-batch (float64 equal to rounding), and its checkpoints do not depend on W: a
run resumes at any world size. Meta-validation and meta-test episodes are dealt out batch by
batch and gathered back in order. Rank 0 alone writes checkpoints, TensorBoard and results.json.

A stop signal (SIGINT/SIGTERM) that reaches any rank is agreed on at the next iteration boundary,
so all ranks stop after the same iteration and rank 0 saves the run. A rank that dies makes the
others' next collective fail (or time out after ``METARUN_DIST_TIMEOUT`` seconds, default 1800):
they stop with one line and the last checkpoint stays the one to resume from.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from metarun.errors import ConfigError, MetarunError

log = logging.getLogger("metarun")

#: torchrun's and SLURM's variables, in the order they are read.
_RANK_VARIABLES = ("RANK", "SLURM_PROCID")
_WORLD_VARIABLES = ("WORLD_SIZE", "SLURM_NTASKS")


class DistributedError(MetarunError):
    """Another process of the run failed or stopped answering."""


def launched_world() -> tuple[int, int, int]:
    """(rank, world size, local world size) from torchrun's environment; (0, 1, 1) without it.

    Under SLURM without torchrun (``srun`` with tasks per node), SLURM_PROCID / SLURM_NTASKS are
    used, with MASTER_ADDR / MASTER_PORT set by the job script (see docs/DISTRIBUTED.md).
    """
    rank = _first_int(_RANK_VARIABLES, 0)
    world = _first_int(_WORLD_VARIABLES, 1)
    local_world = _first_int(("LOCAL_WORLD_SIZE", "SLURM_NTASKS_PER_NODE"), world)
    return rank, world, local_world


def _first_int(names: Iterable[str], default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value:
            try:
                return int(value.split("(")[0])
            except ValueError:
                raise ConfigError(f"${name}={value!r} is not an integer") from None
    return default


@dataclass
class Parallel:
    """This process's place in the run; ``Parallel()`` is a run of one process."""

    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    # ----------------------------------------------------------------------- meta-training
    def shard(self, batch: Any) -> tuple[Any, float]:
        """This rank's contiguous share of a batch whose tensors all have the tasks (or
        examples) first, and the share's weight: its size over the whole batch's."""
        if not self.active:
            return batch, 1.0
        fields = dataclasses.fields(batch)
        total = getattr(batch, fields[0].name).shape[0]
        if total < self.world_size:
            raise ConfigError(
                f"a meta-batch of {total} cannot be split over {self.world_size} processes; "
                f"raise task.meta_batch_size (or the algorithm's batch size) to at least "
                f"{self.world_size} or start fewer processes"
            )
        indices = torch.arange(total).tensor_split(self.world_size)[self.rank]
        start, stop = int(indices[0]), int(indices[-1]) + 1
        parts = {field.name: getattr(batch, field.name)[start:stop] for field in fields}
        return type(batch)(**parts), (stop - start) / total

    def agree(self, stop_signal: int | None, non_finite: bool) -> tuple[int | None, bool]:
        """The run's stop signal and whether any rank's loss was non-finite, on every rank."""
        if not self.active:
            return stop_signal, non_finite
        flags = torch.tensor([float(stop_signal or 0), float(non_finite)], dtype=torch.float64)
        self._all_reduce(flags, dist.ReduceOp.MAX)
        signum = int(flags[0])
        return (signum or None), bool(flags[1])

    def reduce_gradients(self, parameters: Iterable[nn.Parameter], weight: float) -> None:
        """``grad = sum over ranks of weight_r * grad_r``, in one all-reduce. A parameter that
        got no gradient on any rank keeps ``grad = None`` (as in one process: Adam skips it)."""
        if not self.active:
            return
        parameters = [p for p in parameters if p.requires_grad]
        if not parameters:
            return
        flat = torch.cat([
            (p.grad.detach() * weight if p.grad is not None else torch.zeros_like(p)).reshape(-1)
            .to(torch.float64) for p in parameters
        ] + [torch.tensor([float(p.grad is not None) for p in parameters], dtype=torch.float64,
                          device=parameters[0].device)])
        self._all_reduce(flat, dist.ReduceOp.SUM)
        offset = 0
        had_grad = flat[-len(parameters):]
        for position, p in enumerate(parameters):
            size = p.numel()
            if had_grad[position] > 0:
                p.grad = flat[offset:offset + size].view_as(p).to(p.dtype).clone()
            offset += size

    def reduce_metrics(self, metrics: dict[str, float], weight: float) -> dict[str, float]:
        """Metrics of the whole meta-batch: each rank's share weighted as its gradients."""
        if not self.active or not metrics:
            return metrics
        names = sorted(metrics)
        values = torch.tensor([metrics[name] * weight for name in names], dtype=torch.float64)
        self._all_reduce(values, dist.ReduceOp.SUM)
        return dict(zip(names, values.tolist(), strict=True))

    # ----------------------------------------------------------------------- evaluation
    def mine(self, index: int) -> bool:
        """Whether evaluation batch ``index`` is this rank's (batches are dealt round-robin)."""
        return index % self.world_size == self.rank

    def gather_scores(self, local: list[tuple[int, dict[str, list[float]]]]
                      ) -> dict[str, list[float]]:
        """Every rank's (batch index, per-episode scores), merged back in batch order."""
        if self.active:
            everyone: list[Any] = [None] * self.world_size
            try:
                dist.all_gather_object(everyone, local)
            except RuntimeError as error:
                raise self._lost(error) from error
            local = [item for part in everyone for item in part]
        scores: dict[str, list[float]] = {}
        for _, batch_scores in sorted(local, key=lambda item: item[0]):
            for name, values in batch_scores.items():
                scores.setdefault(name, []).extend(values)
        return scores

    def broadcast_module(self, module: nn.Module) -> None:
        """Rank 0's weights (e.g. the best checkpoint it loaded) onto every rank."""
        if not self.active:
            return
        try:
            for tensor in [*module.parameters(), *module.buffers()]:
                dist.broadcast(tensor.data, src=0)
        except RuntimeError as error:
            raise self._lost(error) from error

    def _all_reduce(self, tensor: Tensor, op: Any) -> None:
        try:
            dist.all_reduce(tensor, op=op)
        except RuntimeError as error:
            raise self._lost(error) from error

    def _lost(self, error: RuntimeError) -> DistributedError:
        reason = " ".join(str(error).split())[:160]
        return DistributedError(
            f"rank {self.rank}: another process of this run failed or stopped answering "
            f"({reason}); the last checkpoint is the one to resume from"
        )


def start(device_type: str) -> Parallel:
    """Join the process group torchrun (or SLURM) set up; ``Parallel()`` when launched alone."""
    rank, world, _ = launched_world()
    if world <= 1:
        return Parallel()
    if "RANK" not in os.environ or "MASTER_ADDR" not in os.environ:
        _export_slurm_environment()
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run one process")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("METARUN_DIST_TIMEOUT", 1800)))
        backend = "nccl" if device_type == "cuda" else "gloo"
        os.environ.setdefault("RANK", str(rank))
        os.environ.setdefault("WORLD_SIZE", str(world))
        dist.init_process_group(backend=backend, timeout=timeout)
    log.info("rank %d of %d (%s)", rank, world, dist.get_backend())
    return Parallel(rank, world)


def _export_slurm_environment() -> None:
    """SLURM started the tasks (``srun``, or the submitit launcher with ``tasks_per_node``):
    derive torch.distributed's rendezvous (first node, a port from the job id) as submitit
    does, or say what to set."""
    try:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    except Exception as error:  # not a submitit/SLURM job, or a SLURM without its variables
        raise ConfigError(
            f"SLURM_NTASKS={os.environ.get('SLURM_NTASKS')} tasks but no MASTER_ADDR/RANK "
            f"could be derived ({type(error).__name__}); start with torchrun, or install "
            f"metarun[slurm], or export MASTER_ADDR, MASTER_PORT, RANK and WORLD_SIZE"
        ) from error


def stop(all_finished: bool = False) -> None:
    """Leave the process group. After a run that finished on this rank, first wait (a minute at
    most, never a hang) for every rank to get here: gloo ranks that tore down one after the
    other, while the last messages were still in flight, were seen to abort in gloo's teardown
    ("terminate called without an active exception") after all their work was done."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if all_finished and dist.get_backend() == "gloo" and dist.get_world_size() > 1:
        try:
            dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
        except RuntimeError as error:  # a rank that failed: its own error is the one to read
            log.warning("metarun: not every rank finished: %s", str(error).splitlines()[0])
    dist.destroy_process_group()
