"""Pickles as Python 2 wrote them, for fixtures of the datasets distributed that way.

Python 2's ``pickle.dump(obj, f, 2)`` stored ``str`` (bytes there) as BINSTRING opcodes, which
Python 3 can only load by decoding them (``encoding="latin1"``), numpy arrays' raw data included,
and named numpy's modules ``numpy.core.*``. This pickler writes both so, at protocol 2.
"""

from __future__ import annotations

import io
import pickle
import struct


class Python2Pickler(pickle._Pickler):  # the pure-Python pickler: its dispatch table is a dict
    dispatch = pickle._Pickler.dispatch.copy()

    def save_byte_string(self, obj: str | bytes) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_byte_string
    dispatch[bytes] = save_byte_string


def python2_pickle(obj: object) -> bytes:
    buffer = io.BytesIO()
    Python2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue().replace(b"cnumpy._core.", b"cnumpy.core.")
