"""A TensorBoard event file: `Event` protobufs as TFRecords, each checksummed with CRC-32C.

A record is its length (little-endian uint64), the masked CRC-32C of those 8 bytes, the data,
and the masked CRC-32C of the data. TensorBoard's own writer computes the CRCs in pure Python,
a table lookup per byte; here NumPy computes them from a table of each bit's contribution
(`crc32c`), many times faster (benchmarks/README.md, the start-up section).

Each record is written and flushed at once, in the caller's thread: there is no queue to lose
and no thread to join, and a TensorBoard reading the run live sees every point as it is written.
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import threading
import time

import numpy as np
from tensorboard.compat.proto import event_pb2

#: The file-version string of TensorBoard's event files.
FILE_VERSION = "brain.Event:2"
#: CRC-32C (Castagnoli), bit-reflected.
POLY = 0x82F63B78
MASK_DELTA = 0xA282EAD8  # TFRecord's masking of a stored CRC

_serials = itertools.count()


def _first_contributions(count: int) -> np.ndarray:
    """`c[m]`: the CRC register (started at 0) after a single 1 bit followed by `m` zero bits."""
    out, crc = [], POLY  # the register after the 1 bit alone
    for _ in range(count):
        out.append(crc)
        crc = (crc >> 1) ^ (POLY if crc & 1 else 0)
    return np.array(out, dtype=np.uint32)


def _doubled(c: np.ndarray) -> np.ndarray:
    """`c` extended to twice its length: `c[n + m]` is `c[m]` after `n` more zero bits, and the
    register's bit `i` becomes `c[n - 1 - i]` after `n` zero bits (it shifts down to bit 0 in
    `i` steps, and bit 0 leaves as the polynomial)."""
    n = c.size
    later = np.zeros(n, dtype=np.uint32)
    for i in range(32):
        later ^= c[n - 1 - i] * ((c >> np.uint32(i)) & np.uint32(1))
    return np.concatenate([c, later])


_contributions = _first_contributions(64)


def crc32c(data: bytes) -> int:
    """CRC-32C of `data` (4 bytes or more: a record's header has 8). The table grows, by
    doubling, to the bits of the longest message seen (4 bytes a bit: 1 MiB for 32 kB).

    The CRC is linear in the message's bits: with the register started at 0, it is the XOR,
    over the set bits, of `c[bits after it]`; the standard start of all ones is the same as
    flipping the first 32 bits, and the result is flipped at the end."""
    if len(data) < 4:
        raise ValueError(f"crc32c takes 4 bytes or more, got {len(data)}")
    global _contributions
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")
    bits[:32] ^= 1
    while _contributions.size < bits.size:
        _contributions = _doubled(_contributions)
    # The last bit is followed by 0 bits, the first by size - 1: the table read backwards.
    terms = _contributions[bits.size - 1 :: -1] * bits
    return int(np.bitwise_xor.reduce(terms)) ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + MASK_DELTA) & 0xFFFFFFFF


def record(data: bytes) -> bytes:
    """`data` framed as a TFRecord."""
    header = struct.pack("<Q", len(data))
    return b"".join(
        [
            header,
            struct.pack("<I", masked_crc32c(header)),
            data,
            struct.pack("<I", masked_crc32c(data)),
        ]
    )


class EventFile:
    """A new event file in `logdir` (named as TensorFlow's writers name theirs), opened with its
    file-version event. `add` writes one event and flushes it; safe from several threads."""

    def __init__(self, logdir: str):
        os.makedirs(logdir, exist_ok=True)
        stamp, host, serial = int(time.time()), socket.gethostname(), next(_serials)
        name = f"events.out.tfevents.{stamp:010d}.{host}.{os.getpid()}.{serial}"
        self.path = os.path.join(logdir, name)
        self._lock = threading.Lock()
        self._file = open(self.path, "wb")  # noqa: SIM115 (closed by `close`)
        writer = event_pb2.SourceMetadata(writer="offpg")
        self.add(event_pb2.Event(file_version=FILE_VERSION, source_metadata=writer))

    def add(self, event: event_pb2.Event, step: int | None = None) -> None:
        """Write `event`, stamped with the time and (when given) `step`."""
        event.wall_time = time.time()
        if step is not None:
            event.step = int(step)
        framed = record(event.SerializeToString())
        with self._lock:
            self._file.write(framed)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()
