"""`ReplayService`: where stale trajectory fragments wait for the learner.

A plain, thread-safe Python class. `deploy/` turns it into a threaded Ray actor at the edge
(`deploy.topology.ReplayWorker`: inserts, samples and control calls each on their own threads);
every method may run on any thread, which is why all state sits behind one
`threading.Condition` and every blocking call waits on it with a timeout (and wakes up on
`close()`). An insert the rate limiter holds back for its whole wait returns
`InsertResult.HELD_BACK`, and the caller sends it again: that is the actors' backpressure.

The policy is explicit in a frozen `ReplayConfig` (`replay.config`; also importable from here):

  sampler         "fifo": each fragment delivered once, oldest first (IMPALA's queue);
                  "uniform": uniform without replacement within a batch, replayed until evicted
                  or `max_times_sampled`; "mixed": each batch takes `replay_fraction` of its
                  fragments uniformly from those already sampled and the rest fresh (never
                  sampled), oldest first: the IMPALA paper's experience-replay setting.
  capacity        in fragments and in bytes; the oldest fragment is evicted first.
  rate limiter    Reverb's samples-per-insert ratio (`replay.limiter.RateLimiter`): with
                  `samples_per_insert` = r and `tolerance` = e, `r * inserted - sampled` stays
                  within `r * min_size_to_sample +- e`; the side that runs ahead blocks.
  staleness       `sample(batch_size, learner_version)` drops (and counts) every fragment it
                  meets whose `policy_version` is more than `max_staleness` behind. Every
                  fragment accepted is stamped with the newest learner version a sample call
                  has shown (`Fragment.insert_version`), so the learner can tell how old the
                  actor's weights were (acting lag) from how long the data waited here.
  snapshots       `snapshot(path)` writes contents and counters atomically (`replay.snapshot`);
                  a service whose `snapshot_path` exists starts from it.
  shards          `num_shards` is how a job splits its replay into services (`replay.shards`);
                  one service holds what its own config says and ignores it.

Where a batch is stacked: `sample` stacks in the service and returns a `Batch`;
`sample_fragments` returns the fragments and the caller stacks them (`Batch.stack`). Through Ray
the learner calls `sample_fragments` and stacks in its prefetch thread: stacking copies every
array once, which for image observations costs more than moving the fragments, and the service
is the one process every actor and the learner share (benchmarks/README.md has the measured
costs). `sample` is for in-process use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import os
import random
import threading
import time
from collections import Counter

from replay import codec
from replay import snapshot as snapshot_file
from replay.config import ReplayConfig
from replay.spec import FragmentSpec
from replay.table import Item, Table
from replay.trajectory import Batch, Fragment, InvalidFragment, validate

log = logging.getLogger(__name__)

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


class InsertResult(enum.Enum):
    """What became of one insert. True (in `if service.insert(...)`) only when ACCEPTED."""

    #: Stored (and counted in `inserted`).
    ACCEPTED = "accepted"
    #: Refused for good: bad bytes, too large, a duplicate id, or the service is closed
    #: (counted in `stats()["rejected"]` by reason). Sending it again cannot help.
    REJECTED = "rejected"
    #: The rate limiter held it back for the whole wait (counted in `insert_timeouts`); the
    #: contents are unchanged and the same bytes may be sent again (backpressure).
    HELD_BACK = "held_back"

    def __bool__(self) -> bool:
        return self is InsertResult.ACCEPTED


class ReplayService:
    """Stores fragments and serves batches under a `ReplayConfig`. Thread-safe."""

    def __init__(
        self, config: ReplayConfig | None = None, spec: FragmentSpec | None = None
    ) -> None:
        self.config = config or ReplayConfig()
        #: The run's fragment layout: fragments that do not fit it are refused (`spec_*`
        #: reasons) at insert and dropped at restore; None admits any schema-valid fragment.
        self.spec = spec
        self._cond = threading.Condition(threading.Lock())
        self._snapshot_lock = threading.Lock()  # one writer at a time (one temp file)
        #: Periodic snapshots that failed; the snapshot thread logs each and carries on.
        self.snapshot_failures = 0
        self._limiter = self.config.rate_limiter()
        self._rng = random.Random(self.config.seed)
        self._table = Table()
        self._next_seq = 0
        self._counters = dict.fromkeys(COUNTERS, 0)
        self._rejected: Counter[str] = Counter()
        self._lag: Counter[str] = Counter()
        self._lag_sum = 0
        self._lag_max: int | None = None
        self._wait_seconds = {"insert": 0.0, "sample": 0.0}
        #: The newest learner version a sample call has shown (the insert-version stamp).
        self._learner_version = 0
        self._closed = False
        self._admit_all = False  # `admit_all`: inserts no longer wait for the rate limiter
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

    def insert(
        self, data: bytes, timeout: float | None = None, *, last: bool = False
    ) -> InsertResult:
        """Decode, validate and store one encoded fragment.

        Blocks while the rate limiter holds inserts back, at most `timeout` seconds (None: until
        allowed or closed). Returns ACCEPTED, REJECTED (the message is refused for good,
        counted in `stats()["rejected"]` by reason) or HELD_BACK (the wait ran out; try again);
        contents are unchanged unless ACCEPTED. `last`: one of a stopping actor's last
        fragments, which goes at once whatever the rate limiter says (it still counts it), so
        that removing actors from a running job never waits for the learner.
        """
        try:
            fragment = codec.decode(data, max_bytes=self.config.max_message_bytes)
            if self.spec is not None:
                self.spec.check(fragment)
        except InvalidFragment as exc:
            self._reject(exc)
            return InsertResult.REJECTED
        return self._insert_valid(fragment, timeout, last)

    def insert_fragment(
        self, fragment: Fragment, timeout: float | None = None, *, last: bool = False
    ) -> InsertResult:
        """Validate and store an already-decoded fragment (the in-process path); as `insert`."""
        try:
            validate(fragment)
            if self.spec is not None:
                self.spec.check(fragment)
        except InvalidFragment as exc:
            self._reject(exc)
            return InsertResult.REJECTED
        return self._insert_valid(fragment, timeout, last)

    def can_insert(self) -> bool:
        """Whether an insert would go now without waiting for the rate limiter (a caller
        stepping actors and learner in one thread asks before it inserts)."""
        with self._cond:
            return not self._closed and self._insert_may_go()

    def _reject(self, exc: InvalidFragment) -> None:
        log.debug("rejected fragment: %s", exc)
        with self._cond:
            self._rejected[exc.reason] += 1

    def _insert_valid(self, fragment: Fragment, timeout: float | None, last: bool) -> InsertResult:
        nbytes = fragment.nbytes
        with self._cond:
            if nbytes > self.config.capacity_bytes:
                return self._refuse("too_large")
            if fragment.fragment_id in self._table:
                return self._refuse("duplicate_id")
            may_go = (lambda: True) if last else self._insert_may_go
            if not self._wait(may_go, timeout, "insert"):
                return self._refuse("closed") if self._closed else InsertResult.HELD_BACK
            if fragment.fragment_id in self._table:  # inserted by another thread while we waited
                return self._refuse("duplicate_id")
            # Stamped when accepted (after any hold by the rate limiter): the learner may be a
            # step or two past the version it last sampled with, and the stamp never precedes
            # the fragment's own version.
            stamp = max(self._learner_version, fragment.policy_version)
            fragment = dataclasses.replace(fragment, insert_version=stamp)
            self._table.add(Item(self._next_seq, fragment, nbytes))
            self._next_seq += 1
            self._counters["inserted"] += 1
            self._limiter.on_insert()
            self._evict_over_capacity()
            self._cond.notify_all()
            return InsertResult.ACCEPTED

    def _refuse(self, reason: str) -> InsertResult:
        """Count a refusal by `reason` (the caller holds `self._cond`)."""
        self._rejected[reason] += 1
        return InsertResult.REJECTED

    def _insert_may_go(self) -> bool:
        return self._admit_all or self._limiter.can_insert(len(self._table))

    def admit_all(self) -> None:
        """From now on every insert goes at once, whatever the rate limiter says (inserts held
        back now go too): for a run that is stopping, so that its actors' last fragments are
        stored without waiting for a learner that will take no more samples. The limiter still
        counts them (a resumed run's learner samples them off before inserts go again)."""
        with self._cond:
            self._admit_all = True
            self._cond.notify_all()

    def _remove(self, item: Item, counter: str) -> None:
        self._table.remove(item)
        self._counters[counter] += 1

    def _evict_over_capacity(self) -> None:
        cfg, table = self.config, self._table
        while len(table) > cfg.capacity_fragments or table.nbytes > cfg.capacity_bytes:
            self._remove(table.oldest(), "evicted")

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
        picked: list[Item] = []

        def ready() -> bool:
            picked[:] = self._try_pick(batch_size, learner_version)
            return bool(picked)

        with self._cond:
            self._learner_version = max(self._learner_version, learner_version)
            if not self._wait(ready, timeout, "sample"):
                return None
            for item in picked:
                self._mark_sampled(item, learner_version)
            self._limiter.on_sample(len(picked))
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
        self._limiter.check_batch_size(batch_size)

    def _try_pick(self, batch_size: int, learner_version: int) -> list[Item]:
        """The items of a batch if one can be served now, else []. Drops stale items it meets.

        Picking does not change anything but the stale drops; `_mark_sampled` commits.
        """
        cfg = self.config
        while True:
            self._drop_stale_oldest(learner_version)
            if not self._limiter.can_sample(batch_size, len(self._table)):
                return []
            items = self._table.pick(cfg.sampler, batch_size, cfg.replay_fraction, self._rng)
            stale = [item for item in items if self._is_stale(item, learner_version)]
            if not stale:
                return items
            for item in stale:  # each pass removes at least one item: the loop ends
                self._remove(item, "dropped_stale")

    def _is_stale(self, item: Item, learner_version: int) -> bool:
        limit = self.config.max_staleness
        return limit is not None and learner_version - item.fragment.policy_version > limit

    def _drop_stale_oldest(self, learner_version: int) -> None:
        """Drop stale items from the old end of the table and of the fresh queue.

        Versions grow with insertion order (up to actor skew), so this catches nearly every
        stale item at O(1) per item; `_try_pick` checks each candidate for the rest.
        """
        if self.config.max_staleness is None:
            return
        for fresh in (False, True):
            while (oldest := self._table.oldest(fresh=fresh)) is not None:
                if not self._is_stale(oldest, learner_version):
                    break
                self._remove(oldest, "dropped_stale")

    def _mark_sampled(self, item: Item, learner_version: int) -> None:
        self._counters["sampled"] += 1
        lag = learner_version - item.fragment.policy_version
        self._lag[_lag_bucket(lag)] += 1
        self._lag_sum += lag
        self._lag_max = lag if self._lag_max is None else max(self._lag_max, lag)
        self._table.mark_sampled(item)
        if self.config.retire_after and item.times_sampled >= self.config.retire_after:
            self._remove(item, "retired")

    # ------------------------------------------------------------------ waiting

    def _wait(self, predicate, timeout: float | None, side: str) -> bool:
        """Wait under `self._cond` until `predicate()`; False on timeout or close. Never spins.

        While a sampler waits, the rate limiter lets every insert go (see `replay.limiter`).
        """
        if self._closed:
            return False
        if predicate():
            return True
        self._counters[f"{side}_waits"] += 1
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        waiting = self._limiter.sampler_waiting() if side == "sample" else contextlib.nullcontext()
        try:
            with waiting:
                self._cond.notify_all()  # a held-back insert may go ahead now that we wait
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
            self._wait_seconds[side] += time.monotonic() - start

    # ------------------------------------------------------------------ stats

    def stats(self) -> dict:
        """Counters and sizes as a plain JSON-able dict (see `COUNTERS` for the counter keys)."""
        with self._cond:
            sampled = self._counters["sampled"]
            return {
                "size_fragments": len(self._table),
                "size_bytes": self._table.nbytes,
                "fresh_fragments": self._table.fresh,
                **self._counters,
                "rejected": dict(self._rejected),
                "times_sampled": {str(k): v for k, v in sorted(self._table.times_sampled.items())},
                "lag": {
                    "mean": self._lag_sum / sampled if sampled else None,
                    "max": self._lag_max,
                    "histogram": dict(self._lag),
                },
                "insert_wait_seconds": self._wait_seconds["insert"],
                "sample_wait_seconds": self._wait_seconds["sample"],
                "snapshot_failures": self.snapshot_failures,
            }

    # ------------------------------------------------------------------ snapshots

    def snapshot(self, path: str | os.PathLike) -> int:
        """Write contents (in order, with times sampled) and counters to `path` atomically
        (`replay.snapshot`); returns the number of fragments written."""
        with self._cond:
            # Fragments are immutable: copy references under the lock, encode outside it.
            records = [
                snapshot_file.Record(i.seq, i.times_sampled, i.fragment)
                for i in self._table.items()
            ]
            state = {
                "next_seq": self._next_seq,
                "counters": dict(self._counters),
                "rejected": dict(self._rejected),
                "lag": {"sum": self._lag_sum, "max": self._lag_max, "hist": dict(self._lag)},
            }
        with self._snapshot_lock:
            snapshot_file.write(path, state, records)
        return len(records)

    def _restore(self, path: str) -> None:
        state, records = snapshot_file.read(path)
        for seq, times_sampled, fragment in records:
            if self.spec is not None:
                try:
                    self.spec.check(fragment)
                except InvalidFragment as exc:  # another run's data: never reaches the learner
                    log.warning("snapshot %s: dropped fragment %s: %s", path, seq, exc)
                    self._rejected[f"restore_{exc.reason}"] += 1
                    continue
            self._table.add(Item(seq, fragment, fragment.nbytes, times_sampled))
        self._next_seq = state["next_seq"]
        self._counters.update(state["counters"])
        self._limiter.restore(self._counters["inserted"], self._counters["sampled"])
        self._rejected.update(state["rejected"])
        self._lag_sum = state["lag"]["sum"]
        self._lag_max = state["lag"]["max"]
        self._lag.update(state["lag"]["hist"])
        self._evict_over_capacity()
        log.info("restored %d fragments from %s", len(records), path)

    def _snapshot_loop(self) -> None:
        while not self._stop.wait(self.config.snapshot_every):
            try:
                self.snapshot(self.config.snapshot_path)
            except Exception:  # a failed snapshot must not end the ones after it
                self.snapshot_failures += 1
                log.exception(
                    "periodic snapshot to %s failed (%d so far); trying again in %s s",
                    self.config.snapshot_path,
                    self.snapshot_failures,
                    self.config.snapshot_every,
                )

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
