"""Many logical rollout actors in one Ray actor process, for `benchmarks/fleet.py`.

A logical actor is the job's own `deploy.workers.rollout.RolloutWorker` (a `RolloutActor` with
its own `RaySink` to the replay service and its own `RayWeightSource` on the weight store,
stepping in its own named thread), built as a plain object instead of a Ray actor, so that a few
hundred of them fit into a few processes. `LogicalFleet` hosts a group of them and answers, per
actor id, the calls the driver's `deploy.fleet.Fleet` makes on a rollout actor (`stats`);
`LogicalHandle` gives the driver one handle per logical actor.

What a logical actor sends is timed on the way (`Probe`):

- each insert call, from submission to the replay service's reply (a completion callback on its
  `ObjectRef`), and the bytes it carried;
- each weight sync: the calls the actor makes on its weight source before a fragment, their
  time summed, and how many calls reached the weight-store actor.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Any

from actors.config import ActorConfig
from actors.envs import EnvConfig
from deploy.workers.rollout import RolloutWorker

#: Seconds a logical actor gets to finish its fragment and flush its sink when stopped.
STOP_TIMEOUT_S = 120.0


class Probe:
    """What one logical actor's inserts and weight syncs cost. Thread-safe (completion callbacks
    run on Ray's threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.inserts: list[tuple[float, float]] = []  # (wall time done, seconds)
        self.insert_calls = 0
        self.insert_bytes = 0
        self.syncs: list[tuple[float, float, int]] = []  # (wall time, seconds, store calls)
        self._sync_s = 0.0
        self._sync_calls = 0
        self._sync_open = False

    def insert_sent(self, nbytes: int) -> float:
        """An insert call leaves: it closes the weight sync before its fragment."""
        with self._lock:
            self.insert_calls += 1
            self.insert_bytes += nbytes
            if self._sync_open:
                self.syncs.append((time.time(), self._sync_s, self._sync_calls))
                self._sync_s, self._sync_calls, self._sync_open = 0.0, 0, False
        return time.perf_counter()

    def insert_done(self, started: float) -> None:
        with self._lock:
            self.inserts.append((time.time(), time.perf_counter() - started))

    def weights_call(self, seconds: float) -> None:
        with self._lock:
            self._sync_s += seconds
            self._sync_open = True

    def store_call(self) -> None:
        with self._lock:
            self._sync_calls += 1
            self._sync_open = True

    def reset(self) -> None:
        """Forget everything so far (the syncs an actor makes while it is built)."""
        self.drain()
        with self._lock:
            self._sync_s, self._sync_calls, self._sync_open = 0.0, 0, False

    def drain(self) -> dict[str, Any]:
        with self._lock:
            out = {
                "inserts": self.inserts,
                "insert_calls": self.insert_calls,
                "insert_bytes": self.insert_bytes,
                "syncs": self.syncs,
            }
            self.inserts, self.syncs = [], []
            self.insert_calls = self.insert_bytes = 0
            return out


class _TimedInsert:
    def __init__(self, method: Any, probe: Probe):
        self._method, self._probe = method, probe

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        data = args[0] if args else b""
        nbytes = len(data) if isinstance(data, bytes | bytearray | memoryview) else 0
        started = self._probe.insert_sent(nbytes)
        ref = self._method.remote(*args, **kwargs)
        ref.future().add_done_callback(lambda _: self._probe.insert_done(started))
        return ref


class TimedReplay:
    """The replay actor's handle as a logical actor's `RaySink` sees it: inserts are timed,
    everything else passes through."""

    def __init__(self, handle: Any, probe: Probe):
        self._handle = handle
        self.insert = _TimedInsert(handle.insert, probe)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)


class _CountedCall:
    def __init__(self, method: Any, probe: Probe):
        self._method, self._probe = method, probe

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        self._probe.store_call()
        return self._method.remote(*args, **kwargs)


class CountedStore:
    """The weight store's handle as a logical actor's weight source sees it: every actor call on
    it is counted."""

    def __init__(self, handle: Any, probe: Probe):
        self._handle, self._probe = handle, probe

    def __getattr__(self, name: str) -> Any:
        return _CountedCall(getattr(self._handle, name), self._probe)


class TimedWeights:
    """A `WeightSource` timing each call of the one it wraps (the actor's `RayWeightSource`)."""

    def __init__(self, inner: Any, probe: Probe):
        self._inner, self._probe = inner, probe

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self._probe.weights_call(time.perf_counter() - started)

        return timed


class LogicalFleet:
    """Hosts the logical actors `actor_ids`, each inserting into its replay shard (of `shards`);
    Ray runs it as a threaded actor (see fleet.py)."""

    def __init__(
        self,
        actor_ids: list[int],
        env: EnvConfig,
        actors: ActorConfig,
        spec: dict,
        shards: list[Any],
        store: Any,
        max_inflight: int,
    ):
        self._args = (env, actors, spec, shards, store, max_inflight)
        self._probes = {i: Probe() for i in actor_ids}
        self._workers = {i: self._build(i) for i in actor_ids}
        #: Final stats of the incarnations restarted (the driver restarts a dead actor).
        self._retired: list[dict] = []

    def _build(self, actor_id: int) -> RolloutWorker:
        env, actors, spec, shards, store, max_inflight = self._args
        probe = self._probes[actor_id]
        worker = RolloutWorker(
            actor_id,
            env,
            actors,
            spec,
            # Its replay shard, as `deploy.topology.Topology.shard_of` picks it.
            TimedReplay(shards[actor_id % len(shards)], probe),
            CountedStore(store, probe),
            max_inflight,
        )
        # The weight source the worker built is timed in place: RolloutWorker has no seam for
        # it, and the benchmark must run the worker's own code, not a copy of it.
        inner = worker._actor._weights
        worker._actor._weights = TimedWeights(inner, probe)
        # A job's driver grants env steps out of its budget (`deploy.budget`); here the points
        # run for a wall time, so the limit is lifted.
        worker.set_step_limit(2**62)
        return worker

    def start(self) -> int:
        for probe in self._probes.values():
            probe.reset()
        for worker in self._workers.values():
            worker.start()
        return len(self._workers)

    def stats(self, actor_id: int) -> dict:
        return self._workers[actor_id].stats()

    def restart(self, actor_id: int) -> None:
        """Replace a dead logical actor by a new one with the same id (its stats are kept)."""
        old = self._workers[actor_id]
        self._retired.append(old.stop(timeout=1.0))
        self._workers[actor_id] = self._build(actor_id)
        self._workers[actor_id].start()

    def stop_all(self) -> dict[str, Any]:
        """Stop every logical actor at once (each finishes its fragment and flushes its sink);
        their final stats, and those of the incarnations restarted before."""
        with concurrent.futures.ThreadPoolExecutor(len(self._workers)) as pool:
            final = list(pool.map(lambda w: w.stop(STOP_TIMEOUT_S), self._workers.values()))
        return {"final": final, "retired": self._retired}

    def measurements(self) -> dict[int, dict[str, Any]]:
        """Each logical actor's insert and weight-sync timings since the last call."""
        return {i: probe.drain() for i, probe in self._probes.items()}


class _Bound:
    def __init__(self, method: Any, actor_id: int):
        self._method, self._actor_id = method, actor_id

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        return self._method.remote(self._actor_id, *args, **kwargs)


class LogicalHandle:
    """One logical actor's handle for `deploy.fleet.Fleet`: its `stats.remote()` is one actor
    call on the host, as a real rollout actor's would be one call on that actor."""

    def __init__(self, host: Any, actor_id: int):
        self.host = host
        self.actor_id = actor_id
        self.stats = _Bound(host.stats, actor_id)
