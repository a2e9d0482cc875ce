"""What an archive holds, remembered beside the cache, so a warm start does not read the archive.

A dataset's ``plan()`` must name its classes and their image counts before the cache can be
checked, and for a ``.tar.gz`` that means decompressing the whole archive (CUB: about 1.1 GB;
CIFAR-100: the pickles). The answer is a small JSON object, stored in the cache folder under the
fingerprint of the sources it was read from; a changed, torn or foreign index is read again from
the sources, and an index that cannot be written only costs that read on the next run.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def remembered(path: Path, key: str, compute: Callable[[], dict]) -> dict:
    """``compute()``, or what it returned for the same ``key`` last time (stored at ``path``)."""
    try:
        stored = json.loads(path.read_text(encoding="utf-8"))
        if isinstance(stored, dict) and stored.get("key") == key and isinstance(
                stored.get("value"), dict):
            return stored["value"]
    except (OSError, ValueError):
        pass
    value = compute()
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp.write_text(json.dumps({"key": key, "value": value}), encoding="utf-8")
        os.replace(temp, path)
    except OSError as error:
        temp.unlink(missing_ok=True)
        log.info("could not remember the source listing in %s (%s)", path,
                 error.strerror or error)
    return value
