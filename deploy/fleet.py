"""The rollout actors of a job: spawn, retire, restart and poll them, and add up what they report.

The fleet adds and removes actor handles in `Topology.actors`. Each live actor has one
`ActorCounters` of what it reported (cumulative over its life); when it is retired or restarted
they move into `Fleet.retired`, so every total (env steps, env errors, fragments acknowledged
and refused) only goes up. The episodes the actors finished go into a window of the last
`RETURN_WINDOW` episodes, which the target return is checked against.

What a poll costs does not grow with waiting on actors one by one: each actor has at most one
stats call in flight, all of them are waited for together (`gather`: one `ray.wait` with a
deadline), the answers that are back are taken, and the others stay in flight for the next
look (`poll` or `take_ready`, which asks nothing). A poll of the driver asks only a bounded
number of actors (`ask(limit=...)`, those asked longest ago first), so the calls it makes per
poll do not grow with the fleet, and every actor is still asked in turn. Actors are stopped
the same way as they are polled: all told at once, all answers waited for together.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import sys
import time
from collections.abc import Hashable, Iterable, Mapping
from typing import Any, TypeVar

import ray

from deploy import topology
from deploy.budget import StepBudget
from deploy.config import JobConfig
from deploy.placement import in_job_group
from deploy.timeline import Timeline
from learner.spec import PolicySpec

#: Episodes the target return is averaged over (CartPole-v1's "solved" definition).
RETURN_WINDOW = 100
#: Seconds to wait for actors to start before saying they are pending, and why.
PENDING_NOTICE_S = 10.0
#: Seconds a pending actor (maybe never scheduled) gets to stop before it is killed.
PENDING_STOP_S = 2.0
#: Seconds a poll waits for the stats of all actors together; later answers are taken later.
POLL_WAIT_S = 0.5
#: Seconds a stopping actor gets to finish its fragment and settle its inserts (held back by the
#: replay's rate limiter while the learner catches up); the driver waits a little longer.
FLUSH_S = 60.0
STOP_WAIT_S = FLUSH_S + 30.0

K = TypeVar("K", bound=Hashable)


def gather(calls: Mapping[K, Any], timeout: float) -> dict[K, Any]:
    """The answers of those `calls` (key -> Ray object ref) that are ready within `timeout`
    seconds, all waited for together in one `ray.wait`: key -> result, or the `RayError` the
    call raised. Calls not ready are left alone (still in flight)."""
    if not calls:
        return {}
    keys = {ref: key for key, ref in calls.items()}
    ready, _ = ray.wait(list(keys), num_returns=len(keys), timeout=timeout)
    try:
        return {keys[ref]: value for ref, value in zip(ready, ray.get(ready), strict=True)}
    except ray.exceptions.RayError:  # some call failed: take them one by one
        answers = {}
        for ref in ready:
            try:
                answers[keys[ref]] = ray.get(ref)
            except ray.exceptions.RayError as exc:
                answers[keys[ref]] = exc
        return answers


def oldest_first(ids: Iterable[K], last_asked: Mapping[K, int], limit: int) -> list[K]:
    """At most `limit` of `ids`: those never asked (absent from `last_asked`) first, then by
    when they were last asked (`last_asked`: a number that grows with every ask), longest ago
    first. Asked `limit` at a time, every id comes round before any comes round again."""
    return sorted(ids, key=lambda i: last_asked.get(i, -1))[: max(limit, 0)]


@dataclasses.dataclass
class ActorCounters:
    """Counts one rollout actor reported, cumulative over its life (`Fleet.retired`: the sum
    over the actors gone)."""

    env_steps: int = 0
    env_errors: int = 0
    inserted: int = 0  # fragments the replay service acknowledged
    invalid: int = 0  # fragments the codec refused at the actor (NaN rewards)
    held_back: int = 0  # inserts the replay held back, each sent again
    backpressure_s: float = 0.0  # seconds the actor waited for its inserts to settle
    fragments: int = 0  # fragments sent
    # Seconds summed over the fragments sent (`actors.config.ActorStats`).
    inference_s: float = 0.0
    env_s: float = 0.0

    @classmethod
    def from_stats(cls, stats: dict[str, Any]) -> ActorCounters:
        return cls(
            env_steps=int(stats["env_steps"]),
            env_errors=int(stats["env_errors"]),
            inserted=int(stats.get("inserted", 0)),
            invalid=int(stats.get("invalid_fragments", 0)),
            held_back=int(stats.get("held_back", 0)),
            fragments=int(stats.get("fragments", 0)),
            inference_s=float(stats.get("inference_s", 0.0)),
            env_s=float(stats.get("env_s", 0.0)),
            backpressure_s=float(stats.get("backpressure_s", 0.0)),
        )

    def __add__(self, other: ActorCounters) -> ActorCounters:
        return ActorCounters(*(getattr(self, f) + getattr(other, f) for f in _COUNTERS))


_COUNTERS = tuple(f.name for f in dataclasses.fields(ActorCounters))


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
        timeline: Timeline | None = None,
    ):
        self._topo = topo
        self._config, self._spec = config, spec
        self._timeline = timeline  # where the actors' first env step and fragment are noted
        self.state: dict[int, ActorState] = {}
        #: Counts of the actors retired or restarted (and the env steps of a resumed run).
        self.retired = ActorCounters(env_steps=restored_env_steps)
        #: Fragments the retired or restarted actors had acknowledged, by replay shard.
        self._retired_acks = collections.Counter()
        self.episodes = Episodes()
        self.restarts = 0
        self._pending_since = time.monotonic()
        #: The stats call in flight of each actor that has one (`poll`).
        self._asked: dict[int, Any] = {}
        #: When each live actor was last asked for its stats, counted in asks (`ask`).
        self._last_asked: dict[int, int] = {}
        self._asks = itertools.count()
        #: The run's env-step budget, handed to the actors in grants.
        fragment = config.actors.num_envs * config.actors.unroll_length
        self.budget = StepBudget(config.run.max_env_steps, fragment)

    # -- what the fleet reports ----------------------------------------------------------------

    def total(self) -> ActorCounters:
        """Counts over every actor of the run, live and retired."""
        return sum((s.counters for s in self.state.values()), self.retired)

    @property
    def env_steps(self) -> int:
        """`total().env_steps`, without adding up the other counters (read several times a
        poll)."""
        return self.retired.env_steps + sum(s.counters.env_steps for s in self.state.values())

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

    def acknowledged_by_shard(self) -> list[int]:
        """Fragments acknowledged by each replay shard (actor i inserts into shard i % N), over
        every actor of the run, live and retired."""
        n = len(self._topo.shards)
        acks = [self._retired_acks[k] for k in range(n)]
        for actor_id, state in self.state.items():
            acks[actor_id % n] += state.counters.inserted
        return acks

    def by_node(self) -> dict[str, int]:
        """How many actors run on each node (the ones that have reported)."""
        return dict(collections.Counter(s.node for s in self.state.values() if s.node is not None))

    # -- changing it ---------------------------------------------------------------------------

    def scale(self, num_actors: int) -> None:
        """Grow or shrink the fleet to `num_actors`; removed actors send their last fragment.

        Pending actors (never scheduled, or not yet answering) are removed first, newest first.
        """
        victims = sorted(self.state, key=lambda i: (self.state[i].pending, i), reverse=True)
        self._retire(victims[: max(len(self.state) - num_actors, 0)])
        next_id = max([*self.state, -1]) + 1
        while len(self.state) < num_actors:
            self._spawn(next_id)
            next_id += 1

    def stop(self) -> None:
        """Retire every actor (each sends its last fragment)."""
        self._retire(sorted(self.state))

    def _spawn(self, actor_id: int) -> None:
        topo = self._topo
        handle = topology.start_actor(
            actor_id, self._config, self._spec, topo.shard_of(actor_id), topo.store
        )
        handle.start.remote()
        topo.actors[actor_id] = handle
        self.state[actor_id] = ActorState()

    def _retire(self, actor_ids: Iterable[int]) -> None:
        """Stop these actors, all at once: each sends its last fragment and settles its inserts
        (`FLUSH_S`), and its final stats are taken; then it is killed."""
        ids = list(actor_ids)
        stops = {i: self._topo.actors[i].stop.remote(FLUSH_S) for i in ids}
        # A pending actor may never have been scheduled: it holds no data, so it does not get
        # the running actors' time to answer.
        answers = gather({i: c for i, c in stops.items() if not self.state[i].pending}, STOP_WAIT_S)
        answers |= gather({i: c for i, c in stops.items() if self.state[i].pending}, PENDING_STOP_S)
        for actor_id in ids:
            # A stats answer still in flight came before the stop's: its episodes count too.
            earlier = gather({0: self._asked.pop(actor_id)}, 0) if actor_id in self._asked else {}
            for stats in (earlier.get(0), answers.get(actor_id)):
                if isinstance(stats, dict):
                    self._absorb(actor_id, stats)
            answer = answers.get(actor_id)
            if not isinstance(answer, dict) and not self.state[actor_id].pending:
                why = (
                    type(answer).__name__
                    if answer is not None
                    else f"no answer in {STOP_WAIT_S:g} s"
                )
                print(
                    f"offpg: rollout actor {actor_id} did not confirm its stop ({why}); its "
                    "counts are those of its last report",
                    file=sys.stderr,
                )
            self._forget(actor_id)
            ray.kill(self._topo.actors.pop(actor_id), no_restart=True)

    def _restart(self, actor_id: int) -> None:
        ray.kill(self._topo.actors.pop(actor_id), no_restart=True)
        self._asked.pop(actor_id, None)
        self._forget(actor_id)
        self.restarts += 1
        self._spawn(actor_id)

    def _forget(self, actor_id: int) -> None:
        """Drop a removed actor; its counts go into `retired`, so totals never go backwards,
        and its unused env-step allowance is free again."""
        counters = self.state.pop(actor_id).counters
        self._last_asked.pop(actor_id, None)
        self.retired += counters
        self._retired_acks[actor_id % len(self._topo.shards)] += counters.inserted
        self.budget.forget(actor_id)

    # -- the env-step budget -------------------------------------------------------------------

    def grant_steps(self, poll_s: float) -> None:
        """Raise the step limits of the actors that need room, out of what is left of the
        budget (`deploy.budget`); a one-way call per grant, a few dozen per actor per run."""
        reports = {i: s.counters.env_steps for i, s in self.state.items() if not s.pending}
        grants = self.budget.grants(reports, self.retired.env_steps, time.monotonic(), poll_s)
        for actor_id, limit in grants.items():
            self._topo.actors[actor_id].set_step_limit.remote(limit)

    def budget_spent(self) -> bool:
        """Every env step of the budget is granted and every running actor has used its own."""
        return self.budget.exhausted(self.retired.env_steps)

    # -- polling -------------------------------------------------------------------------------

    def poll(self, wait_s: float = POLL_WAIT_S) -> None:
        """`ask`, wait at most `wait_s` for all the answers together, and take those that are
        back (as `take_ready`). The rest are taken later."""
        self.ask()
        self._take(wait_s)

    def ask(self, limit: int | None = None) -> None:
        """Ask the actors with no stats call in flight for their stats (no waiting): all of
        them, or at most `limit`, those asked longest ago first (`oldest_first`)."""
        idle = [i for i in self._topo.actors if i not in self._asked]
        if limit is not None:
            idle = oldest_first(idle, self._last_asked, limit)
        for actor_id in idle:
            self._asked[actor_id] = self._topo.actors[actor_id].stats.remote()
            self._last_asked[actor_id] = next(self._asks)

    def take_ready(self) -> None:
        """Take the stats answers that are back, asking nothing and waiting for nothing:
        counters, episodes, and a restart for every actor that died."""
        self._take(0.0)

    def _take(self, wait_s: float) -> None:
        for actor_id, answer in gather(self._asked, wait_s).items():
            del self._asked[actor_id]
            self._collect(actor_id, answer)

    def _collect(self, actor_id: int, stats: Any) -> None:
        if isinstance(stats, ray.exceptions.RayActorError):
            self._restart(actor_id)
            return
        if isinstance(stats, BaseException):
            raise stats
        state = self.state[actor_id]
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
        if self._timeline is not None:
            for moment, key in (
                ("first_env_step", "stepping_since"),
                ("first_fragment", "first_fragment_at"),
            ):
                if stats.get(key) is not None:
                    self._timeline.mark(moment, stats[key])

    def notice_pending(self) -> None:
        """Say, at most every `PENDING_NOTICE_S`, how many actors wait for CPUs and why."""
        pending = self.pending
        # In a placement group (a Tune trial, `deploy.placement`) the actors' CPUs are reserved
        # in its bundles: a pending actor is starting, whatever the cluster has free.
        if not pending or in_job_group(-1) is not None:
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
