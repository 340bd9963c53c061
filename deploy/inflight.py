"""Control calls the driver asks in one poll and takes in a later one, never waiting on them.

A poll that waits for the learner's `drain()` and the replay shards' `stats()` takes as long as
the slowest of them to be scheduled: on a machine whose cores the learner and the shards share
with hundreds of actors, that was most of a poll's time (benchmarks/README.md, fleet.py). An
`InFlight` holds one set of calls asked together; each poll looks at them without waiting
(`take`) and asks again only once they are all back, so a poll costs the driver's own work
whatever the callees are doing, and a slow callee is asked less often rather than blocking the
driver. Its answers are a poll late: the learner's metrics and the shards' counters arrive a
tick after they were asked, which the rates (over the elapsed time, `deploy.points`) absorb.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Generic, TypeVar

import ray

from deploy.fleet import gather

K = TypeVar("K", bound=Hashable)


class InFlight(Generic[K]):
    """At most one set of calls (key -> Ray object ref) in flight, asked together.

    `take()` gives every call's answer (key -> result, or the `RayError` it raised) once all of
    them are back, None before that; a set not all back `timeout_s` after it was asked is given
    up: the calls not back answer `GetTimeoutError` (and whatever they return later is dropped).
    """

    def __init__(self, what: str, timeout_s: float):
        self.what = what
        self.timeout_s = timeout_s
        self._calls: dict[K, Any] = {}
        self._answers: dict[K, Any] = {}
        self._asked_at = 0.0
        #: Seconds from the ask to the poll that took the last set of answers.
        self.latency_s = 0.0

    @property
    def busy(self) -> bool:
        """Whether calls are in flight (`ask` would do nothing)."""
        return bool(self._calls)

    def ask(self, make_calls: Callable[[], Mapping[K, Any]]) -> bool:
        """Make the calls (`make_calls()`: key -> ref) and put them in flight, unless some are
        in flight already: then nothing is called (a call made and dropped would still run, and
        a `drain()` would lose what it answered); whether they were made."""
        if self._calls:
            return False
        calls = make_calls()
        if not calls:
            return False
        self._calls, self._answers = dict(calls), {}
        self._asked_at = time.monotonic()
        return True

    def take(self) -> dict[K, Any] | None:
        """Every answer once all are back (or given up, see the class doc); None before."""
        if not self._calls:
            return None
        pending = {k: ref for k, ref in self._calls.items() if k not in self._answers}
        self._answers.update(gather(pending, 0.0))
        if len(self._answers) < len(self._calls):
            waited = time.monotonic() - self._asked_at
            if waited < self.timeout_s:
                return None
            late = ray.exceptions.GetTimeoutError(
                f"{self.what}: no answer within {self.timeout_s:g} s"
            )
            self._answers.update({k: late for k in self._calls if k not in self._answers})
        answers, self._calls, self._answers = self._answers, {}, {}
        self.latency_s = time.monotonic() - self._asked_at
        return answers

    def wait(self) -> dict[K, Any]:
        """Block until every answer is back or given up (start and stop, not the poll loop)."""
        while (answers := self.take()) is None:
            ray.wait(list(self._calls.values()), num_returns=len(self._calls), timeout=0.05)
        return answers
