"""Tensors of the Open Inference Protocol: V2 datatypes <-> NumPy, tensor data from JSON (flat or nested, row-major)
and from binary (Triton's binary tensor data extension: little-endian, row-major, no padding; a BYTES element is a
4-byte little-endian length followed by its bytes), and back. Every check says which tensor is at fault."""
from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from ..errors import BadRequest

BYTES = "BYTES"
# Fixed-size datatypes; BYTES tensors are lists of bytes/str here, never NumPy arrays of objects.
NUMPY_OF: dict[str, np.dtype] = {name: np.dtype(kind) for name, kind in {
    "BOOL": "?", "UINT8": "u1", "UINT16": "<u2", "UINT32": "<u4", "UINT64": "<u8", "INT8": "i1", "INT16": "<i2",
    "INT32": "<i4", "INT64": "<i8", "FP16": "<f2", "FP32": "<f4", "FP64": "<f8"}.items()}
_DATATYPE_OF = {(dtype.kind, dtype.itemsize): name for name, dtype in NUMPY_OF.items()}
_LENGTH = struct.Struct("<I")  # the length prefix of a BYTES element


def datatype_of(dtype: np.dtype | str) -> str:
    """NumPy dtype (or its name, as the repository metadata stores it) -> V2 datatype."""
    dtype = np.dtype(dtype)
    if dtype.kind in "OSU":
        return BYTES
    try:
        return _DATATYPE_OF[(dtype.kind, dtype.itemsize)]
    except KeyError:
        raise ValueError(f"no V2 datatype for {dtype}") from None


def element_count(shape: Sequence[int]) -> int:
    return math.prod(shape)


def check_datatype(name: str, datatype: str) -> None:
    if datatype != BYTES and datatype not in NUMPY_OF:
        raise BadRequest(f"input '{name}': unknown datatype {datatype!r} (V2 datatypes: {', '.join([*NUMPY_OF, BYTES])})")


# --- in: JSON ----------------------------------------------------------------------------------------------

def tensor_from_json(name: str, datatype: str, shape: Sequence[int], data: Any) -> np.ndarray | list[str]:
    """`data` as the request's JSON gave it -> an array of `shape` (a flat list of str for BYTES)."""
    if not isinstance(data, list):
        data = [data]  # a scalar tensor may be sent as a bare value
    if datatype == BYTES:
        elements = _flatten(data)
        bad = next((type(e).__name__ for e in elements if not isinstance(e, str)), None)
        if bad is not None:
            raise BadRequest(f"input '{name}': BYTES data must be strings, found {bad}")
        check_count(name, shape, len(elements))
        return elements
    try:
        values = np.asarray(data)
    except ValueError:
        raise BadRequest(f"input '{name}': data is not a rectangular array") from None
    if values.dtype == object:
        raise BadRequest(f"input '{name}': data is not a rectangular array of numbers (or holds numbers beyond 64 bits)")
    if values.ndim > 1 and tuple(values.shape) != tuple(shape):
        raise BadRequest(f"input '{name}': nested data has shape {list(values.shape)}, the input declares {list(shape)}")
    check_count(name, shape, values.size)
    target = NUMPY_OF[datatype]
    if values.size:
        _check_values_fit(name, datatype, values, target)
    return values.astype(target).reshape(shape)


def _flatten(data: list) -> list:
    flat: list = []
    stack = [iter(data)]
    while stack:
        for element in stack[-1]:
            if isinstance(element, list):
                stack.append(iter(element))
                break
            flat.append(element)
        else:
            stack.pop()
    return flat


def _check_values_fit(name: str, datatype: str, values: np.ndarray, target: np.dtype) -> None:
    """JSON numbers of the right kind and range: no silent truncation of 1.5 to 1 or of 300 to 44."""
    allowed = {"b": "b", "u": "bui", "i": "bui", "f": "buif"}[target.kind]
    if (values.dtype.kind == "b" and target.kind != "b") or values.dtype.kind not in allowed:
        found = {"b": "booleans", "f": "non-integers", "U": "strings"}.get(values.dtype.kind, str(values.dtype))
        raise BadRequest(f"input '{name}': datatype {datatype} cannot hold {found}")
    if target.kind in "ui":
        limits = np.iinfo(target)
        low, high = values.min(), values.max()
        if low < limits.min or high > limits.max:
            raise BadRequest(f"input '{name}': values {low}..{high} are out of range for {datatype} "
                             f"({limits.min}..{limits.max})")


def check_count(name: str, shape: Sequence[int], count: int) -> None:
    expected = element_count(shape)
    if count != expected:
        raise BadRequest(f"input '{name}': shape {list(shape)} holds {expected} elements, the data has {count}")


# --- in: binary --------------------------------------------------------------------------------------------

def tensor_from_binary(name: str, datatype: str, shape: Sequence[int], raw: memoryview) -> np.ndarray | list[bytes]:
    """The input's binary data -> an array of `shape` viewing `raw` (a flat list of bytes for BYTES)."""
    if datatype == BYTES:
        elements = split_bytes_elements(name, raw)
        check_count(name, shape, len(elements))
        return elements
    dtype = NUMPY_OF[datatype]
    needed = element_count(shape) * dtype.itemsize
    if len(raw) != needed:
        raise BadRequest(f"input '{name}': {len(raw)} bytes of binary data, but shape {list(shape)} of "
                         f"{datatype} is {needed} bytes")
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def split_bytes_elements(name: str, raw: memoryview) -> list[bytes]:
    elements, offset = [], 0
    while offset < len(raw):
        if offset + _LENGTH.size > len(raw):
            raise BadRequest(f"input '{name}': BYTES element {len(elements)} is cut off in its 4-byte length")
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise BadRequest(f"input '{name}': BYTES element {len(elements)} says {length} bytes, "
                             f"{len(raw) - offset} are left in its binary data")
        elements.append(bytes(raw[offset:offset + length]))
        offset += length
    return elements


# --- out ---------------------------------------------------------------------------------------------------

def tensor_to_binary(values: np.ndarray | Sequence[bytes]) -> bytes:
    if isinstance(values, np.ndarray) and values.dtype.kind not in "OSU":
        return np.ascontiguousarray(values, dtype=NUMPY_OF[datatype_of(values.dtype)]).tobytes()
    return b"".join(_LENGTH.pack(len(element)) + element for element in _as_bytes(values))


def tensor_to_json(values: np.ndarray | Sequence[bytes]) -> list:
    """Flat, row-major, as the protocol's responses carry it."""
    if isinstance(values, np.ndarray) and values.dtype.kind not in "OSU":
        return values.ravel().tolist()
    return [element.decode("utf-8", errors="replace") for element in _as_bytes(values)]


def _as_bytes(values) -> list[bytes]:
    flat = values.ravel().tolist() if isinstance(values, np.ndarray) else list(values)
    return [v if isinstance(v, bytes) else str(v).encode() for v in flat]
