"""The rollout actors of a job: spawn, retire, restart and poll them, and add up what they report.

The fleet adds and removes actor handles in `Topology.actors`. Each live actor has one
`ActorCounters` of what it reported (cumulative over its life); when it is retired or restarted
they move into `Fleet.retired`, so every total (env steps, env errors, fragments acknowledged
and refused) only goes up. The episodes the actors finished go into a window of the last
`RETURN_WINDOW` episodes, which the target return is checked against.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import sys
import time
from typing import Any

import ray

from deploy import topology
from deploy.config import JobConfig
from learner.policy import PolicySpec

#: Episodes the target return is averaged over (CartPole-v1's "solved" definition).
RETURN_WINDOW = 100
#: Seconds to wait for actors to start before saying they are pending, and why.
PENDING_NOTICE_S = 10.0
#: Seconds a pending actor (maybe never scheduled) gets to stop before it is killed.
PENDING_STOP_S = 2.0
#: Seconds a poll waits for the stats of a running actor; a pending one gets `PENDING_POLL_S`.
RUNNING_POLL_S = 10.0
PENDING_POLL_S = 0.5


@dataclasses.dataclass
class ActorCounters:
    """Counts one rollout actor reported, cumulative over its life (`Fleet.retired`: the sum
    over the actors gone)."""

    env_steps: int = 0
    env_errors: int = 0
    inserted: int = 0  # fragments the replay service acknowledged
    invalid: int = 0  # fragments the codec refused at the actor (NaN rewards)

    @classmethod
    def from_stats(cls, stats: dict[str, Any]) -> ActorCounters:
        return cls(
            env_steps=int(stats["env_steps"]),
            env_errors=int(stats["env_errors"]),
            inserted=int(stats.get("inserted", 0)),
            invalid=int(stats.get("invalid_fragments", 0)),
        )

    def __add__(self, other: ActorCounters) -> ActorCounters:
        return ActorCounters(
            env_steps=self.env_steps + other.env_steps,
            env_errors=self.env_errors + other.env_errors,
            inserted=self.inserted + other.inserted,
            invalid=self.invalid + other.invalid,
        )


@dataclasses.dataclass
class ActorState:
    """One live rollout actor as the driver knows it."""

    #: Not yet answered a stats call: still being scheduled (maybe no room) or constructed.
    pending: bool = True
    counters: ActorCounters = dataclasses.field(default_factory=ActorCounters)
    policy_version: int | None = None  # the weights it acts with, once it reported
    node: str | None = None  # the node it runs on, once it reported


class Episodes:
    """Returns and lengths of the last `RETURN_WINDOW` finished episodes, and their count."""

    def __init__(self) -> None:
        self.returns: collections.deque[float] = collections.deque(maxlen=RETURN_WINDOW)
        self.lengths: collections.deque[float] = collections.deque(maxlen=RETURN_WINDOW)
        self.count = 0

    def add(self, returns: list[float], lengths: list[float]) -> None:
        self.returns.extend(float(r) for r in returns)
        self.lengths.extend(float(n) for n in lengths)
        self.count += len(returns)

    @property
    def mean_return(self) -> float:
        return sum(self.returns) / len(self.returns) if self.returns else float("nan")

    @property
    def mean_length(self) -> float:
        return sum(self.lengths) / len(self.lengths) if self.lengths else float("nan")

    def reached(self, target: float | None) -> bool:
        """Whether a full window averages at least `target` (never, when it is None)."""
        return (
            target is not None and len(self.returns) >= RETURN_WINDOW and self.mean_return >= target
        )


class Fleet:
    """The job's rollout actors: their handles (kept in `Topology.actors`), states and totals."""

    def __init__(
        self,
        topo: topology.Topology,
        config: JobConfig,
        spec: PolicySpec,
        restored_env_steps: int = 0,
    ):
        self._topo = topo
        self._config, self._spec = config, spec
        self.state: dict[int, ActorState] = {}
        #: Counts of the actors retired or restarted (and the env steps of a resumed run).
        self.retired = ActorCounters(env_steps=restored_env_steps)
        self.episodes = Episodes()
        self.restarts = 0
        self._pending_since = time.monotonic()

    # -- what the fleet reports ----------------------------------------------------------------

    def total(self) -> ActorCounters:
        """Counts over every actor of the run, live and retired."""
        return sum((s.counters for s in self.state.values()), self.retired)

    @property
    def env_steps(self) -> int:
        return self.total().env_steps

    @property
    def size(self) -> int:
        """Actors started, pending ones included."""
        return len(self.state)

    @property
    def pending(self) -> list[int]:
        """Ids of the actors that have not answered a stats call yet."""
        return [actor_id for actor_id, s in self.state.items() if s.pending]

    @property
    def policy_versions(self) -> dict[int, int]:
        """The policy version each actor acts with (the ones that have reported)."""
        return {i: s.policy_version for i, s in self.state.items() if s.policy_version is not None}

    def by_node(self) -> dict[str, int]:
        """How many actors run on each node (the ones that have reported)."""
        return dict(collections.Counter(s.node for s in self.state.values() if s.node is not None))

    # -- changing it ---------------------------------------------------------------------------

    def scale(self, num_actors: int) -> None:
        """Grow or shrink the fleet to `num_actors`; removed actors send their last fragment.

        Pending actors (never scheduled, or not yet answering) are removed first, newest first.
        """
        victims = sorted(self.state, key=lambda i: (self.state[i].pending, i), reverse=True)
        for actor_id in victims[: max(len(self.state) - num_actors, 0)]:
            self._retire(actor_id)
        next_id = max([*self.state, -1]) + 1
        while len(self.state) < num_actors:
            self._spawn(next_id)
            next_id += 1

    def stop(self) -> None:
        """Retire every actor (each sends its last fragment)."""
        for actor_id in sorted(self.state):
            self._retire(actor_id)

    def _spawn(self, actor_id: int) -> None:
        topo = self._topo
        handle = topology.start_actor(actor_id, self._config, self._spec, topo.replay, topo.store)
        handle.start.remote()
        topo.actors[actor_id] = handle
        self.state[actor_id] = ActorState()

    def _retire(self, actor_id: int) -> None:
        handle = self._topo.actors.pop(actor_id)
        # A pending actor may never have been scheduled: it holds no data, so it does not get
        # the full timeout to answer (that would stall the driver for every one of them).
        timeout = PENDING_STOP_S if self.state[actor_id].pending else topology.CALL_TIMEOUT
        with contextlib.suppress(ray.exceptions.RayError, TimeoutError):
            self._absorb(actor_id, ray.get(handle.stop.remote(), timeout=timeout))
        self._forget(actor_id)
        ray.kill(handle, no_restart=True)

    def _restart(self, actor_id: int) -> None:
        ray.kill(self._topo.actors.pop(actor_id), no_restart=True)
        self._forget(actor_id)
        self.restarts += 1
        self._spawn(actor_id)

    def _forget(self, actor_id: int) -> None:
        """Drop a removed actor; its counts go into `retired`, so totals never go backwards."""
        self.retired += self.state.pop(actor_id).counters

    # -- polling -------------------------------------------------------------------------------

    def poll(self) -> None:
        """Collect every actor's stats; restart actors that died; note the ones still pending."""
        refs = {actor_id: h.stats.remote() for actor_id, h in self._topo.actors.items()}
        # One short wait for all of them, so many pending actors cost 0.5 s, not 0.5 s each.
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=PENDING_POLL_S)
        for actor_id, ref in refs.items():
            self._collect(actor_id, ref)

    def _collect(self, actor_id: int, ref: Any) -> None:
        state = self.state[actor_id]
        try:
            ready, _ = ray.wait([ref], timeout=PENDING_POLL_S if state.pending else RUNNING_POLL_S)
            if not ready:
                return  # still being scheduled or constructed
            stats = ray.get(ref)
        except ray.exceptions.RayActorError:
            self._restart(actor_id)
            return
        state.pending = False
        state.node = stats.get("node_id", "")
        self._absorb(actor_id, stats)
        if not stats["alive"]:
            print(
                f"\noffpg: actor {actor_id} stopped: {stats['error']}; restarting",
                file=sys.stderr,
            )
            self._restart(actor_id)

    def _absorb(self, actor_id: int, stats: dict[str, Any]) -> None:
        state = self.state[actor_id]
        state.counters = ActorCounters.from_stats(stats)
        state.policy_version = int(stats["policy_version"])
        self.episodes.add(stats["episode_returns"], stats["episode_lengths"])

    def notice_pending(self) -> None:
        """Say, at most every `PENDING_NOTICE_S`, how many actors wait for CPUs and why."""
        pending = self.pending
        if not pending:
            return
        free = ray.available_resources().get("CPU", 0)
        now = time.monotonic()
        # Only actors the cluster has no room for are "pending"; others are just starting.
        cpus = self._config.run.actor_cpus
        if free < cpus and now - self._pending_since > PENDING_NOTICE_S:
            print(
                f"\noffpg: {len(pending)} actor(s) pending: each needs {cpus} "
                f"CPU, the cluster has {free:g} free; they start when resources appear",
                file=sys.stderr,
            )
            self._pending_since = now
