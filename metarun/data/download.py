"""Fetch one file from its official source, all or nothing.

A half-written file that looks like data is worse than no file: it fails later, far from the
cause. So a download streams into a hidden temporary file next to the destination, is checked
against its md5, and only then takes the real name with an atomic ``os.replace``. Any failure
removes the temporary file and becomes one ``DataError`` line that says where to put the file by
hand, which is what a user on an offline machine needs to know.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from metarun.errors import DataError

#: Seconds to wait for the connection and for each read; long enough for a slow mirror, short
#: enough that an offline machine fails in seconds instead of hanging.
TIMEOUT_S = 30.0
CHUNK_BYTES = 1 << 20


def md5sum(path: Path, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Hex md5 of a file, read in chunks so large archives never sit in memory."""
    digest = hashlib.md5()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, destination: Path, md5: str, description: str) -> Path:
    """Download ``url`` to ``destination`` if and only if its md5 matches; return the path.

    ``description`` labels the progress bar. Raises ``DataError`` (one line naming the file, the
    URL and where to put the file by hand) on any failure; ``KeyboardInterrupt`` still propagates
    after the temporary file is removed, so Ctrl-C stops the program as the user asked.
    """
    destination = Path(destination)
    name = destination.name
    by_hand = f"put the official file at {destination} or check your network"
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        handle, temp_name = tempfile.mkstemp(
            prefix=f".{name}.", suffix=".part", dir=destination.parent
        )
    except OSError as error:
        raise DataError(
            f"could not download {name} from {url} (cannot write to {destination.parent}: "
            f"{error.strerror or error}); put the official file at {destination}"
        ) from error

    temp_path = Path(temp_name)
    done = False
    try:
        with os.fdopen(handle, "wb") as file:
            actual_md5 = _stream(url, file, description)
            file.flush()
            os.fsync(file.fileno())
        if actual_md5 != md5.lower():
            raise DataError(
                f"downloaded {name} from {url} but its md5 is {actual_md5}, expected {md5} "
                f"(corrupt or changed upstream); {by_hand}"
            )
        os.replace(temp_path, destination)
        _fsync_directory(destination.parent)
        done = True
        return destination
    except DataError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as error:
        reason = _reason(error)
        raise DataError(f"could not download {name} from {url} ({reason}); {by_hand}") from error
    finally:
        if not done:
            with contextlib.suppress(FileNotFoundError):
                temp_path.unlink()


def _stream(url: str, file, description: str) -> str:
    """Copy the response body into ``file``; return its md5. Raises on a short body."""
    digest = hashlib.md5()
    request = urllib.request.Request(url, headers={"User-Agent": "metarun"})
    with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
        length = response.headers.get("Content-Length")
        total = int(length) if length and length.isdigit() else None
        received = 0
        with tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=description,
            disable=None, leave=False,
        ) as progress:
            while chunk := response.read(CHUNK_BYTES):
                file.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                progress.update(len(chunk))
        if total is not None and received != total:
            raise http.client.IncompleteRead(b"", total - received)
    return digest.hexdigest()


def _reason(error: BaseException) -> str:
    """A short, single-line cause: the HTTP status, the socket error, or the exception name."""
    if isinstance(error, urllib.error.HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    if isinstance(error, http.client.IncompleteRead):
        return "connection closed before the download finished"
    if isinstance(error, TimeoutError):
        return f"no answer within {TIMEOUT_S:.0f} s"
    text = str(error) or type(error).__name__
    return " ".join(text.split())


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable; some filesystems do not support it, which is harmless."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
