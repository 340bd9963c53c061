"""The codec's bounds, as properties: whatever bytes arrive, `codec.decode` and
`ReplayService.insert` refuse them with `InvalidFragment` only (insert returns REJECTED and
counts the reason), within 4x the message's size of memory and 50 ms per call.

Memory is the peak `tracemalloc` sees during a call, which leaves out the message itself
(allocated before it). It may be 4x the message's size plus `FIXED_BYTES`, what a call
allocates whatever its input (an exception with its traceback, a few small objects).

Time is the calling thread's CPU time (`time.thread_time`), not wall-clock time: on a shared
machine another process can hold the CPU for longer than 50 ms in the middle of a call, which
says nothing about the decoder, while the CPU time the call itself used does. Hypothesis's
wall-clock deadline is off for the same reason.
"""

from __future__ import annotations

import struct
import time
import tracemalloc

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replay import codec
from replay.service import InsertResult, ReplayConfig, ReplayService
from replay.trajectory import (
    EPISODE_FIELDS,
    FIELD_NAMES,
    SCHEMA_VERSION,
    STACK_FIELDS,
    Fragment,
    InvalidFragment,
)

MEMORY_FACTOR = 4
FIXED_BYTES = 32 * 1024
CPU_SECONDS = 0.05
MAX_BYTES = 1 << 20
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PARAMS = st.fixed_dictionaries(
    {
        "t": st.integers(1, 6),
        "n": st.integers(1, 4),
        "obs": st.sampled_from([((4,), "float32"), ((), "float32"), ((2, 3, 3), "uint8")]),
        "action_shape": st.sampled_from([(), (2,)]),
        "policy_version": st.integers(0, 2**40),
        "actor_id": st.integers(0, 2**40),
        "fragment_id": st.text(min_size=1, max_size=12),
        "seed": st.integers(0, 2**16),
    }
)


def _fragment(make_fragment, params: dict) -> Fragment:
    params = dict(params)
    obs_shape, obs_dtype = params.pop("obs")
    return make_fragment(obs_shape=obs_shape, obs_dtype=obs_dtype, **params)


def _measured(call, size: int):
    """`call()`'s result, or the `InvalidFragment` it raised, after checking its memory and CPU
    time against the bounds; any other exception fails the test."""
    tracemalloc.start()
    try:
        start = time.thread_time()
        try:
            result = call()
        except InvalidFragment as exc:
            assert exc.reason and str(exc)
            result = exc
        cpu = time.thread_time() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak <= MEMORY_FACTOR * size + FIXED_BYTES, f"{peak} bytes for a {size}-byte message"
    assert cpu <= CPU_SECONDS, f"{cpu * 1e3:.1f} ms of CPU for a {size}-byte message"
    return result


def _check(data: bytes | bytearray) -> Fragment | InvalidFragment:
    """Decode `data` and insert it into a fresh service, both within the bounds; they agree."""
    size = len(data)
    result = _measured(lambda: codec.decode(data, max_bytes=MAX_BYTES), size)
    service = ReplayService(ReplayConfig.fifo_queue(max_message_bytes=MAX_BYTES))
    try:
        inserted = _measured(lambda: service.insert(data, timeout=0), size)
        rejected = service.stats()["rejected"]
    finally:
        service.close()
    if isinstance(result, InvalidFragment):
        assert inserted is InsertResult.REJECTED and rejected == {result.reason: 1}
    else:
        assert inserted is InsertResult.ACCEPTED and rejected == {}
    return result


# ------------------------------------------------------------------ byte mutations

#: Headers that declare far more than follows them: containers, strings, binaries, extensions.
HUGE_HEADERS = [
    b"\xdd\xff\xff\xff\xff",  # array 32
    b"\xdf\xff\xff\xff\xff",  # map 32
    b"\xdb\xff\xff\xff\xff",  # str 32
    b"\xc6\xff\xff\xff\xff",  # bin 32
    b"\xc9\xff\xff\xff\xff\x01",  # ext 32 of the array code
    b"\xdd\x00\x00\x10\x00" + b"\x90" * 4096,  # 4096 empty arrays
]
MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "cut", "truncate", "insert", "splice", "header"]),
        st.integers(0, 2**20),
        st.binary(min_size=1, max_size=9),
    ),
    min_size=1,
    max_size=5,
)


@SETTINGS
@given(params=PARAMS, other=PARAMS, edits=MUTATIONS, as_bytearray=st.booleans())
def test_mutated_messages_are_refused_within_bounds(
    make_fragment, params, other, edits, as_bytearray
):
    data = bytearray(codec.encode(_fragment(make_fragment, params)))
    donor = codec.encode(_fragment(make_fragment, other))
    for op, position, blob in edits:
        i = position % (len(data) + 1)
        if op == "flip":
            data[i % len(data)] ^= blob[0]
        elif op == "set":
            data[i : i + len(blob)] = blob
        elif op == "cut":
            del data[i : i + blob[0]]
        elif op == "truncate":
            del data[i:]
        elif op == "insert":
            data[i:i] = blob
        elif op == "splice":  # a run of another message's bytes
            j = position % len(donor)
            data[i:i] = donor[j : j + blob[0] * 16]
        else:
            data[i:i] = HUGE_HEADERS[blob[0] % len(HUGE_HEADERS)]
        if not data:
            data = bytearray(b"\x80")
    _check(data if as_bytearray else bytes(data))


# ------------------------------------------------------------------ crafted msgpack


def _array_header(n: int) -> bytes:
    return bytes([0x90 | n]) if n < 16 else b"\xdd" + struct.pack(">I", n)


def _nested_empty_arrays(width: int, depth: int) -> bytes:
    """An array of `width` arrays of ... `depth` levels, the innermost empty."""
    inner = b"\x90"
    for _ in range(depth):
        inner = _array_header(width) + inner * width
    return inner


def _array_ext(dtype: bytes, shape: tuple[int, ...], raw: bytes, code: int = 1) -> bytes:
    header = struct.pack(f"<B{len(dtype)}sB{len(shape)}Q", len(dtype), dtype, len(shape), *shape)
    payload = header + raw
    return b"\xc9" + struct.pack(">Ib", len(payload), code) + payload  # ext 32


DIMS = st.sampled_from([0, 1, 3, 2**31 - 1, 2**31, 2**32, 2**63, 2**64 - 1])
CRAFTED_VALUES = st.one_of(
    st.integers(1, 3).flatmap(  # up to 256 KiB
        lambda depth: st.integers(1, int(2 ** (18 / depth))).map(
            lambda width: _nested_empty_arrays(width, depth)
        )
    ),
    st.builds(
        lambda n: b"\xde" + struct.pack(">H", n) + b"\xa0\x90" * n, st.integers(0, 4000)
    ),  # a map of n entries "" -> []
    st.builds(
        _array_ext,
        st.sampled_from([b"float32", b"uint8", b"bool", b"int64", b"object", b"", b"\xff" * 3]),
        st.lists(DIMS, max_size=10).map(tuple),
        st.binary(max_size=64),
        st.sampled_from([1, 1, 2, -1]),
    ),
    st.sampled_from(
        [
            msgpack.packb(1.0),
            msgpack.packb(None),
            msgpack.packb(True),
            msgpack.packb(2**64 - 1),
            msgpack.packb(-(2**63)),
            msgpack.packb(b"\x00" * 100),
            msgpack.packb("x" * 70_000),
            b"\xc1",  # never used in msgpack
            b"\xd9\x02\xff\xfe",  # a str that is not UTF-8
        ]
    ),
)
CRAFTED_KEYS = st.sampled_from(
    [
        msgpack.packb("values"),
        msgpack.packb("obs" * 1000),
        msgpack.packb(7),
        msgpack.packb(b"obs"),
        msgpack.packb(None),
        _nested_empty_arrays(300, 2),
        b"\xd9\x03obs",  # a field name in a wider str format than msgpack writes
    ]
)


@st.composite
def crafted_messages(draw, make_fragment) -> bytes:
    """A valid message taken apart into entries, then changed: values and keys crafted,
    entries repeated, dropped or reordered, the map's declared count off."""
    fragment = _fragment(make_fragment, draw(PARAMS))
    message = msgpack.unpackb(codec.encode(fragment), raw=False)
    entries = [(msgpack.packb(k), msgpack.packb(v)) for k, v in message.items()]
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(0, len(entries) - 1)) if entries else 0
        op = draw(st.sampled_from(["value", "key", "extra", "repeat", "drop"]))
        if op == "value" and entries:
            entries[i] = (entries[i][0], draw(CRAFTED_VALUES))
        elif op == "key" and entries:
            entries[i] = (draw(CRAFTED_KEYS), entries[i][1])
        elif op == "extra":
            entries.insert(i, (draw(CRAFTED_KEYS), draw(CRAFTED_VALUES)))
        elif op == "repeat" and entries:
            entries.insert(i, entries[draw(st.integers(0, len(entries) - 1))])
        elif entries:
            del entries[i]
    entries = draw(st.permutations(entries))
    count = len(entries) + draw(st.sampled_from([0, 0, 0, -1, 1, 2**32 - 1 - len(entries)]))
    header = b"\xdf" + struct.pack(">I", max(count, 0))
    return header + b"".join(k + v for k, v in entries)


@SETTINGS
@given(data=st.data())
def test_crafted_msgpack_is_refused_within_bounds(make_fragment, data):
    message = data.draw(crafted_messages(make_fragment))
    _check(message)


def test_issues_16_mib_of_nested_empty_arrays_is_refused_at_once():
    """Issue 13's message: 1.1 GiB and 8 s to refuse when the whole tree was built first."""
    bomb = _array_header(256) + (b"\xdc\xff\xff" + b"\x90" * 65535) * 256
    version = msgpack.packb("schema_version") + msgpack.packb(SCHEMA_VERSION)
    messages = {
        "field": b"\x82" + version + msgpack.packb("obs") + bomb,
        "key": b"\x82" + version + bomb + b"\x01",
        "message": bomb,
    }
    reasons = {}
    for where, message in messages.items():
        assert len(message) > 16 * 2**20
        result = _measured(lambda m=message: codec.decode(m, max_bytes=64 * 2**20), len(message))
        assert isinstance(result, InvalidFragment), where
        reasons[where] = result.reason
    assert reasons == {"field": "array", "key": "structure", "message": "structure"}


# ------------------------------------------------------------------ every valid encoding


def _pack(value, draw) -> bytes:
    """`value` (a field name, a metadata value or an array extension) in any msgpack format
    that can hold it, not only the narrowest one, which is what msgpack writes."""
    if isinstance(value, str):
        raw = value.encode()
        head = [bytes([0xA0 | len(raw)])] if len(raw) < 32 else []
        head += [_header(first, code, len(raw)) for first, code in STR_FORMATS]
        return draw(st.sampled_from([h for h in head if h])) + raw
    if isinstance(value, int):
        options = [msgpack.packb(value)]  # the narrowest, fixint included
        options += [_header(first, code, value) for first, code in INT_FORMATS]
        return draw(st.sampled_from([o for o in options if o]))
    size = len(value.data)
    head = [bytes([FIXEXT[size]])] if size in FIXEXT else []
    head += [_header(first, code, size) for first, code in EXT_FORMATS]
    return (
        draw(st.sampled_from([h for h in head if h])) + struct.pack(">b", value.code) + value.data
    )


STR_FORMATS = [(0xD9, "B"), (0xDA, "H"), (0xDB, "I")]
EXT_FORMATS = [(0xC7, "B"), (0xC8, "H"), (0xC9, "I")]
INT_FORMATS = list(zip(range(0xCC, 0xD4), "BHIQbhiq", strict=True))
FIXEXT = {1: 0xD4, 2: 0xD5, 4: 0xD6, 8: 0xD7, 16: 0xD8}


def _header(first: int, code: str, number: int) -> bytes:
    """Format byte `first` then `number` as struct `code`; b"" when it does not fit."""
    try:
        return bytes([first]) + struct.pack(">" + code, number)
    except struct.error:
        return b""


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(params=PARAMS, data=st.data())
def test_any_valid_encoding_decodes_to_the_same_fragment(make_fragment, params, data):
    fragment = _fragment(make_fragment, params)
    message = msgpack.unpackb(codec.encode(fragment), raw=False)
    items = data.draw(st.permutations(list(message.items())))
    fixmap = [bytes([0x80 | len(items)])] if len(items) <= 15 else []  # a fixmap holds <= 15
    header = data.draw(st.sampled_from([*fixmap, b"\xde" + struct.pack(">H", len(items))]))
    body = b"".join(_pack(k, data.draw) + _pack(v, data.draw) for k, v in items)
    decoded = _check(header + body)
    assert isinstance(decoded, Fragment), decoded
    for name in (*FIELD_NAMES, *EPISODE_FIELDS, *STACK_FIELDS):
        np.testing.assert_array_equal(getattr(decoded, name), getattr(fragment, name), name)
        assert getattr(decoded, name).dtype == getattr(fragment, name).dtype
    meta = ("policy_version", "actor_id", "fragment_id", "frame_stack")
    assert [getattr(decoded, k) for k in meta] == [getattr(fragment, k) for k in meta]
