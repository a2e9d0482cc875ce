"""metarun's fused CPU kernels (``cpu_kernels.c``): built with the machine's C compiler on first
use, cached, and called through ``ctypes``.

The C files include no torch headers, so they compile quickly (docs/PERFORMANCE.md, item 4 of
"Speed and memory, both cores"); the shared library is cached under ``$METARUN_CACHE`` (default
``~/.cache/metarun``) in a file named by a hash of the source, the compiler flags and the CPU
capability torch reports, so a machine with another instruction set or a changed source builds
its own. ``ctypes`` releases the GIL during a call, so the task-parallel threads
(``metarun.execution.drivers``) run the kernels at once.

Without a compiler, or with ``METARUN_KERNELS=0``, ``library()`` is None and callers use
PyTorch's own kernels: the same numbers up to float rounding, only slower.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_kernels.c")
SOURCES = (SOURCE, SOURCE.with_name("cpu_kernels_body.h"))  # what the build reads
VERSION = 4  # metarun_kernels_version() in the C file

# Instruction sets by the capability torch reports (torch.backends.cpu.get_cpu_capability()):
# the library never uses more than torch itself does on this machine.
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512bw", "-mavx512vl", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
# -fopenmp-simd: the `omp simd` loops vectorise their sums (no OpenMP threads, no runtime).
_BASE_FLAGS = ["-O3", "-fopenmp-simd", "-fPIC", "-shared", "-fno-math-errno"]

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False


def enabled() -> bool:
    return os.environ.get("METARUN_KERNELS", "1") not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    root = os.environ.get("METARUN_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "metarun"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _flags() -> list[str]:
    capability = torch.backends.cpu.get_cpu_capability()
    machine_flags = _ISA_FLAGS.get(capability, []) if sys.platform.startswith("linux") else []
    return [*_BASE_FLAGS, *machine_flags]


def library_path(compiler: str) -> Path:
    flags = _flags()
    key = hashlib.sha256()
    for source in SOURCES:
        key.update(source.read_bytes())
    key.update(" ".join([compiler, *flags, torch.backends.cpu.get_cpu_capability()]).encode())
    return cache_dir() / "kernels" / f"cpu_kernels-{key.hexdigest()[:16]}.so"


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent processes never load a half-written file.
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        command = [compiler, *_flags(), "-o", str(built), str(SOURCE), "-lm"]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise OSError(f"{' '.join(command)} failed: {result.stderr.strip()[-2000:]}")
        os.replace(built, target)


def _declare(lib: ctypes.CDLL) -> None:
    pointer, size, real = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    for suffix in ("f32", "f64"):
        getattr(lib, f"bn_forward_{suffix}").argtypes = [pointer] * 6 + [size] * 3 + [real]
        getattr(lib, f"bn_backward_{suffix}").argtypes = [pointer] * 8 + [size] * 3
        getattr(lib, f"bn_double_backward_{suffix}").argtypes = [pointer] * 11 + [size] * 3
        for name in ("max_pool2x2", "unpool2x2", "gather2x2"):
            getattr(lib, f"{name}_{suffix}").argtypes = [pointer] * 3 + [size] * 5
        getattr(lib, f"bn_pool_forward_{suffix}").argtypes = [pointer] * 7 + [size] * 5 + [real]
        getattr(lib, f"bn_pool_backward_{suffix}").argtypes = [pointer] * 9 + [size] * 5
        for name in ("bn_forward", "bn_backward", "bn_double_backward", "max_pool2x2",
                     "unpool2x2", "gather2x2", "bn_pool_forward", "bn_pool_backward"):
            getattr(lib, f"{name}_{suffix}").restype = None
    lib.metarun_kernels_version.restype = ctypes.c_int


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them first if this machine has not yet; None if they are
    switched off or cannot be built (logged once, with the reason)."""
    global _library, _tried
    if not enabled():
        return None
    if _tried:
        return _library
    with _lock:
        if _tried:
            return _library
        try:
            compiler = _compiler()
            if compiler is None:
                raise OSError("no C compiler (cc, gcc or clang) on PATH")
            target = library_path(compiler)
            if not target.exists():
                _build(compiler, target)
            lib = ctypes.CDLL(str(target))
            _declare(lib)
            if lib.metarun_kernels_version() != VERSION:
                raise OSError(f"{target} is not version {VERSION} of the kernels")
            _library = lib
        except OSError as error:
            log.warning(
                "metarun: fused CPU kernels unavailable, using PyTorch's (slower): %s", error
            )
            _library = None
        _tried = True
    return _library


def reset() -> None:
    """Forget the loaded library, so the next ``library()`` looks again (tests)."""
    global _library, _tried
    with _lock:
        _library, _tried = None, False
