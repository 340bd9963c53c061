"""The rollout actor's Ray actor: `RolloutWorker` steps a `RolloutActor` in its own thread and
sends its fragments to the replay service through `RaySink`."""

from __future__ import annotations

import collections
import dataclasses
import os
import threading
import time
from typing import Any

import ray

from actors.config import ActorConfig
from actors.envs import EnvConfig
from deploy.weights import RayWeightSource
from deploy.workers import wait_patiently
from learner.spec import PolicySpec
from replay.service import InsertResult


class RaySink:
    """`actors.ports.FragmentSink` over the replay actor, with bounded inserts in flight.

    An insert the replay holds back (`InsertResult.HELD_BACK`: its rate limiter waits for the
    learner) is sent again until it is accepted or rejected: the actor blocks, which is the
    backpressure, and no timeout ends it. `flush` (the actor is stopping) sends them again as
    `last`, which the rate limiter does not hold, so a stopping actor waits at most one
    `INSERT_WAIT_S`. Every fragment put is in exactly one of `accepted` and `rejected` once
    `flush` returns.
    """

    def __init__(self, replay: Any, max_inflight: int):
        self._replay = replay
        self._max_inflight = max_inflight
        self._pending: collections.deque = collections.deque()  # (ref, data), oldest first
        self.rejected = 0
        self.accepted = 0  # inserts the service acknowledged (the driver's lost-fragment count)
        self.held_back = 0  # HELD_BACK answers, each followed by a resend
        #: Seconds `put` and `flush` blocked waiting for inserts to settle: the time the actor
        #: did not collect because the replay (its rate limiter, or its queue) held it back.
        self.backpressure_s = 0.0
        self.first_put_at: float | None = None  # time.time() of the first fragment sent

    def put(self, data: bytes) -> None:
        self._pending.append((self._replay.insert.remote(data), data))
        if self.first_put_at is None:
            self.first_put_at = time.time()
        while len(self._pending) > self._max_inflight:
            self._settle(*self._pending.popleft())

    def flush(self) -> None:
        while self._pending:
            self._settle(*self._pending.popleft(), last=True)

    def _settle(self, ref: Any, data: bytes, last: bool = False) -> None:
        start = time.monotonic()
        try:
            while (result := wait_patiently(ref, "replay insert")) is InsertResult.HELD_BACK:
                self.held_back += 1
                ref = self._replay.insert.remote(data, last=last)
        finally:
            self.backpressure_s += time.monotonic() - start
        if result is InsertResult.ACCEPTED:
            self.accepted += 1
        else:
            self.rejected += 1


class RolloutWorker:
    """A rollout actor stepping in its own named thread, so stats and stop calls get through."""

    def __init__(
        self,
        actor_id: int,
        env_config: EnvConfig,
        actor_config: ActorConfig,
        spec: dict,
        replay: Any,
        store: Any,
        max_inflight: int,
    ):
        self.actor_id = actor_id
        self._sink = RaySink(replay, max_inflight)
        self._weights = RayWeightSource(store)
        from actors.rollout import RolloutActor  # torch: in the actor process, not the driver

        self._actor = RolloutActor(
            actor_id,
            env_config,
            actor_config,
            PolicySpec.from_dict(spec),
            sink=self._sink,
            weights=self._weights,
            step_limit=0,  # the driver grants env steps out of the run's budget (deploy.budget)
        )
        self._limit, self._limit_lock = 0, threading.Lock()
        self._stop = threading.Event()
        self._error: str | None = None
        self._thread = threading.Thread(
            target=self._loop, name=f"offpg-rollout-{actor_id}", daemon=True
        )

    def start(self) -> int:
        self._thread.start()
        return self.actor_id

    def _loop(self) -> None:
        try:
            self._actor.run(self._stop)
        except BaseException as exc:  # reported through stats(); the driver restarts us
            self._error = f"{type(exc).__name__}: {exc}"
            raise

    def stats(self) -> dict:
        stats = dataclasses.asdict(self._actor.stats())
        stats["rejected"] = self._sink.rejected
        stats["inserted"] = self._sink.accepted
        stats["held_back"] = self._sink.held_back
        stats["backpressure_s"] = self._sink.backpressure_s
        stats["weight_calls"] = self._weights.calls
        stats["weight_transfers"] = self._weights.transfers
        stats["error"] = self._error
        # A threaded actor may answer stats() before start(): a thread not started yet is
        # not a dead one (ident is None until it starts).
        stats["alive"] = self._thread.is_alive() or self._thread.ident is None
        stats["node_id"] = ray.get_runtime_context().get_node_id()
        # Wall-clock moments for the run's timeline (`deploy.timeline`).
        stats["stepping_since"] = self._actor.stepping_since
        stats["first_fragment_at"] = self._sink.first_put_at
        return stats

    def pid(self) -> int:
        """This worker's process id (fault-injection tests SIGKILL it)."""
        return os.getpid()

    def set_step_limit(self, limit: int) -> None:
        """Collect only while this actor's env-step counter is below `limit`. Limits only grow:
        calls to a threaded actor may run out of order, so an older, lower grant never wins."""
        with self._limit_lock:
            self._limit = max(self._limit, limit)
            self._actor.set_step_limit(self._limit)

    def stop(self, timeout: float = 30.0) -> dict:
        """Finish the fragment in progress, send it, and return the final stats."""
        self._stop.set()
        self._thread.join(timeout)
        return self.stats()
