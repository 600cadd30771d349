"""How a SecAgg+ masked update travels: unsigned 32-bit integers, not Flower's int64.

Flower 1.41's ``secaggplus_mod`` reduces every masked value modulo the protocol's modulus
(2**32 here) and then sends int64 arrays (its masks come out of ``randint(..., dtype=int64)``),
so half of every byte it uploads is zero. The node packs them to uint32 (``pack``, in
client/secagg_guard.py) and the upload is the size of a float32 update. The coordinator needs
no unpacking: Flower sums the arrays it receives, and a sum of uint32 arrays wraps modulo
2**32, which is the protocol's own arithmetic; the unmask stage then subtracts int64 masks
and reduces again. ``shapes`` reads what a reply holds (the npy headers only) so the coordinator
can drop a malformed one before it reaches that sum.
"""

from __future__ import annotations

import io

import numpy as np
from flwr.common import ndarray_to_bytes

UINT32_MAX = int(np.iinfo(np.uint32).max)


def _header(blob: bytes) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, data offset) of an ``ndarray_to_bytes`` blob (npy format)."""
    stream = io.BytesIO(blob)
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read(stream)
    if dtype.hasobject:
        raise ValueError("a masked array holds Python objects")
    if len(blob) - stream.tell() < int(np.prod(shape, dtype=np.int64)) * dtype.itemsize:
        raise ValueError("a masked array is shorter than its header says")
    return tuple(shape), fortran, dtype, stream.tell()


def npy_view(blob: bytes) -> np.ndarray:
    """The array an ``ndarray_to_bytes`` blob holds, read in place (no copy)."""
    shape, fortran, dtype, offset = _header(blob)
    array = np.frombuffer(blob, dtype=dtype, count=int(np.prod(shape, dtype=np.int64)), offset=offset)
    return array.reshape(shape, order="F" if fortran else "C")


def pack(blobs: list[bytes]) -> list[bytes]:
    """Each masked array as uint32 when its values fit (they do: they are reduced modulo 2**32 or a
    smaller power of two); an array holding anything else is left as it is."""
    packed = []
    for blob in blobs:
        array = npy_view(blob)
        if array.dtype != np.uint32 and array.dtype.kind in "iu" and (
                array.size == 0 or (int(array.min()) >= 0 and int(array.max()) <= UINT32_MAX)):
            blob = ndarray_to_bytes(array.astype(np.uint32))
        packed.append(blob)
    return packed


def shapes(blobs: list[bytes]) -> list[tuple[np.dtype, tuple[int, ...]]]:
    """(dtype, shape) of each masked array, from its header; ValueError for a blob that is no array."""
    out = []
    for blob in blobs:
        shape, _, dtype, _ = _header(blob)
        out.append((dtype, shape))
    return out
