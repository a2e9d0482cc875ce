"""Images that come as pickled numpy arrays (mini- and tiered-ImageNet's distributed files).

Two things those loaders share (CIFAR-100's reader unpickles with ``unpickle_arrays`` too).
``load_pickle`` reads a pickle without running it: the files come
from mirrors and drives anyone can upload to, and an ordinary ``pickle.load`` executes whatever
the file names. Only numpy arrays, numpy scalars and Python's containers are rebuilt; a file that
asks for anything else is refused. It decodes Python 2 byte strings as latin1, which is how the
numpy arrays and names in Python 2 pickles (tiered-ImageNet's, the older mini-ImageNet ones)
load under Python 3, and changes nothing in Python 3 pickles. ``image_from_array`` turns one
``[H, W, 3]`` uint8 row into the cache's ``[C, size, size]``, resizing as ``decode_image`` does.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from metarun.errors import DataError, short_reason

#: What a pickle of numpy arrays, lists and dicts refers to (numpy 1 and 2 module names, and
#: Python 2's ``__builtin__`` beside Python 3's ``builtins``).
SAFE_GLOBALS = frozenset({
    *((module, name) for module in ("numpy.core.multiarray", "numpy._core.multiarray")
      for name in ("_reconstruct", "scalar")),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("_codecs", "encode"),  # how protocol 2 stores bytes (a numpy array's data)
    ("collections", "OrderedDict"),
    *((module, name) for module in ("builtins", "__builtin__")
      for name in ("set", "frozenset", "bytearray")),
})


class _ForeignObject(pickle.UnpicklingError):
    """The pickle asks for a global outside ``SAFE_GLOBALS``."""


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in SAFE_GLOBALS:
            raise _ForeignObject(f"it asks to build {module}.{name}")
        return super().find_class(module, name)


def unpickle_arrays(stream: BinaryIO) -> object:
    """The object pickled in ``stream``, rebuilt from ``SAFE_GLOBALS`` only (a pickle that asks
    for anything else raises ``pickle.UnpicklingError`` naming it), byte strings as latin1."""
    return _ArraysOnly(stream, encoding="latin1").load()


def load_pickle(path: Path, holds: str, remedy: str) -> object:
    """The object pickled in ``path``; ``holds`` says what it should be ("a dict with ...") and
    ``remedy`` what to do about a bad file, for the one-line errors."""
    try:
        with open(path, "rb") as file:
            return unpickle_arrays(file)
    except _ForeignObject as error:
        raise DataError(f"{path} is not {holds}: {error}, and metarun rebuilds "
                        f"only numpy arrays, lists and dicts from a pickle; {remedy}") from error
    except MemoryError:
        raise
    except OSError as error:
        raise DataError(f"cannot read {path} ({error.strerror or short_reason(error)}); "
                        f"{remedy}") from error
    except Exception as error:  # a torn pickle fails in many ways (EOF, bad opcode, bad data)
        raise DataError(f"{path} is corrupt or truncated ({type(error).__name__}: "
                        f"{short_reason(error)}); {remedy}") from error


def string_keys(mapping: dict) -> dict:
    """``mapping`` with byte-string keys decoded (a pickle re-saved after loading it with
    ``encoding="bytes"`` has them)."""
    return {key.decode("latin1") if isinstance(key, bytes) else key: value
            for key, value in mapping.items()}


def image_from_array(array: np.ndarray, name: str, size: int, channels: int) -> np.ndarray:
    """A uint8 ``[H, W, 3]`` RGB image as uint8 ``[channels, size, size]``: a transposed view
    when nothing changes, else PIL's grayscale conversion and LANCZOS resize, as for files."""
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise DataError(f"{name} is not an RGB image (uint8 [H, W, 3]) but {array.dtype} "
                        f"{list(array.shape)}; replace the file")
    if channels == 3 and array.shape[:2] == (size, size):
        return array.transpose(2, 0, 1)
    image = Image.fromarray(np.ascontiguousarray(array), "RGB")
    if channels == 1:
        image = image.convert("L")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.LANCZOS)
    resized = np.asarray(image, dtype=np.uint8)
    return resized[None] if channels == 1 else resized.transpose(2, 0, 1)
