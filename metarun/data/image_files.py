"""Reading one image file (any format PIL reads) into the cache's uint8 ``[C, H, W]`` layout."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from metarun.errors import DataError, short_reason

#: What the folder-based loaders pick up (case-insensitive); other files are ignored.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                            ".ppm", ".pgm"})


def decode_image(source: Path | bytes, name: str, size: int, channels: int) -> np.ndarray:
    """``source`` (a path or the encoded bytes) as uint8 ``[channels, size, size]``: converted
    to RGB or grayscale, resized with LANCZOS (as the mini-ImageNet and Omniglot caches of the
    literature). ``name`` is how a bad image is named in the one-line error."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image = image.convert("RGB" if channels == 3 else "L")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.LANCZOS)
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise DataError(f"cannot read image {name} ({short_reason(error)}); replace or remove "
                        f"it") from error
    return array[None] if channels == 1 else array.transpose(2, 0, 1)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")

