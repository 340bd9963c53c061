"""The wire format of a `Fragment`: msgpack, with numpy arrays as an extension type.

A message is one msgpack map::

    {"schema_version": 1, "obs": <ext>, "actions": <ext>, ..., "policy_version": 7,
     "actor_id": 3, "fragment_id": "3-000042", "episode_returns": <ext>, "episode_lengths": <ext>}

holding exactly the `trajectory.FIELDS`, `META_FIELDS` and `EPISODE_FIELDS` keys plus
`schema_version`. Each array is a msgpack ExtType with code `ARRAY_EXT_CODE` whose payload is::

    u8 len(dtype name) | dtype name (ascii, e.g. b"float32") | u8 ndim | ndim x u64 dims | raw bytes

in little-endian, C order. `decode` views the raw bytes with `np.frombuffer` (no copy beyond the
one msgpack makes when it slices out the ext payload), so decoded arrays are read-only.

Every way a message can be wrong raises `InvalidFragment` with a message that says what, and a
`reason` key the replay service counts rejections by:

    oversized       the message is longer than `max_bytes`
    truncated       the bytes end in the middle of a msgpack object
    not_msgpack     not msgpack at all, or trailing bytes after the message
    structure       valid msgpack, but not a map of named fields
    schema_version  missing, or a version this build does not read
    missing_field   a schema field is absent
    unknown_field   a key the schema does not know
    array           an array field that is not a well-formed array extension
    dtype, shape, non_finite, logp_positive, autoreset, invalid
                    from `trajectory.validate`: the arrays disagree with `FIELDS` or each other
"""

from __future__ import annotations

import math
import struct

import msgpack
import numpy as np

from replay.trajectory import (
    EPISODE_FIELDS,
    FIELD_NAMES,
    META_FIELDS,
    SCHEMA_VERSION,
    Fragment,
    InvalidFragment,
    validate,
)

#: The msgpack extension type code of a numpy array.
ARRAY_EXT_CODE = 1
#: Default upper bound on an encoded message (an Atari fragment of 20 x 16 envs is ~9 MB).
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
#: Upper bound on array rank; the schema needs at most 2 + len(obs_shape).
MAX_NDIM = 8
#: Upper bound on a single dimension, far above any real T, N or image side.
MAX_DIM = 1 << 31
#: The dtypes an array may carry on the wire. Wider than the schema on purpose, so that a
#: float64 reward decodes and is then refused by `validate` with a message naming the field.
WIRE_DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name).newbyteorder("<")
    for name in (
        "bool",
        "uint8",
        "int8",
        "uint16",
        "int16",
        "uint32",
        "int32",
        "uint64",
        "int64",
        "float16",
        "float32",
        "float64",
    )
}
VERSION_KEY = "schema_version"
_ARRAY_KEYS = (*FIELD_NAMES, *EPISODE_FIELDS)
_EXPECTED_KEYS = frozenset((VERSION_KEY, *_ARRAY_KEYS, *META_FIELDS))


def encode(fragment: Fragment, *, check: bool = True) -> bytes:
    """Serialise a fragment to msgpack bytes.

    Args:
      fragment: the fragment; validated first unless `check` is False.
      check: False only to build deliberately malformed messages (tests of `decode`).

    Raises:
      InvalidFragment: the fragment breaks the schema (only when `check`), or an array has a
        dtype the wire format cannot carry.
    """
    if check:
        validate(fragment)
    message: dict[str, object] = {VERSION_KEY: SCHEMA_VERSION}
    for name in _ARRAY_KEYS:
        message[name] = _pack_array(name, getattr(fragment, name))
    for name in META_FIELDS:
        message[name] = getattr(fragment, name)
    try:
        return msgpack.packb(message, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidFragment(f"cannot encode fragment: {exc}", "invalid") from exc


def decode(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> Fragment:
    """Parse and validate msgpack bytes written by `encode`.

    Args:
      data: the message (bytes, bytearray or memoryview).
      max_bytes: messages longer than this are refused before parsing.

    Returns:
      A validated `Fragment` whose arrays are read-only views of the message's buffers.

    Raises:
      InvalidFragment: for anything malformed; `reason` is one of the keys in the module doc.
    """
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidFragment(f"message must be bytes, got {type(data).__name__}", "not_msgpack")
    size = memoryview(data).nbytes
    if size > max_bytes:
        raise InvalidFragment(
            f"message is {size} bytes, larger than the limit of {max_bytes}", "oversized"
        )
    message = _unpack(data, size)
    if not isinstance(message, dict):
        raise InvalidFragment(
            f"message must be a msgpack map of fields, got {type(message).__name__}", "structure"
        )
    if VERSION_KEY not in message:
        raise InvalidFragment(f"message has no {VERSION_KEY}", "schema_version")
    version = message[VERSION_KEY]
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise InvalidFragment(
            f"unknown {VERSION_KEY} {version!r}: this build reads version {SCHEMA_VERSION}",
            "schema_version",
        )
    missing = [k for k in (*_ARRAY_KEYS, *META_FIELDS) if k not in message]
    if missing:
        raise InvalidFragment(f"missing field(s): {', '.join(missing)}", "missing_field")
    unknown = sorted(str(k) for k in message if k not in _EXPECTED_KEYS)
    if unknown:
        raise InvalidFragment(f"unknown field(s): {', '.join(unknown)}", "unknown_field")
    fields = {name: _unpack_array(name, message[name]) for name in _ARRAY_KEYS}
    fields.update({name: message[name] for name in META_FIELDS})
    return validate(Fragment(**fields))


def _unpack(data: bytes | bytearray | memoryview, size: int) -> object:
    try:
        # ext_hook is left out on purpose: arrays come back as ExtType and are parsed only after
        # the schema version has been checked. The length limits stop msgpack from allocating
        # for a declared length the message cannot hold.
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=min(size, 1 << 16),
            max_bin_len=size,
            max_ext_len=size,
            max_array_len=min(size, 1 << 16),
            max_map_len=min(size, 1 << 10),
        )
    except msgpack.ExtraData as exc:
        raise InvalidFragment(
            f"{len(exc.extra)} trailing bytes after the message", "not_msgpack"
        ) from exc
    except (msgpack.FormatError, msgpack.StackError) as exc:
        raise InvalidFragment(f"not msgpack: {type(exc).__name__}", "not_msgpack") from exc
    except ValueError as exc:
        if "incomplete input" in str(exc):
            raise InvalidFragment(
                f"truncated message: {size} bytes end inside a msgpack object", "truncated"
            ) from exc
        raise InvalidFragment(f"not msgpack: {exc}", "not_msgpack") from exc
    except (TypeError, OverflowError, RecursionError, MemoryError) as exc:
        # TypeError: e.g. an unhashable map key; MemoryError: a nesting bomb within size.
        raise InvalidFragment(f"not msgpack: {exc}", "not_msgpack") from exc


def _pack_array(name: str, value: object) -> msgpack.ExtType:
    if not isinstance(value, np.ndarray):
        raise InvalidFragment(f"{name} must be a numpy array, got {type(value).__name__}", "array")
    wire = WIRE_DTYPES.get(value.dtype.name)
    if wire is None:
        raise InvalidFragment(f"{name} has dtype {value.dtype.name}: not encodable", "dtype")
    if value.ndim > MAX_NDIM:
        raise InvalidFragment(f"{name} has {value.ndim} dimensions, at most {MAX_NDIM}", "shape")
    value = np.ascontiguousarray(value, dtype=wire)
    dtype_name = value.dtype.name.encode("ascii")
    header = struct.pack(
        f"<B{len(dtype_name)}sB{value.ndim}Q", len(dtype_name), dtype_name, value.ndim, *value.shape
    )
    return msgpack.ExtType(ARRAY_EXT_CODE, b"".join((header, value.data)))


def _unpack_array(name: str, value: object) -> np.ndarray:
    if not isinstance(value, msgpack.ExtType) or value.code != ARRAY_EXT_CODE:
        got = f"ext type {value.code}" if isinstance(value, msgpack.ExtType) else type(value)
        got = got if isinstance(got, str) else got.__name__
        raise InvalidFragment(
            f"{name} must be an array (msgpack ext type {ARRAY_EXT_CODE}), got {got}", "array"
        )
    payload = value.data
    if len(payload) < 2:
        raise InvalidFragment(f"{name}: array header is truncated", "array")
    name_len = payload[0]
    dtype_name = payload[1 : 1 + name_len].decode("ascii", errors="replace")
    dtype = WIRE_DTYPES.get(dtype_name)
    if dtype is None:
        raise InvalidFragment(f"{name}: unknown array dtype {dtype_name!r}", "array")
    if len(payload) < 2 + name_len:
        raise InvalidFragment(f"{name}: array header is truncated", "array")
    ndim = payload[1 + name_len]
    if ndim > MAX_NDIM:
        raise InvalidFragment(f"{name}: array has {ndim} dimensions, at most {MAX_NDIM}", "array")
    offset = 2 + name_len + 8 * ndim
    if len(payload) < offset:
        raise InvalidFragment(f"{name}: array header is truncated", "array")
    shape = struct.unpack_from(f"<{ndim}Q", payload, 2 + name_len)
    if any(d > MAX_DIM for d in shape):
        raise InvalidFragment(f"{name}: shape {shape} has a dimension over {MAX_DIM}", "array")
    # Python ints: the product cannot overflow, so a huge declared shape is caught here,
    # before anything is allocated.
    expected = math.prod(shape) * dtype.itemsize
    if len(payload) - offset != expected:
        raise InvalidFragment(
            f"{name}: shape {shape} of {dtype_name} needs {expected} bytes, "
            f"the message carries {len(payload) - offset}",
            "array",
        )
    return np.frombuffer(payload, dtype=dtype, offset=offset).reshape(shape)
