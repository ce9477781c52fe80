"""Per-image state as columns: keys and digests stay Arrow arrays, and what the pipeline compares of them
becomes fixed-width numpy (a digest's first 64 bits as a uint64), never one Python string per image."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: ASCII byte -> its value as a hex digit (lower and upper case); 255 for anything else.
_HEX = np.full(256, 255, np.uint8)
_HEX[np.frombuffer(b"0123456789", np.uint8)] = np.arange(10)
_HEX[np.frombuffer(b"abcdef", np.uint8)] = np.arange(10, 16)
_HEX[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)


def hex_prefixes(digests) -> np.ndarray:
    """The first 16 hex digits (64 bits) of each hex digest as uint64, read from the Arrow string buffers
    (a list or numpy array of strings is taken too). A value that is not hex is a ``ValueError``."""
    arr = digests.combine_chunks() if isinstance(digests, pa.ChunkedArray) else digests
    if not isinstance(arr, pa.Array):
        arr = pa.array(list(digests), pa.string())
    if len(arr) == 0:
        return np.empty(0, np.uint64)
    arr = pc.utf8_slice_codeunits(arr.cast(pa.string()), 0, 16)
    if arr.null_count or not pc.all(pc.equal(pc.utf8_length(arr), 16)).as_py():
        raise ValueError("a digest shorter than 16 hex digits")
    offsets = np.frombuffer(arr.buffers()[1], np.int32)[arr.offset: arr.offset + len(arr) + 1]
    data = np.frombuffer(arr.buffers()[2], np.uint8)
    if not np.all(np.diff(offsets) == 16):  # 16 characters that are not 16 bytes: not ASCII, so not hex
        raise ValueError("a digest that is not hex")
    nibbles = _HEX[data[offsets[0]: offsets[-1]].reshape(-1, 16)]
    if (nibbles == 255).any():
        raise ValueError("a digest that is not hex")
    out = np.zeros(len(arr), np.uint64)
    for j in range(16):
        out = (out << np.uint64(4)) | nibbles[:, j].astype(np.uint64)
    return out
