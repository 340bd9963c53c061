"""Replay snapshots: a `ReplayService`'s fragments and counters in one file, written atomically.

The file is a msgpack stream: one header map, one map per fragment in table order, and a
checksum of every byte before it::

    {"format": "offpg-replay-snapshot", "version": 2, "schema_version": <codec schema>,
     "next_seq": ..., "counters": {...}, "rejected": {...}, "lag": {"sum", "max", "hist"},
     "num_items": K}
    {"seq": ..., "times_sampled": ..., "fragment": <codec.encode bytes>}    (K times)
    {"crc32": <uint 32>}                                   (always these 13 bytes: `_TRAILER`)

`write` puts it in a temp file in the same directory, fsyncs it, renames it over the target and
fsyncs the directory, so a crash at any point leaves the old snapshot or the new one, never a
torn file. `read` checks the CRC-32 before it parses anything (it catches every error of up to
32 consecutive bits: a flipped byte, a truncated file), then the format, version and fragment
count. Version 1 had no checksum; this build refuses it, saying so.
"""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, BinaryIO, NamedTuple

import msgpack

from replay import codec
from replay.trajectory import Fragment, version_mismatch

FORMAT = "offpg-replay-snapshot"
VERSION = 2
#: The last object of a snapshot, {"crc32": <uint 32>}, up to the checksum's own bytes.
_TRAILER = b"\x81\xa5crc32\xce"
_TRAILER_BYTES = len(_TRAILER) + 4
_NO_CHECKSUM = "has no checksum at its end (truncated, or not a snapshot)"
#: Decoding limits for a snapshot's own records (they were checked when first inserted).
_MAX_FRAGMENT_BYTES = 1 << 62
_MAX_BUFFER_BYTES = 1 << 31


class Record(NamedTuple):
    """One stored fragment, with its place in the table and how often it was sampled."""

    seq: int
    times_sampled: int
    fragment: Fragment


def write(path: str | os.PathLike, state: Mapping[str, Any], records: Sequence[Record]) -> None:
    """Write `state` (the header's service fields: next_seq, counters, rejected, lag) and
    `records` to `path` atomically. Not safe for two concurrent writers of one path: the
    caller serialises them (the temp file is named after the process)."""
    path = os.fspath(path)
    header = {
        "format": FORMAT,
        "version": VERSION,
        "schema_version": codec.SCHEMA_VERSION,
        **state,
        "num_items": len(records),
    }
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            packer = msgpack.Packer(use_bin_type=True)
            crc = 0
            for chunk in _packed(packer, header, records):
                f.write(chunk)
                crc = zlib.crc32(chunk, crc)
            f.write(_TRAILER + struct.pack(">I", crc))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _packed(packer: msgpack.Packer, header: dict, records: Sequence[Record]) -> Iterator[bytes]:
    yield packer.pack(header)
    for seq, times, fragment in records:
        data = codec.encode(fragment, check=False)
        yield packer.pack({"seq": seq, "times_sampled": times, "fragment": data})


def read(path: str | os.PathLike) -> tuple[dict[str, Any], list[Record]]:
    """The header and the records of the snapshot at `path`.

    Raises ValueError when the file fails its checksum (corrupt, truncated), is not a
    version-2 snapshot, holds fragments of another schema version, or holds fewer or more
    fragments than its header says; `InvalidFragment` when a record does not decode.
    """
    path = os.fspath(path)
    records = []
    with open(path, "rb") as f:
        problem = _checksum_problem(f)
        f.seek(0)
        if problem == _NO_CHECKSUM and _is_version_1(f):
            problem = "is a version-1 replay snapshot, which has no checksum"
        if problem:
            raise ValueError(f"{path} {problem}: this build reads version-{VERSION} snapshots")
        unpacker = msgpack.Unpacker(f, raw=False, max_buffer_size=_MAX_BUFFER_BYTES)
        header = unpacker.unpack()
        if not isinstance(header, dict) or (header.get("format"), header.get("version")) != (
            FORMAT,
            VERSION,
        ):
            raise ValueError(f"{path} is not a version-{VERSION} replay snapshot")
        if header.get("schema_version") != codec.SCHEMA_VERSION:
            raise ValueError(f"{path}: {version_mismatch(header.get('schema_version'))}")
        for record in unpacker:
            if record.keys() == {"crc32"}:  # the trailer, checked above
                break
            fragment = codec.decode(record["fragment"], max_bytes=_MAX_FRAGMENT_BYTES)
            records.append(Record(record["seq"], record["times_sampled"], fragment))
    if len(records) != header["num_items"]:
        raise ValueError(f"{path} holds {len(records)} fragments, its header {header['num_items']}")
    return header, records


def _checksum_problem(f: BinaryIO) -> str | None:
    """What is wrong with the checksum of the open snapshot `f`, or None when it matches."""
    size = os.fstat(f.fileno()).st_size
    crc, left = 0, size - _TRAILER_BYTES
    while left > 0 and (chunk := f.read(min(left, 1 << 20))):
        crc = zlib.crc32(chunk, crc)
        left -= len(chunk)
    trailer = f.read()
    if size < _TRAILER_BYTES or not trailer.startswith(_TRAILER):
        return _NO_CHECKSUM
    if struct.unpack(">I", trailer[len(_TRAILER) :])[0] != crc:
        return "fails its CRC-32 checksum (the file is corrupt)"
    return None


def _is_version_1(f: BinaryIO) -> bool:
    """Whether `f` starts with the header of a version-1 snapshot. Read with small limits: the
    file may be anything."""
    f.seek(0)
    try:
        header = msgpack.Unpacker(f, raw=False, max_buffer_size=1 << 20).unpack()
    except Exception:  # not msgpack, or cut short: no snapshot header
        return False
    return isinstance(header, dict) and (header.get("format"), header.get("version")) == (FORMAT, 1)
