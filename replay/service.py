"""`ReplayService`: where stale trajectory fragments wait for the learner.

A plain, thread-safe Python class. `deploy/` turns it into a Ray actor at the edge with
`ray.remote(max_concurrency=N)(ReplayService)`; every method then runs on one of N threads of
the actor, which is why all state sits behind one `threading.Condition` and every blocking call
waits on it with a timeout (and wakes up on `close()`).

The policy is explicit in a frozen `ReplayConfig`:

  sampler         "fifo": each fragment delivered once, oldest first (IMPALA's queue);
                  "uniform": uniform without replacement within a batch, replayed until evicted
                  or `max_times_sampled`; "mixed": each batch takes `replay_fraction` of its
                  fragments uniformly from those already sampled and the rest fresh (never
                  sampled), oldest first: the IMPALA paper's experience-replay setting.
  capacity        in fragments and in bytes; the oldest fragment is evicted first.
  rate limiter    Reverb's samples-per-insert ratio: with `samples_per_insert` = r and
                  `tolerance` = e, `r * inserted - sampled` stays within
                  `r * min_size_to_sample +- e`; the side that runs ahead blocks.
  staleness       `sample(batch_size, learner_version)` drops (and counts) every fragment it
                  meets whose `policy_version` is more than `max_staleness` behind.

Where a batch is stacked. `sample` stacks in the service and returns a `Batch`;
`sample_fragments` returns the fragments and the caller stacks them (`Batch.stack`).
`benchmarks/replay.py` measured both through Ray: for CartPole-sized fragments the stacked
`Batch` crosses Ray a little faster (one pickle of 8 arrays instead of B x 9), but for
Atari-sized ones stacking costs the service ~4 ms of copying per batch of 8 (vs ~30 us for
`sample_fragments`) and roughly halves the end-to-end sample rate. The service is the shared
resource, so the Ray path should stack on the learner side, in its prefetch thread:
`Batch.stack(ray.get(replay.sample_fragments.remote(b, v, timeout)))`. `sample` stays for
in-process use and small observations.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import random
import threading
import time
from collections import Counter
from typing import Literal

import msgpack

from replay import codec
from replay.trajectory import Batch, Fragment, InvalidFragment, validate

log = logging.getLogger(__name__)

SNAPSHOT_FORMAT = "offpg-replay-snapshot"
SNAPSHOT_VERSION = 1
#: Counters kept in `stats()` and in snapshots (the rate limiter runs on inserted and sampled).
COUNTERS = (
    "inserted",
    "sampled",
    "sample_calls",
    "evicted",
    "retired",
    "dropped_stale",
    "insert_waits",
    "insert_timeouts",
    "sample_waits",
    "sample_timeouts",
)
#: Upper edges of the lag histogram buckets; the last bucket is open.
LAG_BUCKETS = (0, 1, 2, 4, 8, 16, 32)


def _doc(default: object, doc: str) -> dataclasses.Field:
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
    """The replay policy. Each field's `doc` metadata is its CLI help."""

    sampler: Literal["fifo", "uniform", "mixed"] = _doc(
        "fifo",
        "fifo: each fragment once, oldest first (IMPALA queue); uniform: uniform replay; "
        "mixed: replay_fraction of each batch replayed uniformly, the rest fresh",
    )
    replay_fraction: float = _doc(
        0.0, "mixed only: fraction of each batch drawn from already-sampled fragments"
    )
    capacity_fragments: int = _doc(10_000, "most fragments held; the oldest is evicted first")
    capacity_bytes: int = _doc(
        2 * 1024**3, "most array bytes held (Fragment.nbytes); the oldest is evicted first"
    )
    max_times_sampled: int = _doc(
        0, "a fragment is retired after this many samples; 0 = unlimited (fifo: always 1)"
    )
    samples_per_insert: float | None = _doc(
        None, "target ratio of sampled to inserted fragments; None: no ratio limit"
    )
    tolerance: float = _doc(
        0.0, "how many fragments sampling may run ahead of or behind the ratio before blocking"
    )
    min_size_to_sample: int = _doc(1, "sampling waits until this many fragments are held")
    max_staleness: int | None = _doc(
        None, "fragments more than this many versions behind the learner are dropped"
    )
    max_message_bytes: int = _doc(codec.DEFAULT_MAX_BYTES, "insert refuses longer messages")
    snapshot_path: str | None = _doc(
        None, "restore from this file at start if it exists; periodic snapshots go here"
    )
    snapshot_every: float = _doc(0.0, "seconds between periodic snapshots; 0 = none")
    seed: int | None = _doc(None, "seed of the uniform sampler")

    def __post_init__(self) -> None:
        if self.sampler not in ("fifo", "uniform", "mixed"):
            raise ValueError(f"sampler is {self.sampler!r}: must be fifo, uniform or mixed")
        if self.sampler == "mixed" and not 0.0 < self.replay_fraction < 1.0:
            raise ValueError(
                f"replay_fraction is {self.replay_fraction}: the mixed sampler needs a fraction "
                "strictly between 0 and 1 (use fifo for 0, uniform for 1)"
            )
        if self.sampler != "mixed" and self.replay_fraction != 0.0:
            raise ValueError(
                f"replay_fraction is {self.replay_fraction}: only the mixed sampler uses it"
            )
        if self.capacity_fragments < 1:
            raise ValueError(f"capacity_fragments is {self.capacity_fragments}: must be >= 1")
        if self.capacity_bytes < 1:
            raise ValueError(f"capacity_bytes is {self.capacity_bytes}: must be >= 1")
        if self.max_times_sampled < 0:
            raise ValueError(f"max_times_sampled is {self.max_times_sampled}: must be >= 0")
        if self.sampler == "fifo" and self.max_times_sampled not in (0, 1):
            raise ValueError(
                f"max_times_sampled is {self.max_times_sampled}: the fifo sampler delivers each "
                "fragment exactly once, so it must be 1 (or 0, which means the same for fifo)"
            )
        if self.min_size_to_sample < 1:
            raise ValueError(f"min_size_to_sample is {self.min_size_to_sample}: must be >= 1")
        if self.min_size_to_sample > self.capacity_fragments:
            raise ValueError(
                f"min_size_to_sample is {self.min_size_to_sample}, above capacity_fragments "
                f"{self.capacity_fragments}: sampling would wait forever"
            )
        if self.samples_per_insert is not None:
            spi = self.samples_per_insert
            if spi <= 0:
                raise ValueError(f"samples_per_insert is {spi}: must be > 0 (or None)")
            if self.tolerance < (spi + 1) / 2:
                raise ValueError(
                    f"tolerance is {self.tolerance}: with samples_per_insert {spi} it must be "
                    f">= (samples_per_insert + 1) / 2 = {(spi + 1) / 2}, or an insert (which "
                    "adds samples_per_insert of credit) and a sample (which spends 1) could "
                    "both be blocked at once: a deadlock"
                )
            if self.retire_after and spi > self.retire_after:
                raise ValueError(
                    f"samples_per_insert is {spi} but each fragment is sampled at most "
                    f"{self.retire_after} times (max_times_sampled, or fifo): fragments would be "
                    "retired before the ratio lets inserts go on, and both sides would block"
                )
        elif self.tolerance != 0.0:
            raise ValueError(f"tolerance is {self.tolerance}: it needs samples_per_insert")
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"max_staleness is {self.max_staleness}: must be >= 0 (or None)")
        if self.max_message_bytes < 1:
            raise ValueError(f"max_message_bytes is {self.max_message_bytes}: must be >= 1")
        if self.snapshot_every < 0:
            raise ValueError(f"snapshot_every is {self.snapshot_every}: must be >= 0")
        if self.snapshot_every > 0 and not self.snapshot_path:
            raise ValueError("snapshot_every is set but snapshot_path is not: nowhere to write")

    @property
    def retire_after(self) -> int:
        """Samples after which a fragment is retired: 1 for fifo, else `max_times_sampled`."""
        return 1 if self.sampler == "fifo" else self.max_times_sampled

    @classmethod
    def fifo_queue(cls, capacity_fragments: int = 1_000, **overrides: object) -> ReplayConfig:
        """IMPALA's queue: each fragment once, oldest first; a full queue evicts its oldest."""
        return cls(
            sampler="fifo", capacity_fragments=capacity_fragments, max_times_sampled=1, **overrides
        )

    @classmethod
    def uniform_replay(
        cls,
        capacity_fragments: int = 10_000,
        *,
        samples_per_insert: float | None = None,
        min_size_to_sample: int = 1,
        **overrides: object,
    ) -> ReplayConfig:
        """Uniform replay; with `samples_per_insert`, a tolerance of 2 batches of 32 fragments."""
        if samples_per_insert is not None:
            overrides.setdefault("tolerance", max(64.0, (samples_per_insert + 1) / 2))
        return cls(
            sampler="uniform",
            capacity_fragments=capacity_fragments,
            samples_per_insert=samples_per_insert,
            min_size_to_sample=min_size_to_sample,
            **overrides,
        )

    @classmethod
    def mixed_replay(
        cls, replay_fraction: float = 0.5, capacity_fragments: int = 10_000, **overrides: object
    ) -> ReplayConfig:
        """IMPALA's experience replay: each batch `replay_fraction` replayed, the rest fresh."""
        return cls(
            sampler="mixed",
            replay_fraction=replay_fraction,
            capacity_fragments=capacity_fragments,
            **overrides,
        )


@dataclasses.dataclass(eq=False)
class _Item:
    seq: int
    fragment: Fragment
    nbytes: int
    times_sampled: int = 0


class _IndexedSet:
    """Items with O(1) add, remove and uniform choice (swap-with-last removal)."""

    def __init__(self) -> None:
        self._items: list[_Item] = []
        self._pos: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item: _Item) -> None:
        self._pos[item.seq] = len(self._items)
        self._items.append(item)

    def discard(self, item: _Item) -> None:
        pos = self._pos.pop(item.seq, None)
        if pos is None:
            return
        last = self._items.pop()
        if last is not item:
            self._items[pos] = last
            self._pos[last.seq] = pos

    def choose(self, rng: random.Random, k: int) -> list[_Item]:
        return [self._items[i] for i in rng.sample(range(len(self._items)), k)]


class ReplayService:
    """Stores fragments and serves batches under a `ReplayConfig`. Thread-safe."""

    def __init__(self, config: ReplayConfig | None = None) -> None:
        self.config = config or ReplayConfig()
        self._cond = threading.Condition(threading.Lock())
        self._snapshot_lock = threading.Lock()
        self._rng = random.Random(self.config.seed)
        self._items: dict[int, _Item] = {}  # every item, oldest first (insertion order)
        self._fresh: dict[int, _Item] = {}  # never sampled, oldest first
        self._all = _IndexedSet()  # for uniform choice
        self._replayed = _IndexedSet()  # sampled at least once, for the mixed sampler
        self._ids: set[str] = set()
        self._next_seq = 0
        self._size_bytes = 0
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._rejected: Counter[str] = Counter()
        self._times_sampled: Counter[int] = Counter()  # of the fragments held now
        self._lag: Counter[str] = Counter()
        self._lag_sum = 0
        self._lag_max: int | None = None
        self._wait_seconds = {"insert": 0.0, "sample": 0.0}
        self._starved = 0  # samplers waiting for fragments (not for the ratio)
        self._closed = False
        path = self.config.snapshot_path
        if path and os.path.exists(path):
            self._restore(path)
        self._stop = threading.Event()
        self._snapshotter: threading.Thread | None = None
        if self.config.snapshot_every > 0:
            self._snapshotter = threading.Thread(
                target=self._snapshot_loop, name="replay-snapshotter", daemon=True
            )
            self._snapshotter.start()

    # ------------------------------------------------------------------ insert

    def insert(self, data: bytes, timeout: float | None = None) -> bool:
        """Decode, validate and store one encoded fragment.

        Blocks while the rate limiter holds inserts back, at most `timeout` seconds (None: until
        allowed or closed). Returns False, leaving contents unchanged, when the message is
        rejected (counted in `stats()["rejected"]` by reason) or the wait timed out.
        """
        try:
            fragment = codec.decode(data, max_bytes=self.config.max_message_bytes)
        except InvalidFragment as exc:
            self._reject(exc)
            return False
        return self._insert_valid(fragment, timeout)

    def insert_fragment(self, fragment: Fragment, timeout: float | None = None) -> bool:
        """Validate and store an already-decoded fragment (the in-process path); as `insert`."""
        try:
            validate(fragment)
        except InvalidFragment as exc:
            self._reject(exc)
            return False
        return self._insert_valid(fragment, timeout)

    def _reject(self, exc: InvalidFragment) -> None:
        log.debug("rejected fragment: %s", exc)
        with self._cond:
            self._rejected[exc.reason] += 1

    def _insert_valid(self, fragment: Fragment, timeout: float | None) -> bool:
        nbytes = fragment.nbytes
        with self._cond:
            if nbytes > self.config.capacity_bytes:
                self._rejected["too_large"] += 1
                return False
            if fragment.fragment_id in self._ids:
                self._rejected["duplicate_id"] += 1
                return False
            if not self._wait(self._can_insert, timeout, "insert"):
                return False
            if fragment.fragment_id in self._ids:  # inserted by another thread while we waited
                self._rejected["duplicate_id"] += 1
                return False
            self._add(_Item(self._next_seq, fragment, nbytes))
            self._next_seq += 1
            self._counters["inserted"] += 1
            self._evict_over_capacity()
            self._cond.notify_all()
            return True

    def _can_insert(self) -> bool:
        spi = self.config.samples_per_insert
        if spi is None or self._starved or len(self._items) < self.config.min_size_to_sample:
            # Never hold an insert back while a sampler waits for fragments, or before the
            # table can be sampled at all: either would deadlock (Reverb does the latter too).
            return True
        credit = spi * (self._counters["inserted"] + 1) - self._counters["sampled"]
        return credit <= spi * self.config.min_size_to_sample + self.config.tolerance

    def _add(self, item: _Item) -> None:
        self._items[item.seq] = item
        self._all.add(item)
        if item.times_sampled == 0:
            self._fresh[item.seq] = item
        else:
            self._replayed.add(item)
        self._ids.add(item.fragment.fragment_id)
        self._size_bytes += item.nbytes
        self._count_times(item, +1)

    def _remove(self, item: _Item, counter: str) -> None:
        del self._items[item.seq]
        self._all.discard(item)
        self._fresh.pop(item.seq, None)
        self._replayed.discard(item)
        self._ids.discard(item.fragment.fragment_id)
        self._size_bytes -= item.nbytes
        self._count_times(item, -1)
        self._counters[counter] += 1

    def _evict_over_capacity(self) -> None:
        cfg = self.config
        while len(self._items) > cfg.capacity_fragments or self._size_bytes > cfg.capacity_bytes:
            self._remove(next(iter(self._items.values())), "evicted")

    # ------------------------------------------------------------------ sample

    def sample(
        self, batch_size: int, learner_version: int, timeout: float | None = None
    ) -> Batch | None:
        """A `Batch` of `batch_size` fragments stacked along the env axis; None on timeout.

        Fragments more than `max_staleness` versions behind `learner_version` are dropped and
        counted as they are met. Waits for enough fragments and for the rate limiter, at most
        `timeout` seconds (None: until served or closed).

        Raises:
          ValueError: `batch_size` could never be served under this config (it would block
            forever), or the fragments met do not share T and layout.
        """
        fragments = self.sample_fragments(batch_size, learner_version, timeout)
        return None if fragments is None else Batch.stack(fragments)

    def sample_fragments(
        self, batch_size: int, learner_version: int, timeout: float | None = None
    ) -> list[Fragment] | None:
        """As `sample`, but the fragments unstacked, for callers that stack themselves."""
        self._check_batch_size(batch_size)
        picked: list[_Item] = []

        def ready() -> bool:
            picked[:] = self._try_pick(batch_size, learner_version)
            return bool(picked)

        with self._cond:
            if not self._wait(ready, timeout, "sample", starves=True):
                return None
            for item in picked:
                self._mark_sampled(item, learner_version)
            self._counters["sample_calls"] += 1
            self._cond.notify_all()
            return [item.fragment for item in picked]

    def _check_batch_size(self, batch_size: int) -> None:
        cfg = self.config
        if batch_size < 1:
            raise ValueError(f"batch_size is {batch_size}: must be >= 1")
        if batch_size > cfg.capacity_fragments:
            raise ValueError(
                f"batch_size {batch_size} is above capacity_fragments {cfg.capacity_fragments}: "
                "such a batch could never be served"
            )
        if cfg.samples_per_insert is not None:
            window = 2 * cfg.tolerance - cfg.samples_per_insert
            if batch_size > window:
                raise ValueError(
                    f"batch_size {batch_size} is above 2 * tolerance - samples_per_insert = "
                    f"{window}: the rate limiter could block this sample and every insert at "
                    "once (a deadlock); raise tolerance"
                )

    def _try_pick(self, batch_size: int, learner_version: int) -> list[_Item]:
        """The items of a batch if one can be served now, else []. Drops stale items it meets.

        Picking does not change anything but the stale drops; `_mark_sampled` commits.
        """
        cfg = self.config
        while True:
            self._drop_stale_oldest(learner_version)
            if len(self._items) < cfg.min_size_to_sample:
                return []
            if cfg.samples_per_insert is not None:
                credit = cfg.samples_per_insert * self._counters["inserted"]
                credit -= self._counters["sampled"]
                floor = cfg.samples_per_insert * cfg.min_size_to_sample - cfg.tolerance
                if credit - batch_size < floor:
                    return []
            if cfg.sampler == "uniform":
                if len(self._all) < batch_size:
                    return []
                items = self._all.choose(self._rng, batch_size)
            else:
                n_replay = min(len(self._replayed), round(batch_size * cfg.replay_fraction))
                if len(self._fresh) < batch_size - n_replay:
                    return []
                items = list(itertools.islice(self._fresh.values(), batch_size - n_replay))
                items += self._replayed.choose(self._rng, n_replay)
            stale = [item for item in items if self._is_stale(item, learner_version)]
            if not stale:
                return items
            for item in stale:  # each pass removes at least one item: the loop ends
                self._remove(item, "dropped_stale")

    def _is_stale(self, item: _Item, learner_version: int) -> bool:
        limit = self.config.max_staleness
        return limit is not None and learner_version - item.fragment.policy_version > limit

    def _drop_stale_oldest(self, learner_version: int) -> None:
        """Drop stale items from the old end of the table and of the fresh queue.

        Versions grow with insertion order (up to actor skew), so this catches nearly every
        stale item at O(1) per item; `_try_pick` checks each candidate for the rest.
        """
        if self.config.max_staleness is None:
            return
        for pool in (self._items, self._fresh):
            while pool:
                oldest = next(iter(pool.values()))
                if not self._is_stale(oldest, learner_version):
                    break
                self._remove(oldest, "dropped_stale")

    def _mark_sampled(self, item: _Item, learner_version: int) -> None:
        self._counters["sampled"] += 1
        lag = learner_version - item.fragment.policy_version
        self._lag[_lag_bucket(lag)] += 1
        self._lag_sum += lag
        self._lag_max = lag if self._lag_max is None else max(self._lag_max, lag)
        self._count_times(item, -1)
        item.times_sampled += 1
        self._count_times(item, +1)
        if self.config.retire_after and item.times_sampled >= self.config.retire_after:
            self._remove(item, "retired")
        elif self._fresh.pop(item.seq, None) is not None:
            self._replayed.add(item)

    def _count_times(self, item: _Item, delta: int) -> None:
        self._times_sampled[item.times_sampled] += delta
        if not self._times_sampled[item.times_sampled]:
            del self._times_sampled[item.times_sampled]

    # ------------------------------------------------------------------ waiting

    def _wait(self, predicate, timeout: float | None, side: str, *, starves: bool = False) -> bool:
        """Wait under `self._cond` until `predicate()`; False on timeout or close. Never spins."""
        if self._closed:
            return False
        if predicate():
            return True
        self._counters[f"{side}_waits"] += 1
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        if starves:
            self._starved += 1
            self._cond.notify_all()  # a blocked insert may now go ahead
        try:
            while True:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    self._counters[f"{side}_timeouts"] += 1
                    return False
                # Bounded even with timeout=None so that a lost wake-up cannot hang a thread.
                self._cond.wait(1.0 if remaining is None else min(remaining, 1.0))
                if self._closed:
                    return False
                if predicate():
                    return True
        finally:
            if starves:
                self._starved -= 1
            self._wait_seconds[side] += time.monotonic() - start

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict:
        """Counters and sizes as a plain JSON-able dict (see `COUNTERS` for the counter keys)."""
        with self._cond:
            sampled = self._counters["sampled"]
            return {
                "size_fragments": len(self._items),
                "size_bytes": self._size_bytes,
                "fresh_fragments": len(self._fresh),
                **self._counters,
                "rejected": dict(self._rejected),
                "times_sampled": {str(k): v for k, v in sorted(self._times_sampled.items())},
                "lag": {
                    "mean": self._lag_sum / sampled if sampled else None,
                    "max": self._lag_max,
                    "histogram": dict(self._lag),
                },
                "insert_wait_seconds": self._wait_seconds["insert"],
                "sample_wait_seconds": self._wait_seconds["sample"],
            }

    # ------------------------------------------------------------------ snapshots

    def snapshot(self, path: str | os.PathLike) -> int:
        """Write contents (in order, with times sampled) and counters to `path` atomically.

        The stream is msgpack: a header map, then one map per fragment. It goes to a temp file
        in the same directory, is fsynced, renamed over `path`, and the directory fsynced, so a
        crash at any point leaves either the old snapshot or the new one. Returns the number of
        fragments written.
        """
        path = os.fspath(path)
        with self._cond:
            # Fragments are immutable: copy references under the lock, encode outside it.
            items = [(i.seq, i.times_sampled, i.fragment) for i in self._items.values()]
            header = {
                "format": SNAPSHOT_FORMAT,
                "version": SNAPSHOT_VERSION,
                "schema_version": codec.SCHEMA_VERSION,
                "next_seq": self._next_seq,
                "counters": dict(self._counters),
                "rejected": dict(self._rejected),
                "lag": {"sum": self._lag_sum, "max": self._lag_max, "hist": dict(self._lag)},
                "num_items": len(items),
            }
        directory = os.path.dirname(os.path.abspath(path))
        with self._snapshot_lock:
            tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
            try:
                with open(tmp, "wb") as f:
                    packer = msgpack.Packer(use_bin_type=True)
                    f.write(packer.pack(header))
                    for seq, times, fragment in items:
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
        return len(items)

    def _restore(self, path: str) -> None:
        with open(path, "rb") as f:
            unpacker = msgpack.Unpacker(f, raw=False, max_buffer_size=1 << 31)
            header = next(unpacker, None)
            if not isinstance(header, dict) or (header.get("format"), header.get("version")) != (
                SNAPSHOT_FORMAT,
                SNAPSHOT_VERSION,
            ):
                raise ValueError(f"{path} is not a version-1 replay snapshot")
            count = 0
            for record in unpacker:
                fragment = codec.decode(record["fragment"], max_bytes=1 << 62)
                self._add(_Item(record["seq"], fragment, fragment.nbytes, record["times_sampled"]))
                count += 1
        if count != header["num_items"]:
            raise ValueError(f"{path} holds {count} fragments, its header {header['num_items']}")
        self._next_seq = header["next_seq"]
        self._counters.update(header["counters"])
        self._rejected.update(header["rejected"])
        self._lag_sum = header["lag"]["sum"]
        self._lag_max = header["lag"]["max"]
        self._lag.update(header["lag"]["hist"])
        self._evict_over_capacity()
        log.info("restored %d fragments from %s", count, path)

    def _snapshot_loop(self) -> None:
        while not self._stop.wait(self.config.snapshot_every):
            try:
                self.snapshot(self.config.snapshot_path)
            except OSError:
                log.exception("periodic snapshot to %s failed", self.config.snapshot_path)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Wake every waiter (they return False/None), stop and join the snapshot thread."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._stop.set()
        if self._snapshotter is not None:
            self._snapshotter.join(timeout=60)


def _lag_bucket(lag: int) -> str:
    if lag < 0:
        return "<0"
    low = 0
    for high in LAG_BUCKETS:
        if lag <= high:
            return str(high) if low == high else f"{low}-{high}"
        low = high + 1
    return f">{LAG_BUCKETS[-1]}"
