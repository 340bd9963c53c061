"""Replay snapshots: a `ReplayService`'s fragments and counters in one file, written atomically.

The file is a msgpack stream: one header map, then one map per fragment in table order::

    {"format": "offpg-replay-snapshot", "version": 1, "schema_version": <codec schema>,
     "next_seq": ..., "counters": {...}, "rejected": {...}, "lag": {"sum", "max", "hist"},
     "num_items": K}
    {"seq": ..., "times_sampled": ..., "fragment": <codec.encode bytes>}    (K times)

`write` puts it in a temp file in the same directory, fsyncs it, renames it over the target and
fsyncs the directory, so a crash at any point leaves the old snapshot or the new one, never a
torn file. `read` checks the format, version and fragment count.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import msgpack

from replay import codec
from replay.trajectory import Fragment

FORMAT = "offpg-replay-snapshot"
VERSION = 1
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
            f.write(packer.pack(header))
            for seq, times, fragment in records:
                data = codec.encode(fragment, check=False)
                f.write(packer.pack({"seq": seq, "times_sampled": times, "fragment": data}))
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


def read(path: str | os.PathLike) -> tuple[dict[str, Any], list[Record]]:
    """The header and the records of the snapshot at `path`.

    Raises ValueError when the file is not a version-1 snapshot or holds fewer or more
    fragments than its header says; `InvalidFragment` when a record does not decode.
    """
    path = os.fspath(path)
    records = []
    with open(path, "rb") as f:
        unpacker = msgpack.Unpacker(f, raw=False, max_buffer_size=_MAX_BUFFER_BYTES)
        header = next(unpacker, None)
        if not isinstance(header, dict) or (header.get("format"), header.get("version")) != (
            FORMAT,
            VERSION,
        ):
            raise ValueError(f"{path} is not a version-{VERSION} replay snapshot")
        for record in unpacker:
            fragment = codec.decode(record["fragment"], max_bytes=_MAX_FRAGMENT_BYTES)
            records.append(Record(record["seq"], record["times_sampled"], fragment))
    if len(records) != header["num_items"]:
        raise ValueError(f"{path} holds {len(records)} fragments, its header {header['num_items']}")
    return header, records
