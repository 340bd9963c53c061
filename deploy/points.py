"""When the driver writes a TensorBoard point, and the rates and time breakdowns it holds.

Points are due by env steps or by wall time, whichever comes first (`PointClock`): one every
`max_env_steps / POINTS_PER_BUDGET` env steps, and at least one every `POINT_MAX_S` seconds
while the run moves, so a run has ~`POINTS_PER_BUDGET` points when it spends its budget, and
~100 by the time it has spent a twentieth of it or run for `100 * POINT_MAX_S` seconds. The driver
polls often enough to see each point come due (`PointClock.tick_s`), but never spends more than
`1 / POLL_COST_RATIO` of a CPU polling (the poll's cost is the CPU time of the driver's loop,
not the latency of the calls): a large fleet is polled less often.

Rates and per-fragment times are taken over a sliding window of the polls of the last
`RATE_WINDOW_S` seconds (`Window`), divided by the time that actually elapsed between the
window's first and last poll: a poll every 20 ms sees an actor finish zero or one fragment, and
a rate over one such poll says more about the poll than about the actor. The env steps and the
learner's samples per second are taken over a window that also spans the last
`SLOW_RATE_MOVES` moves of their counter (up to `SLOW_RATE_MAX_S`; `SLOW_RATES`): a learner
that steps every few seconds (an Atari CNN on a CPU), or actors whose fragments take a second or
more, would otherwise show 0 in most points and a multiple of the rate in the others; a steady
one now reads between 2/3 of its rate and its rate, and one that stops falls to 0 within
`SLOW_RATE_MAX_S`.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping

import numpy as np

from deploy import metrics as tags
from deploy.fleet import ActorCounters

#: Points over a run that spends its whole env-step budget.
POINTS_PER_BUDGET = 2000
#: Longest wall time between two points while env steps move.
POINT_MAX_S = 1.0
#: Shortest and longest interval between the driver's polls. A poll costs each actor it asks
#: one `stats()` call (its CPU: benchmarks/README.md, monitoring.py), so MIN_TICK_S bounds that
#: too; a run whose points come by the clock (a long budget) is polled once a point, so its
#: polls cost what its points need and no more (benchmarks/README.md, fleet.py: what the polls
#: cost a 256-actor fleet).
MIN_TICK_S, MAX_TICK_S = 0.05, POINT_MAX_S
#: The driver's polls take at most 1/POLL_COST_RATIO of its time.
POLL_COST_RATIO = 10.0
#: Seconds of polls rates and per-fragment times are averaged over.
RATE_WINDOW_S = 1.0
#: Rates that span at least `SLOW_RATE_MOVES` moves of their counter (from the poll that saw
#: the first of them), over at most `SLOW_RATE_MAX_S` seconds of polls: `Sample` field -> tag.
SLOW_RATES = {
    "env_steps": tags.ENV_STEPS_PER_S,
    "learner_samples": tags.LEARNER_SAMPLES_PER_S,
}
SLOW_RATE_MOVES = 3
SLOW_RATE_MAX_S = 30.0
#: Cumulative replay counters written as rates too: `stats()` key -> tag.
REPLAY_RATES = {
    "inserted": tags.REPLAY_INSERTED_PER_S,
    "sampled": tags.REPLAY_SAMPLED_PER_S,
    "evicted": tags.REPLAY_EVICTED_PER_S,
    "dropped_stale": tags.REPLAY_STALE_PER_S,
    "rejected": tags.REPLAY_REJECTED_PER_S,
    "held_back": tags.REPLAY_HELD_BACK_PER_S,
}


class PointClock:
    """Says when a point is due and how long the driver sleeps before its next poll."""

    def __init__(self, max_env_steps: int, env_steps: int, now: float):
        self.steps_per_point = max(1, max_env_steps // POINTS_PER_BUDGET)
        self._last_steps, self._last_at = env_steps, now
        self._poll_s = 0.0
        self._rate = 0.0

    def due(self, env_steps: int, now: float) -> bool:
        """Whether a point is due now; at most one per env-step count (while the actors stall,
        during a replay restart say, the x-axis does not move and a point would repeat)."""
        if env_steps <= self._last_steps:
            return False
        return (
            env_steps - self._last_steps >= self.steps_per_point
            or now - self._last_at >= POINT_MAX_S
        )

    def written(self, env_steps: int, now: float) -> None:
        self._last_steps, self._last_at = env_steps, now

    @property
    def last_steps(self) -> int:
        """The env steps of the last point written."""
        return self._last_steps

    def polled(self, poll_s: float, env_steps_per_s: float) -> None:
        """Note what the last poll cost (CPU seconds of the driver) and how fast the env steps
        go."""
        self._poll_s, self._rate = poll_s, env_steps_per_s

    def tick_s(self) -> float:
        """Seconds until the next poll: about one point's worth of env steps, within
        [MIN_TICK_S, MAX_TICK_S], and at least POLL_COST_RATIO times the last poll's cost."""
        per_point = self.steps_per_point / self._rate if self._rate > 0 else MAX_TICK_S
        return max(min(max(per_point, MIN_TICK_S), MAX_TICK_S), POLL_COST_RATIO * self._poll_s)


@dataclasses.dataclass(frozen=True)
class Sample:
    """The cumulative counters one poll saw."""

    at: float  # monotonic seconds
    env_steps: int
    learner_samples: int
    replay: Mapping[str, float]  # the replay counters of `REPLAY_RATES`
    actors: Mapping[int, ActorCounters]  # the live actors' counters


class Window:
    """The polls of the last `slowest` seconds; rates over the last `seconds` of them (see the
    module doc)."""

    def __init__(self, seconds: float = RATE_WINDOW_S, slowest: float = SLOW_RATE_MAX_S):
        self._seconds, self._slowest = seconds, max(seconds, slowest)
        self._samples: collections.deque[Sample] = collections.deque()

    def add(self, sample: Sample) -> None:
        self._samples.append(sample)
        while len(self._samples) > 2 and sample.at - self._samples[1].at >= self._slowest:
            self._samples.popleft()

    def _start(self, moves_of: str | None = None) -> Sample:
        """The poll a rate starts from: the newest at least `seconds` before the last one; for
        the counter `moves_of` (a `Sample` field), also no later than the poll that saw the
        `SLOW_RATE_MOVES`-th last move of it. The oldest kept when there is none."""
        last, moves = self._samples[-1], 0
        for i in range(len(self._samples) - 2, -1, -1):
            poll, later = self._samples[i], self._samples[i + 1]
            if moves_of is not None and getattr(poll, moves_of) < getattr(later, moves_of):
                moves += 1
                if moves == SLOW_RATE_MOVES and last.at - later.at >= self._seconds:
                    return later
            if last.at - poll.at >= self._seconds and (
                moves_of is None or moves >= SLOW_RATE_MOVES
            ):
                return poll
        return self._samples[0]

    @property
    def seconds(self) -> float:
        """The time between the window's first and last poll (0 with fewer than two)."""
        return self._samples[-1].at - self._start().at if len(self._samples) > 1 else 0.0

    def rates(self) -> dict[str, float]:
        """Env steps, learner samples and replay counters per second over the window."""
        if len(self._samples) < 2:
            return {}
        first, last = self._start(), self._samples[-1]
        seconds = last.at - first.at
        if seconds <= 0:
            return {}
        out = {}
        for field, tag in SLOW_RATES.items():
            start = self._start(field)
            out[tag] = (getattr(last, field) - getattr(start, field)) / (last.at - start.at)
        for key, tag in REPLAY_RATES.items():
            # A restarted replay service restores older counters: no rate across it.
            if last.replay[key] >= first.replay[key]:
                out[tag] = (last.replay[key] - first.replay[key]) / seconds
        return out

    def actors(self) -> tuple[dict[str, float], dict[str, np.ndarray]]:
        """Per-actor throughput and per-fragment times over the window: the mean over actors
        (scalars; throughput also min and max) and the per-actor values (histograms)."""
        if len(self._samples) < 2:
            return {}, {}
        first, last = self._start(), self._samples[-1]
        seconds = last.at - first.at
        return actor_breakdown(first.actors, last.actors, seconds) if seconds > 0 else ({}, {})


#: Per-fragment times of the actors: `ActorCounters` field -> tag.
ACTOR_TIMES = {
    "inference_s": tags.ACTORS_INFERENCE_MS,
    "env_s": tags.ACTORS_ENV_MS,
    "backpressure_s": tags.ACTORS_BACKPRESSURE_MS,
}


def actor_breakdown(
    before: Mapping[int, ActorCounters], after: Mapping[int, ActorCounters], seconds: float
) -> tuple[dict[str, float], dict[str, np.ndarray]]:
    """Each actor alive at both ends (and not restarted in between): its env steps per second,
    and its milliseconds per fragment in inference, envs and backpressure; reduced over the
    actors as means (and min/max of the throughput) and kept per actor for the histograms."""
    per_actor: dict[str, list[float]] = {tags.ACTOR_ENV_STEPS_PER_S: []}
    per_actor.update({tag: [] for tag in ACTOR_TIMES.values()})
    for actor_id, now in after.items():
        then = before.get(actor_id)
        if then is None or now.env_steps < then.env_steps:
            continue
        per_actor[tags.ACTOR_ENV_STEPS_PER_S].append((now.env_steps - then.env_steps) / seconds)
        fragments = now.fragments - then.fragments
        if fragments > 0:
            for field, tag in ACTOR_TIMES.items():
                spent = getattr(now, field) - getattr(then, field)
                per_actor[tag].append(1e3 * spent / fragments)
    scalars: dict[str, float] = {}
    histograms: dict[str, np.ndarray] = {}
    for tag, values in per_actor.items():
        if values:
            scalars[tag] = float(np.mean(values))
            histograms[tag] = np.asarray(values)
    rates = per_actor[tags.ACTOR_ENV_STEPS_PER_S]
    if rates:
        scalars[tags.ACTOR_ENV_STEPS_PER_S_MIN] = min(rates)
        scalars[tags.ACTOR_ENV_STEPS_PER_S_MAX] = max(rates)
    return scalars, histograms
