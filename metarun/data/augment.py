"""Training augmentation on whole batches: random resized crop, horizontal flip, colour jitter.

The usual few-shot recipe (e.g. Chen et al. 2019: RandomResizedCrop, ImageJitter 0.4, flip) done
as a handful of tensor ops over a batch instead of PIL calls per image: the crop and the flip are
one affine resampling (``affine_grid`` + ``grid_sample``), the jitter three per-image factors.
Every draw comes from the sampler's generator, so a seed fixes the augmented episodes too.
Off by default (``dataset.augment.enabled``); meta-validation and meta-test never augment.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from metarun.errors import ConfigError

#: ITU-R 601 luma weights, as torchvision's grayscale.
_LUMA = (0.299, 0.587, 0.114)


class Augmentation:
    """``images`` float ``[n, C, H, W]`` in [0, 1] -> augmented, same shape, same range."""

    def __init__(self, crop_scale: Sequence[float] = (0.08, 1.0),
                 crop_ratio: Sequence[float] = (3 / 4, 4 / 3), flip: bool = True,
                 jitter: float = 0.4) -> None:
        self.crop_scale = _interval(crop_scale, "dataset.augment.crop_scale", 0.0, 1.0)
        self.crop_ratio = _interval(crop_ratio, "dataset.augment.crop_ratio", 0.0, math.inf)
        if not isinstance(flip, bool):
            raise ConfigError(f"dataset.augment.flip must be true or false, got {flip!r}")
        if isinstance(jitter, bool) or not isinstance(jitter, int | float) or not 0 <= jitter < 1:
            raise ConfigError(f"dataset.augment.jitter={jitter!r} must be a number in [0, 1), "
                              f"e.g. 0.4")
        self.flip = flip
        self.jitter = float(jitter)

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        images = self.crop_and_flip(images, generator)
        if self.jitter > 0:
            images = self.colour_jitter(images, generator)
        return images

    def crop_and_flip(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """A random crop of area ``crop_scale`` and aspect ``crop_ratio`` of each image, resized
        back to the full size (bilinear), mirrored left-right with probability 1/2."""
        count = images.shape[0]
        low, high = self.crop_scale
        area = low + (high - low) * torch.rand(count, generator=generator)
        log_low, log_high = math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1])
        ratio = torch.exp(log_low + (log_high - log_low) * torch.rand(count, generator=generator))
        width = torch.sqrt(area * ratio).clamp(max=1.0)  # fractions of the image's side
        height = torch.sqrt(area / ratio).clamp(max=1.0)
        # Centre in [-1, 1] coordinates such that the crop stays inside the image.
        centre_x = (1 - width) * (2 * torch.rand(count, generator=generator) - 1)
        centre_y = (1 - height) * (2 * torch.rand(count, generator=generator) - 1)
        mirror = torch.ones(count)
        if self.flip:
            mirror = torch.where(torch.rand(count, generator=generator) < 0.5, -1.0, 1.0)
        theta = torch.zeros(count, 2, 3, dtype=images.dtype)
        theta[:, 0, 0] = width * mirror
        theta[:, 0, 2] = centre_x
        theta[:, 1, 1] = height
        theta[:, 1, 2] = centre_y
        # Drawn on the CPU (the sampler's generator), applied where the images are.
        grid = F.affine_grid(theta.to(images.device), list(images.shape), align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                             align_corners=False)

    def colour_jitter(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """Brightness, contrast and (for RGB) saturation, each scaled by a factor drawn from
        ``[1 - jitter, 1 + jitter]`` per image, then clipped to [0, 1]."""
        count, channels = images.shape[:2]

        def factors() -> Tensor:
            drawn = 1 + self.jitter * (2 * torch.rand(count, generator=generator) - 1)
            return drawn.to(images.device, images.dtype).view(count, 1, 1, 1)

        images = images * factors()
        gray = _grayscale(images)
        mean = gray.mean(dim=(1, 2, 3), keepdim=True)
        images = (images - mean) * factors() + mean
        if channels == 3:
            gray = _grayscale(images)
            images = (images - gray) * factors() + gray
        return images.clamp_(0.0, 1.0)


def _grayscale(images: Tensor) -> Tensor:
    if images.shape[1] != 3:
        return images.mean(dim=1, keepdim=True)
    weights = torch.tensor(_LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def _interval(value: Sequence[float], key: str, low: float, high: float) -> tuple[float, float]:
    try:
        first, second = (float(item) for item in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} must be two numbers [low, high]") from None
    if not low < first <= second <= high:
        raise ConfigError(f"{key}={[first, second]} must satisfy {low} < low <= high <= {high}")
    return first, second


def build_augmentation(settings: object) -> Augmentation | None:
    """``dataset.augment`` (a mapping with ``enabled`` and the options above) -> Augmentation,
    or None when it is off."""
    if settings is None or settings is False:
        return None
    if settings is True:
        return Augmentation()
    try:
        options = dict(settings)  # a DictConfig or a dict
    except (TypeError, ValueError):
        raise ConfigError(f"dataset.augment={settings!r} must be a mapping with enabled: "
                          f"true|false") from None
    enabled = options.pop("enabled", False)
    if not isinstance(enabled, bool):
        raise ConfigError(f"dataset.augment.enabled must be true or false, got {enabled!r}")
    if not enabled:
        return None
    try:
        return Augmentation(**options)
    except TypeError:
        known = "crop_scale, crop_ratio, flip, jitter"
        unknown = ", ".join(sorted(set(options) - set(known.split(", "))))
        raise ConfigError(f"dataset.augment has unknown option(s) {unknown}; "
                          f"known: enabled, {known}") from None
