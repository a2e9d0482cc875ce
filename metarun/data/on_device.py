"""``dataset.on_device``: a dataset's uint8 images copied once to the training GPU when they fit.

Then an episode is gathered, rotated and normalised where the model runs, and the batch arrives
on the device: nothing crosses the bus per episode but the few index tensors. The draws (which
classes, which images, any augmentation's factors) still come from the sampler's CPU
``torch.Generator``, so a seed gives the same episodes whichever device holds the images.

``auto`` places the images on a CUDA device when their bytes are at most ``FREE_MEMORY_SHARE``
of the device's free memory (``torch.cuda.mem_get_info``), leaving the rest to the run
(activations, second-order graphs, the optimizer); ``true`` places them whenever they fit in the
free memory at all, ``false`` never. On the CPU there is nothing to do: the images are there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from metarun.checks import auto_or_bool
from metarun.errors import ConfigError

log = logging.getLogger(__name__)

#: ``auto`` places a store of at most this share of the device's free memory.
FREE_MEMORY_SHARE = 0.25

FreeMemory = Callable[[torch.device], tuple[int, int]]


def store_device(setting: object, store_bytes: int, device: torch.device,
                 free_memory: FreeMemory | None = None,
                 key: str = "dataset.on_device") -> torch.device | None:
    """Where a store of ``store_bytes`` should live for a run on ``device``: that device, or
    None (stay in host memory). ``free_memory`` is ``torch.cuda.mem_get_info`` unless given."""
    setting = auto_or_bool(setting, key)
    if setting is False or device.type != "cuda":
        return None
    free, _ = (free_memory or torch.cuda.mem_get_info)(device)
    if setting == "auto" and store_bytes > FREE_MEMORY_SHARE * free:
        log.info("images (%s) stay in host memory: more than %d%% of %s's free %s",
                 _size(store_bytes), round(100 * FREE_MEMORY_SHARE), device, _size(free))
        return None
    if store_bytes > free:
        raise ConfigError(
            f"{key}=true but the images ({_size(store_bytes)}) exceed the free memory of "
            f"{device} ({_size(free)}); use {key}=auto or false"
        )
    log.info("images (%s) on %s", _size(store_bytes), device)
    return device


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**30:.2f} GiB" if nbytes >= 2**30 else f"{nbytes / 2**20:.1f} MiB"
