"""The msgpack codec: round trips, one test per rejection, and fuzzing."""

from __future__ import annotations

import dataclasses
import struct

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replay import codec
from replay.service import InsertResult, ReplayConfig, ReplayService
from replay.trajectory import EPISODE_FIELDS, FIELD_NAMES, SCHEMA_VERSION, InvalidFragment

OBS_KINDS = {
    "vector": ((4,), "float32"),
    "wide_vector": ((17,), "float32"),
    "scalar_obs": ((), "float32"),
    "image": ((3, 8, 8), "uint8"),
    "atari_stack": ((4, 12, 12), "uint8"),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    t=st.integers(1, 12),
    n=st.integers(1, 6),
    obs_kind=st.sampled_from(sorted(OBS_KINDS)),
    action_shape=st.sampled_from([(), (1,), (3,)]),
    policy_version=st.integers(0, 2**63 - 1),
    actor_id=st.integers(0, 2**63 - 1),
    fragment_id=st.text(min_size=1, max_size=40),
    seed=st.integers(0, 2**32 - 1),
    core_size=st.sampled_from([0, 1, 5]),
)
def test_round_trip(
    make_fragment,
    t,
    n,
    obs_kind,
    action_shape,
    policy_version,
    actor_id,
    fragment_id,
    seed,
    core_size,
):
    obs_shape, obs_dtype = OBS_KINDS[obs_kind]
    fragment = make_fragment(
        t,
        n,
        obs_shape=obs_shape,
        obs_dtype=obs_dtype,
        action_shape=action_shape,
        policy_version=policy_version,
        actor_id=actor_id,
        fragment_id=fragment_id,
        seed=seed,
        core_size=core_size,
    )
    decoded = codec.decode(codec.encode(fragment))
    for name in (*FIELD_NAMES, *EPISODE_FIELDS):
        want, got = getattr(fragment, name), getattr(decoded, name)
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)
        assert not got.flags.writeable, f"{name} should be a read-only view of the message"
    assert (decoded.policy_version, decoded.actor_id, decoded.fragment_id) == (
        policy_version,
        actor_id,
        fragment_id,
    )
    assert decoded.nbytes == fragment.nbytes


def test_big_endian_and_strided_arrays_encode_as_little_endian_c_order(make_fragment):
    fragment = make_fragment(5, 3, obs_shape=(2, 6))
    obs = fragment.obs.astype(">f4")[:, :, :, ::2]  # big-endian and not contiguous
    decoded = codec.decode(codec.encode(dataclasses.replace(fragment, obs=obs), check=False))
    assert decoded.obs.dtype == np.dtype("<f4")
    np.testing.assert_array_equal(decoded.obs, obs)


def test_message_carries_the_schema_version(make_fragment):
    message = msgpack.unpackb(codec.encode(make_fragment()), raw=False)
    assert message[codec.VERSION_KEY] == SCHEMA_VERSION


def test_encode_validates_unless_told_not_to(make_fragment):
    fragment = make_fragment()
    bad = dataclasses.replace(fragment, rewards=fragment.rewards.astype(np.float64))
    with pytest.raises(InvalidFragment, match="rewards has dtype float64"):
        codec.encode(bad)
    assert isinstance(codec.encode(bad, check=False), bytes)


# ------------------------------------------------------------------ malformed messages


def _message(fragment, **changes) -> bytes:
    """Encode `fragment` unchecked, then set (or, with value ..., delete) top-level keys."""
    message = msgpack.unpackb(codec.encode(fragment, check=False), raw=False)
    for key, value in changes.items():
        if value is ...:
            del message[key]
        else:
            message[key] = value
    return msgpack.packb(message, use_bin_type=True)


def _replace(fragment, **changes) -> bytes:
    return codec.encode(dataclasses.replace(fragment, **changes), check=False)


def _ext(dtype: bytes, shape: tuple[int, ...], raw: bytes) -> msgpack.ExtType:
    header = struct.pack(f"<B{len(dtype)}sB{len(shape)}Q", len(dtype), dtype, len(shape), *shape)
    return msgpack.ExtType(codec.ARRAY_EXT_CODE, header + raw)


def _entries(fragment, *extra) -> bytes:
    """The message of `fragment` written entry by entry, with `extra` (key, value) entries
    after it: keys may repeat or be of any type, which a dict cannot express."""
    entries = [*msgpack.unpackb(codec.encode(fragment, check=False), raw=False).items(), *extra]
    header = b"\xde" + struct.pack(">H", len(entries))
    return header + b"".join(msgpack.packb(k) + msgpack.packb(v) for k, v in entries)


def _nan_at(array: np.ndarray, index: tuple[int, int], value: float) -> np.ndarray:
    array = array.copy()
    array[index] = value
    return array


# (id, build(fragment) -> bytes, reason, message regex, decode kwargs)
MALFORMED = [
    ("not_msgpack", lambda f: b"\xc1\xc1\xc1", "not_msgpack", r"not msgpack", {}),
    ("not_bytes", lambda f: "a string", "not_msgpack", r"message must be bytes, got str", {}),
    ("empty", lambda f: b"", "truncated", r"truncated message: 0 bytes", {}),
    ("truncated", lambda f: codec.encode(f)[:-7], "truncated", r"truncated message", {}),
    ("trailing", lambda f: codec.encode(f) + b"\x00\x01", "not_msgpack", r"2 trailing bytes", {}),
    ("oversized", codec.encode, "oversized", r"larger than the limit of 100", {"max_bytes": 100}),
    ("not_a_map", lambda f: msgpack.packb([1, 2]), "structure", r"must be a msgpack map", {}),
    ("no_version", lambda f: _message(f, schema_version=...), "schema_version", r"no schema", {}),
    (
        "future_version",
        lambda f: _message(f, schema_version=SCHEMA_VERSION + 1),
        "schema_version",
        rf"unknown schema_version {SCHEMA_VERSION + 1}: this build reads version {SCHEMA_VERSION}",
        {},
    ),
    (
        # What an older offpg sends: every stacked frame repeated K times and no core_state.
        "version_1",
        lambda f: _message(f, schema_version=1, core_state=...),
        "schema_version",
        r"schema_version 1 is older than this build's 2 \(version 2 stores stacked frames once "
        r"per fragment and adds core_state, .*\): .* actors and replay must run the same offpg$",
        {},
    ),
    ("missing_field", lambda f: _message(f, truncated=...), "missing_field", r"truncated$", {}),
    ("unknown_field", lambda f: _message(f, values=1), "unknown_field", r": values$", {}),
    (
        "array_as_list",
        lambda f: _message(f, rewards=[1.0, 2.0]),
        "array",
        r"rewards must be an array \(msgpack ext type 1\), got list",
        {},
    ),
    (
        "unknown_wire_dtype",
        lambda f: _message(f, rewards=_ext(b"object", (4, 2), b"")),
        "array",
        r"rewards: unknown array dtype 'object'",
        {},
    ),
    (
        "huge_declared_shape",
        lambda f: _message(f, obs=_ext(b"float32", (2**31, 2**31, 2**31), b"\0" * 16)),
        "array",
        r"obs: shape \(2147483648, 2147483648, 2147483648\) of float32 needs \d+ bytes, "
        r"the message carries 16",
        {},
    ),
    (
        "empty_dim_numpy_cannot_index",
        lambda f: _message(f, obs=_ext(b"float32", (4, 3, 0, 2**31, 2**31), b"")),
        "array",
        r"obs: shape \(4, 3, 0, 2147483648, 2147483648\) declares over 2147483648 elements",
        {},
    ),
    (
        "float_version",
        lambda f: _message(f, schema_version=float(SCHEMA_VERSION)),
        "schema_version",
        rf"unknown schema_version {SCHEMA_VERSION}\.0: this build reads version {SCHEMA_VERSION}",
        {},
    ),
    (
        "bool_version",
        lambda f: _message(f, schema_version=True),
        "schema_version",
        r"unknown schema_version True",
        {},
    ),
    (
        "repeated_key",
        lambda f: _entries(f, ("rewards", _ext(b"float32", (4, 2), bytes(32)))),
        "structure",
        r"field rewards appears twice",
        {},
    ),
    ("int_key", lambda f: _entries(f, (7, 1)), "structure", r"keys must be .*got int", {}),
    (
        "nested_arrays_as_a_field",
        lambda f: _message(f, obs=[[[]] * 50] * 50),
        "array",
        r"obs must be an array \(msgpack ext type 1\), got list",
        {},
    ),
    (
        "map_as_metadata",
        lambda f: _message(f, fragment_id={"a": [1, 2]}),
        "invalid",
        r"fragment_id must be str, got dict",
        {},
    ),
    (
        "wrong_dtype",
        lambda f: _replace(f, rewards=f.rewards.astype(np.float64)),
        "dtype",
        r"rewards has dtype float64, allowed: float32",
        {},
    ),
    (
        "obs_rows_not_t_plus_1",
        lambda f: _replace(f, obs=f.obs[:-1]),
        "shape",
        r"obs has shape \(4, 2, 4\), expected \[T\+1=5, N=2, \.\.\.\]",
        {},
    ),
    (
        "n_disagrees",
        lambda f: _replace(f, actions=f.actions[:, :1]),
        "shape",
        r"actions has shape \(4, 1\), expected \[T=4, N=2",
        {},
    ),
    (
        "core_state_rows",
        lambda f: _replace(f, core_state=np.zeros((3, 2, 4), np.float32)),
        "shape",
        r"core_state has shape \(3, 2, 4\), expected \[2, N=2, \.\.\.\]",
        {},
    ),
    (
        "core_state_rank",
        lambda f: _replace(f, core_state=np.zeros((2, 2), np.float32)),
        "shape",
        r"core_state has shape \(2, 2\), expected \[2, N=2, core_size\]",
        {},
    ),
    (
        "core_state_dtype",
        lambda f: _replace(f, core_state=np.zeros((2, 2, 3), np.float64)),
        "dtype",
        r"core_state has dtype float64",
        {},
    ),
    (
        "core_state_nan",
        lambda f: _replace(f, core_state=np.full((2, 2, 3), np.nan, np.float32)),
        "non_finite",
        r"core_state has a NaN or inf",
        {},
    ),
    (
        "nan_reward",
        lambda f: _replace(f, rewards=_nan_at(f.rewards, (2, 1), np.nan)),
        "non_finite",
        r"rewards has a NaN or inf at \[t, n\] = \[2, 1\]",
        {},
    ),
    (
        "inf_logp",
        lambda f: _replace(f, behaviour_logp=_nan_at(f.behaviour_logp, (0, 0), -np.inf)),
        "non_finite",
        r"behaviour_logp has a NaN or inf at \[t, n\] = \[0, 0\]",
        {},
    ),
    (
        "positive_logp",
        lambda f: _replace(f, behaviour_logp=_nan_at(f.behaviour_logp, (3, 0), 0.5)),
        "logp_positive",
        r"behaviour_logp is > 0 at \[t, n\] = \[3, 0\]",
        {},
    ),
    (
        "autoreset_missing",
        lambda f: _replace(
            f,
            terminated=_nan_at(np.zeros_like(f.terminated), (1, 0), True),
            truncated=np.zeros_like(f.truncated),
            autoreset=np.zeros_like(f.autoreset),
        ),
        "autoreset",
        r"autoreset must be True exactly on the step after an episode ends; wrong at "
        r"\[t, n\] = \[2, 0\]",
        {},
    ),
    (
        "metadata_type",
        lambda f: _message(f, fragment_id=17),
        "invalid",
        r"fragment_id must be str, got int",
        {},
    ),
]


@pytest.mark.parametrize(
    "build, reason, pattern, kwargs", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_message_is_rejected_and_changes_nothing_but_rejected(
    make_fragment, build, reason, pattern, kwargs
):
    fragment = make_fragment(4, 2, seed=3)
    fragment = dataclasses.replace(  # no episode ends: the autoreset case controls them
        fragment,
        terminated=np.zeros_like(fragment.terminated),
        truncated=np.zeros_like(fragment.truncated),
        autoreset=np.zeros_like(fragment.autoreset),
        episode_returns=fragment.episode_returns[:0],
        episode_lengths=fragment.episode_lengths[:0],
    )
    data = build(fragment)
    with pytest.raises(InvalidFragment, match=pattern) as info:
        codec.decode(data, **kwargs)
    assert info.value.reason == reason

    config = ReplayConfig.fifo_queue(max_message_bytes=kwargs.get("max_bytes", 1 << 20))
    service = ReplayService(config)
    held = [make_fragment(4, 2, fragment_id=f"held{i}", seed=i) for i in range(3)]
    for frag in held:
        assert service.insert_fragment(frag)
    before = service.stats()
    assert service.insert(data, timeout=0) is InsertResult.REJECTED
    after = service.stats()
    assert after.pop("rejected") == {reason: 1}
    assert before.pop("rejected") == {}
    assert after == before
    batch = service.sample(3, learner_version=0, timeout=0)
    assert batch.fragment_ids == ("held0", "held1", "held2")
    service.close()


# ------------------------------------------------------------------ fuzzing


def _decode_or_invalid(data: bytes) -> None:
    try:
        codec.decode(data, max_bytes=1 << 16)
    except InvalidFragment as exc:
        assert exc.reason and str(exc)


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=512))
def test_fuzz_random_bytes_raise_only_invalid_fragment(data):
    _decode_or_invalid(data)


@settings(max_examples=400, deadline=None)
@given(
    seed=st.integers(0, 3),
    edits=st.lists(
        st.tuples(
            st.sampled_from(["flip", "set", "cut", "insert"]),
            st.integers(0, 10**6),
            st.binary(min_size=1, max_size=9),
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_fuzz_mutated_messages_raise_only_invalid_fragment(make_fragment, seed, edits):
    obs_shape, obs_dtype = [((4,), "float32"), ((2, 3, 3), "uint8")][seed % 2]
    data = bytearray(
        codec.encode(make_fragment(3, 2, obs_shape=obs_shape, obs_dtype=obs_dtype, seed=seed))
    )
    for op, position, blob in edits:
        i = position % len(data)
        if op == "flip":
            data[i] ^= blob[0] or 0xFF
        elif op == "set":
            data[i : i + len(blob)] = blob
        elif op == "cut":
            del data[i : i + len(blob)]
        else:
            data[i:i] = blob
        if not data:
            data = bytearray(b"\x00")
    _decode_or_invalid(bytes(data))


@settings(max_examples=200, deadline=None)
@given(
    value=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=12,
    )
)
def test_fuzz_wellformed_msgpack_of_the_wrong_shape(value):
    try:
        data = msgpack.packb(value, use_bin_type=True)
    except (OverflowError, ValueError):
        return  # not representable in msgpack: nothing to decode
    _decode_or_invalid(data)
