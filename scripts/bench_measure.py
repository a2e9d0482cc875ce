"""How scripts/bench.py measures: interleaved wall-clock timing, peak memory of one call, and the
machine a result came from.

Timing interleaves the libraries (metarun, learn2learn, metarun, ...) so that a load spike on a
shared machine hits both alike, and reports the median. Peak memory on CPU is the peak resident
set size (RSS) over one call, from the kernel's own high-water mark: ``/proc/self/clear_refs``
resets ``VmHWM`` to the current RSS right before the call (after ``malloc_trim`` has handed freed
heap pages back, so memory a previous step freed is not silently reused), and ``VmHWM`` after the
call minus the RSS before it is what the call added at its peak. On CUDA it is the peak of
``torch.cuda.max_memory_allocated`` over the call, above what was allocated before it.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import torch

MIB = 1024 * 1024


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(
    calls: dict[str, Callable[[], object]], warmup: int, repeat: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each of ``calls``, ``repeat`` samples each, taken in turns."""
    for _ in range(warmup):
        for call in calls.values():
            call()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeat):
        for name, call in calls.items():
            synchronize(device)
            started = time.perf_counter()
            call()
            synchronize(device)
            samples[name].append(time.perf_counter() - started)
    return samples


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _trim_heap() -> None:
    # Not glibc: no malloc_trim, and freed pages may stay resident.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated over one step, above the memory allocated before it"
    return ("peak RSS over one step above the RSS before it (Linux VmHWM reset through "
            "/proc/self/clear_refs, after malloc_trim)")


def peak_memory_mib(call: Callable[[], object], device: torch.device) -> float | None:
    """MiB that ``call`` added at its peak; None where this platform cannot tell."""
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / MIB
    _trim_heap()
    if not _reset_rss_peak():
        return None
    before = _status_kib("VmRSS")
    call()
    peak = _status_kib("VmHWM")
    if before is None or peak is None:
        return None
    return (peak - before) / 1024


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_seconds_by_kind() -> dict[str, float] | None:
    """Machine-wide CPU seconds so far by kind (``/proc/stat``): busy, idle and *steal*.

    Steal is time the hypervisor gave this VM's cores to someone else: on a shared cloud VM it
    is what makes wall-clock timings drift from run to run, so the bench reports how much of it
    its run saw.
    """
    try:
        with open("/proc/stat", encoding="ascii") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    ticks = [int(value) for value in fields[1:9]]
    per_second = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (t / per_second for t in ticks)
    return {"busy": user + nice + system + irq + softirq, "idle": idle + iowait, "steal": steal}


def steal_share(before: dict[str, float] | None, after: dict[str, float] | None) -> float | None:
    """The fraction of CPU time between two readings that the hypervisor stole."""
    if before is None or after is None:
        return None
    spent = {kind: after[kind] - before[kind] for kind in before}
    total = sum(spent.values())
    return spent["steal"] / total if total > 0 else None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    """The commit metarun was measured at, with "+changes" when the tree was not clean."""
    repo = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, text=True,
                              capture_output=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=repo, text=True, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+changes" if dirty.strip() else "")


def _fused_kernels() -> str | None:
    """The path of metarun's fused CPU kernels as loaded, or None where PyTorch's run."""
    from metarun.execution import kernels

    library = kernels.library()
    return None if library is None else library._name


def machine_info(device: torch.device) -> dict[str, object]:
    """What a reader needs to judge a number: CPU, cores, load, library versions, threads."""
    info: dict[str, object] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version("torchvision"),
        "learn2learn": _version("learn2learn"),
        "metarun": _version("metarun"),
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "device": str(device),
        "metarun_commit": _git_commit(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "fused_kernels": _fused_kernels(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
