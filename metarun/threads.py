"""How many intra-op threads a job's torch uses: the `threads` key, and a rule for sweeps.

torch gives one process every usable core. That suits a single run, but jobs that a launcher
runs side by side would each take every core too: with 8 jobs on 8 cores, 64 threads fight over
8 cores and the sweep runs slower than one job at a time. So a job started by a parallel launcher
takes its share of the cores, unless ``threads=N`` says otherwise.

The rule reads the launcher's own settings from Hydra's config of the job, so it needs no
plugin imported and works the same in the launching process and in a worker.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from metarun.checks import optional_positive_int

log = logging.getLogger("metarun")


@dataclass(frozen=True)
class ThreadChoice:
    #: Intra-op threads to set, or None to leave torch's default (every usable core).
    threads: int | None
    #: Why, for the log line: a user who sees a slow sweep can tell which rule applied.
    reason: str


def usable_cores() -> int:
    """Cores this process may run on: its CPU affinity (taskset, SLURM, containers' cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def joblib_parallel_jobs(n_jobs: Any, cores: int) -> int:
    """How many jobs joblib runs at once for ``n_jobs``, with joblib's own meaning of it.

    -1 is every core, -2 all but one, and so on; None is one job at a time.
    """
    if n_jobs is None:
        return 1
    n_jobs = int(n_jobs)
    if n_jobs < 0:
        return max(1, cores + 1 + n_jobs)
    return max(1, n_jobs)


def choose_threads(
    requested: int | None, launcher: Mapping[str, Any] | None, multirun: bool, cores: int
) -> ThreadChoice:
    """The threads for one job: ``threads=N`` if set, else what its launcher leaves it.

    ``launcher`` is the job's resolved ``hydra.launcher`` node. Only a multirun uses it: a single
    run ignores ``hydra/launcher`` and runs in this process.
    """
    requested = optional_positive_int(requested, "threads")
    if requested is not None:
        return ThreadChoice(requested, "set by threads=")
    target = str((launcher or {}).get("_target_", "")) if multirun else ""
    if target.endswith("JoblibLauncher"):
        assert launcher is not None
        jobs = joblib_parallel_jobs(launcher.get("n_jobs"), cores)
        return ThreadChoice(
            max(1, cores // jobs), f"joblib: {jobs} jobs at once on {cores} usable cores"
        )
    if "hydra_submitit_launcher" in target:
        # SLURM binds a job to its allocation, where torch's default is right; submitit_local
        # starts every job at once on this machine, where only cpus_per_task can say the share.
        assert launcher is not None
        cpus = launcher.get("cpus_per_task")
        if cpus:
            return ThreadChoice(int(cpus), f"submitit: cpus_per_task={cpus}")
        return ThreadChoice(None, "submitit without cpus_per_task: torch's default")
    if "hydra_ray_launcher" in target:
        assert launcher is not None
        cpus = (launcher.get("ray") or {}).get("remote", {}).get("num_cpus")
        if cpus:
            return ThreadChoice(int(cpus), f"ray: num_cpus={cpus}")
        # Ray gives a task without num_cpus one CPU, and OMP_NUM_THREADS=1, which torch follows.
        return ThreadChoice(None, "ray without ray.remote.num_cpus: torch's default")
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    if processes > 1:
        # torchrun starts this many processes of one run on this machine: each takes its share.
        return ThreadChoice(max(1, cores // processes),
                            f"torchrun: {processes} processes on {cores} usable cores")
    return ThreadChoice(None, "one job at a time: torch's default")


def apply_threads(requested: int | None, launcher: Mapping[str, Any] | None, multirun: bool) -> int:
    """Set torch's intra-op threads for this job by `choose_threads`, log it once; the count."""
    import torch

    cores = usable_cores()
    choice = choose_threads(requested, launcher, multirun, cores)
    if choice.threads is not None:
        torch.set_num_threads(choice.threads)
    threads = torch.get_num_threads()
    log.info("threads: %d (%s)", threads, choice.reason)
    return threads


def sweep_device(device: str, launcher: Mapping[str, Any] | None, multirun: bool,
                 job_number: int, gpus: int, cores: int) -> tuple[str, str] | None:
    """The GPU of one job of a parallel sweep on a machine with several: ``(device, reason)``,
    or None to leave ``trainer.device`` as it is.

    With the joblib launcher, job N takes GPU N mod (the jobs joblib runs at once): jobs running
    together never share a GPU. More jobs at once than GPUs is refused unless the device is
    named (``trainer.device=cuda:K`` asks for sharing). submitit's and Ray's workers get their
    GPUs from SLURM or Ray (CUDA_VISIBLE_DEVICES), so they are left alone.
    """
    if not multirun or gpus < 2 or device not in ("auto", "cuda"):
        return None
    target = str((launcher or {}).get("_target_", ""))
    if not target.endswith("JoblibLauncher"):
        return None
    assert launcher is not None
    at_once = joblib_parallel_jobs(launcher.get("n_jobs"), cores)
    if at_once > gpus:
        from metarun.errors import ConfigError

        raise ConfigError(
            f"hydra.launcher.n_jobs runs {at_once} jobs at once on {gpus} GPUs, so two would "
            f"share one; set hydra.launcher.n_jobs={gpus}, or trainer.device=cuda:0 to share "
            f"on purpose"
        )
    slot = job_number % at_once
    return f"cuda:{slot}", f"joblib job {job_number}: GPU {slot} of {gpus}"
