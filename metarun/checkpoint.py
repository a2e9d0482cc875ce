"""Checkpoints that survive crashes and cannot run code.

Saving writes a temporary file in the same folder, fsyncs it and atomically replaces the old file,
so a kill at any instant leaves either the old or the new checkpoint, never a torn one. Loading uses
``torch.load(weights_only=True)``: a checkpoint holds tensors, numbers, strings and containers of
them, and a file that would need arbitrary unpickling (and so could execute code) is refused.
"""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from metarun.errors import CheckpointError

#: Bumped when the layout of the saved state changes incompatibly.
FORMAT_VERSION = 1


def previous_path(path: Path) -> Path:
    """Where `save_checkpoint(..., keep_previous=True)` keeps the checkpoint it replaced."""
    return path.with_name(f"{path.stem}-previous{path.suffix}")


def save_checkpoint(path: Path, state: dict[str, Any], keep_previous: bool = False) -> None:
    """Atomically write ``state`` (plus the format version) to ``path``.

    With ``keep_previous`` the replaced file stays as `previous_path` (hard-linked first, so
    ``path`` exists at every instant): a checkpoint later found corrupt has a fallback.
    A failed write (disk full, no permission) raises `CheckpointError` and leaves the old
    checkpoint untouched.
    """
    path = Path(path)
    tmp_name = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            torch.save({"format_version": FORMAT_VERSION, **state}, handle)
            handle.flush()
            os.fsync(handle.fileno())
        if keep_previous and path.exists():
            link_name = f"{tmp_name}.previous"
            os.link(path, link_name)
            os.replace(link_name, previous_path(path))
        os.replace(tmp_name, path)
    except BaseException as err:
        if tmp_name is not None:
            Path(tmp_name).unlink(missing_ok=True)
        # torch.save reports a failed write (e.g. ENOSPC) as a RuntimeError from its zip writer.
        reason = err if isinstance(err, OSError) else err.__context__
        if isinstance(err, OSError | RuntimeError) and isinstance(reason, OSError):
            raise CheckpointError(
                f"could not write {path} ({reason.strerror or reason}); the previous checkpoint "
                "is intact. Free disk space or fix the folder's permissions, then resume the run"
            ) from err
        raise
    _fsync_directory(path.parent)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by `save_checkpoint`, refusing anything that could run code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):  # torch.save always writes a zip archive
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt (not a torch.save archive); "
            "use another checkpoint or start the run again"
        )
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else "unsafe content"
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain data "
            f"({first_line}); only load checkpoints written by metarun"
        ) from err
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(err).__name__}); "
            "use another checkpoint or start the run again"
        ) from err
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        found = state.get("format_version") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(
            f"checkpoint {path} has format {found!r}, this metarun reads format "
            f"{FORMAT_VERSION}; resume it with the metarun version that wrote it"
        )
    return state


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (a crash right after must not resurrect the old file)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
