"""The wire format of a `Fragment`: msgpack, with numpy arrays as an extension type.

A message is one msgpack map::

    {"schema_version": 2, "obs": <ext>, "actions": <ext>, ..., "policy_version": 7,
     "actor_id": 3, "fragment_id": "3-000042", "frame_stack": 4, "episode_returns": <ext>,
     "episode_lengths": <ext>, "stack_resets": <ext>, "stack_heads": <ext>}

holding exactly the `trajectory.FIELDS`, `META_FIELDS`, `EPISODE_FIELDS` and `STACK_FIELDS`
keys plus `schema_version` (version 1, before frames were stored once and fragments carried
the recurrent core's state, is refused by name: `trajectory.version_mismatch`).
Each array is a msgpack ExtType with code `ARRAY_EXT_CODE` whose payload is::

    u8 len(dtype name) | dtype name (ascii, e.g. b"float32") | u8 ndim | ndim x u64 dims | raw bytes

in little-endian, C order. `encode` writes with msgpack. `decode` reads the top-level map
itself, bounded by the schema: a key is checked before its value is read, and no msgpack array,
map or binary (none is in the schema) is ever read, so a crafted message is refused after a few
header bytes, whatever it declares. Arrays are `np.frombuffer` views of the message (read-only,
no copy), so decoding needs memory only for validating them (`validate`).

Every way a message can be wrong raises `InvalidFragment` with a message that says what, and a
`reason` key the replay service counts rejections by:

    oversized       the message is longer than `max_bytes`
    truncated       the bytes end in the middle of a msgpack object
    not_msgpack     not msgpack at all, or trailing bytes after the message
    structure       not a map of named fields (a key that is not a str, or appears twice)
    schema_version  missing, or a version this build does not read
    missing_field   a schema field is absent
    unknown_field   a key the schema does not know
    array           an array field that is not a well-formed array extension
    dtype, shape, non_finite, logp_positive, autoreset, invalid
                    from `trajectory.validate`: the arrays disagree with `FIELDS` or each other,
                    or metadata has the wrong type (`invalid`, also for a metadata field that is
                    a msgpack array, map or binary, or a str over `MAX_STR_BYTES`)
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
    STACK_FIELDS,
    Fragment,
    InvalidFragment,
    validate,
    version_mismatch,
)

#: The msgpack extension type code of a numpy array.
ARRAY_EXT_CODE = 1
#: Default upper bound on an encoded message (an Atari fragment of 20 x 16 envs is ~2.7 MB).
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
#: Upper bound on array rank; the schema needs at most 2 + len(obs_shape).
MAX_NDIM = 8
#: Upper bound on the elements an array may declare, its dimensions' product with empty ones
#: counted as 1: far above any real fragment, and always within what numpy can index.
MAX_ELEMENTS = 1 << 31
#: Upper bound on a str value (`fragment_id`).
MAX_STR_BYTES = 1 << 16
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
_WIRE_BY_NAME = {name.encode("ascii"): dtype for name, dtype in WIRE_DTYPES.items()}
#: Reads the dimensions of an array of each rank.
_DIMS = [struct.Struct(f"<{ndim}Q") for ndim in range(MAX_NDIM + 1)]
VERSION_KEY = "schema_version"
_ARRAY_KEYS = (*FIELD_NAMES, *EPISODE_FIELDS, *STACK_FIELDS)
_ARRAY_KEY_SET = frozenset(_ARRAY_KEYS)
_EXPECTED_KEYS = frozenset((VERSION_KEY, *_ARRAY_KEYS, *META_FIELDS))
_MAX_KEY_BYTES = max(len(key.encode()) for key in _EXPECTED_KEYS)
# msgpack formats (https://github.com/msgpack/msgpack/blob/master/spec.md) by first byte, for
# those whose length or number follows in big-endian bytes: how to read those bytes.
_FOLLOWING = {
    first: struct.Struct(">" + code)
    for first, code in (
        *((0xDE, "H"), (0xDF, "I")),  # map 16, 32
        *((0xD9, "B"), (0xDA, "H"), (0xDB, "I")),  # str 8, 16, 32
        *((0xC7, "B"), (0xC8, "H"), (0xC9, "I")),  # ext 8, 16, 32
        *((0xCA, "f"), (0xCB, "d")),  # float 32, 64
        *((0xCC, "B"), (0xCD, "H"), (0xCE, "I"), (0xCF, "Q")),  # uint 8, 16, 32, 64
        *((0xD0, "b"), (0xD1, "h"), (0xD2, "i"), (0xD3, "q")),  # int 8, 16, 32, 64
    )
}
_CONSTANTS = {0xC0: None, 0xC2: False, 0xC3: True}
_SCALAR_KINDS = frozenset(("int", "str", "float", "bool", "NoneType"))


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
      data: the message (bytes, bytearray or memoryview; anything but bytes is copied once).
      max_bytes: messages longer than this are refused before parsing.

    Returns:
      A validated `Fragment` whose arrays are read-only views of the message.

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
    # The arrays are views of the message: a buffer the caller could still change is copied.
    message = data if isinstance(data, bytes) else bytes(data)
    values, payloads = _Reader(message).read_message()
    if VERSION_KEY not in values:
        raise InvalidFragment(f"message has no {VERSION_KEY}", "schema_version")
    missing = [k for k in _ARRAY_KEYS if k not in payloads]
    missing += [k for k in META_FIELDS if k not in values]
    if missing:
        raise InvalidFragment(f"missing field(s): {', '.join(missing)}", "missing_field")
    fields: dict[str, object] = {k: _unpack_array(k, message, *payloads[k]) for k in _ARRAY_KEYS}
    fields.update({name: values[name] for name in META_FIELDS})
    return validate(Fragment(**fields))


def _kind(first: int) -> str:
    """The Python type msgpack decodes a value to, told by the value's first byte."""
    if first <= 0x7F or first >= 0xE0 or 0xCC <= first <= 0xD3:
        return "int"
    if 0xA0 <= first <= 0xBF or 0xD9 <= first <= 0xDB:
        return "str"
    if 0xC7 <= first <= 0xC9 or 0xD4 <= first <= 0xD8:
        return "ExtType"
    if 0x80 <= first <= 0x8F or first in (0xDE, 0xDF):
        return "dict"
    if 0x90 <= first <= 0x9F or first in (0xDC, 0xDD):
        return "list"
    kinds = {0xC0: "NoneType", 0xC2: "bool", 0xC3: "bool", 0xCA: "float", 0xCB: "float"}
    return kinds.get(first, "bytes" if 0xC4 <= first <= 0xC6 else "invalid")


_KINDS = tuple(_kind(first) for first in range(256))
#: Each field name as msgpack writes it (a fixstr), for the fast path of `_Reader.read_message`.
_KEYS_BY_ENCODING = {msgpack.packb(key): key for key in _EXPECTED_KEYS}


class _Reader:
    """Reads a message with the schema in hand, one top-level entry at a time.

    The message is a map of at most one entry per schema key; every value is a scalar or an
    array extension. A key is checked before its value is read, and a value's msgpack type is
    checked from its first byte before its contents are: msgpack arrays, maps and binaries
    appear nowhere in the schema, so none is ever read, and an unknown or repeated key ends the
    read. Extension payloads are left where they are (nothing is copied): reading takes a few
    steps per key, whatever the message's size.
    """

    def __init__(self, data: bytes):
        self._data = data
        self._pos = 0

    def read_message(self) -> tuple[dict[str, object], dict[str, tuple[int, int, int]]]:
        """The scalar values, and the array extensions as (type code, start, end) of their
        payload in the message, by key."""
        first = self._byte()
        kind = _KINDS[first]
        if kind != "dict":
            if kind == "ExtType":  # one whole value, or bytes after it that are not msgpack
                self._ext(first)
                self._check_end()
            elif kind in _SCALAR_KINDS:
                self._scalar(first)
                self._check_end()
            raise _wrong_kind("message must be a msgpack map of fields", first, "structure")
        count = self._header(first, 0x80)
        values: dict[str, object] = {}
        payloads: dict[str, tuple[int, int, int]] = {}
        data = self._data
        for _ in range(count):  # one key more than the schema has is unknown or repeated
            # A field name as msgpack writes it, inline (the common case); `_key` does the rest.
            pos = self._pos
            key = None
            if pos < len(data):
                key = _KEYS_BY_ENCODING.get(data[pos : pos + 1 + (data[pos] & 0x1F)])
            if key is None:
                key = self._key()
            else:
                self._pos = pos + 1 + len(key)
            if key in values or key in payloads:
                raise InvalidFragment(f"field {key} appears twice", "structure")
            first = self._byte()
            kind = _KINDS[first]
            if key in _ARRAY_KEY_SET:
                if kind != "ExtType":
                    what = f"{key} must be an array (msgpack ext type {ARRAY_EXT_CODE})"
                    raise _wrong_kind(what, first, "array")
                payloads[key] = self._ext(first)
            elif kind in _SCALAR_KINDS:
                values[key] = value = self._scalar(first)
                if key == VERSION_KEY and (type(value) is not int or value != SCHEMA_VERSION):
                    raise InvalidFragment(version_mismatch(value), "schema_version")
            elif key == VERSION_KEY:
                raise _wrong_kind(f"{key} must be an int", first, "schema_version")
            else:
                raise _wrong_kind(f"{key} must be {META_FIELDS[key].__name__}", first, "invalid")
        self._check_end()
        return values, payloads

    def _check_end(self) -> None:
        if self._pos != len(self._data):
            raise InvalidFragment(
                f"{len(self._data) - self._pos} trailing bytes after the message", "not_msgpack"
            )

    def _truncated(self) -> InvalidFragment:
        return InvalidFragment(
            f"truncated message: {len(self._data)} bytes end inside a msgpack object", "truncated"
        )

    def _byte(self) -> int:
        """The byte at the read position (the first of the next value), not consumed."""
        try:
            return self._data[self._pos]
        except IndexError:
            raise self._truncated() from None

    def _take(self, n: int) -> bytes:
        start, end = self._pos, self._pos + n
        if end > len(self._data):
            raise self._truncated()
        self._pos = end
        return self._data[start:end]

    def _header(self, first: int, fix_base: int) -> int | float:
        """Step over a header and return the number in it: a fix* format holds it in the first
        byte (from `fix_base` up), the others in the bytes after it (`_FOLLOWING`)."""
        pos = self._pos + 1
        if first < 0xC0:
            self._pos = pos
            return first - fix_base
        following = _FOLLOWING[first]
        if pos + following.size > len(self._data):
            raise self._truncated()
        self._pos = pos + following.size
        return following.unpack_from(self._data, pos)[0]

    def _key(self) -> str:
        first = self._byte()
        if 0xA0 <= first <= 0xBF:  # a fixstr: how msgpack writes every field name
            end = self._pos + 1 + first - 0xA0
            key = _KEYS_BY_ENCODING.get(self._data[self._pos : end])
            if key is not None:
                self._pos = end
                return key
        if _KINDS[first] != "str":
            raise _wrong_kind("message keys must be field names (str)", first, "structure")
        length = self._header(first, 0xA0)
        if length > _MAX_KEY_BYTES:
            raise InvalidFragment(f"unknown field: a key of {length} bytes", "unknown_field")
        key = self._text(length)
        if key not in _EXPECTED_KEYS:
            raise InvalidFragment(f"unknown field: {key}", "unknown_field")
        return key

    def _text(self, length: int) -> str:
        try:
            return self._take(length).decode()
        except UnicodeDecodeError as exc:
            raise InvalidFragment(
                f"not msgpack: a str that is not UTF-8 ({exc})", "not_msgpack"
            ) from exc

    def _scalar(self, first: int) -> object:
        """An int, float, bool, None or str (the caller has checked `_KINDS[first]`)."""
        if first <= 0x7F or first >= 0xE0:  # positive and negative fixint
            self._pos += 1
            return first if first <= 0x7F else first - 0x100
        if first in _CONSTANTS:
            self._pos += 1
            return _CONSTANTS[first]
        if _KINDS[first] != "str":
            return self._header(first, 0)  # an int or a float
        length = self._header(first, 0xA0)
        if length > MAX_STR_BYTES:
            raise InvalidFragment(f"a str of {length} bytes, at most {MAX_STR_BYTES}", "invalid")
        return self._text(length)

    def _ext(self, first: int) -> tuple[int, int, int]:
        data, pos = self._data, self._pos
        if first >= 0xD4:  # fixext 1, 2, 4, 8, 16
            start, length = pos + 2, 1 << (first - 0xD4)
        else:  # ext 8, 16, 32: the length, then the type code
            following = _FOLLOWING[first]
            start = pos + 2 + following.size
            if start > len(data):
                raise self._truncated()
            length = following.unpack_from(data, pos + 1)[0]
        if start + length > len(data):
            raise self._truncated()
        self._pos = start + length
        code = data[start - 1]
        return code - 0x100 if code > 0x7F else code, start, self._pos


def _wrong_kind(what: str, first: int, reason: str) -> InvalidFragment:
    kind = _KINDS[first]
    if kind == "invalid":
        return InvalidFragment(
            f"not msgpack: byte 0x{first:02x} starts no msgpack value", "not_msgpack"
        )
    return InvalidFragment(f"{what}, got {kind}", reason)


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


def _unpack_array(name: str, data: bytes, code: int, start: int, end: int) -> np.ndarray:
    """The array whose extension payload is `data[start:end]`, a read-only view of `data`."""
    if code != ARRAY_EXT_CODE:
        raise InvalidFragment(
            f"{name} must be an array (msgpack ext type {ARRAY_EXT_CODE}), got ext type {code}",
            "array",
        )
    if end - start < 2:
        raise InvalidFragment(f"{name}: array header is truncated", "array")
    name_end = start + 1 + data[start]
    dtype = _WIRE_BY_NAME.get(data[start + 1 : name_end])
    if dtype is None:
        dtype_name = data[start + 1 : name_end].decode("ascii", errors="replace")
        raise InvalidFragment(f"{name}: unknown array dtype {dtype_name!r}", "array")
    if end < name_end + 1:
        raise InvalidFragment(f"{name}: array header is truncated", "array")
    ndim = data[name_end]
    if ndim > MAX_NDIM:
        raise InvalidFragment(f"{name}: array has {ndim} dimensions, at most {MAX_NDIM}", "array")
    offset = name_end + 1 + 8 * ndim
    if end < offset:
        raise InvalidFragment(f"{name}: array header is truncated", "array")
    shape = _DIMS[ndim].unpack_from(data, name_end + 1)
    # Python ints, so nothing overflows: a huge declared shape is refused here, before anything
    # is allocated; and so, below, is one that holds no elements but that numpy cannot index.
    count = math.prod(shape)
    if end - offset != count * dtype.itemsize:
        raise InvalidFragment(
            f"{name}: shape {shape} of {dtype.name} needs {count * dtype.itemsize} bytes, "
            f"the message carries {end - offset}",
            "array",
        )
    if math.prod(d or 1 for d in shape) > MAX_ELEMENTS:
        raise InvalidFragment(
            f"{name}: shape {shape} declares over {MAX_ELEMENTS} elements", "array"
        )
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
