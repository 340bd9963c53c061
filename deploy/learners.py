"""The driver's side of the learner: `SoleLearner` polls one and counts Ray's restarts of it;
`LearnerGroup` polls data-parallel learners (`learner.num_learners` > 1) and re-forms the whole
group when one of them dies. Both are asked for their metrics in one poll of the driver and
answer in a later one (`ask`, `take`: `deploy.inflight`).

A collective cannot go on with a rank missing, and a rank that rejoined a group of survivors
would have to be given their weights and optimiser state mid-run. Re-forming is simpler and as
correct: every rank is restarted by Ray (`ray.kill(..., no_restart=False)`), restores the newest
checkpoint (rank 0 then continues above every published version, as a lone learner does,
`deploy.workers.learner`), and the ranks join a new group at a new address of rank 0's, where
they take rank 0's weights and version (`learner.distributed.align`). What is lost is what a
lone learner's restart loses: the steps since the last checkpoint. The re-forming runs over
several polls, without blocking the driver; `Faults.learner_restarts` counts each.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from typing import Any

import ray

from deploy.inflight import InFlight
from deploy.workers import CALL_TIMEOUT

_ACTOR_GONE = (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError)


class SoleLearner:
    """One learner (`handle`): its `drain()` answers, and Ray's restarts of its process.

    A restarted learner has restored its newest checkpoint (`deploy.workers.learner`); here it
    gets the replay shards (`shards`) again and starts stepping, and `on_restarted(info)` is
    called with its `start()` answer. One that stays unreachable for `timeout_s` raises
    RuntimeError."""

    def __init__(
        self,
        handle: Any,
        shards: list[Any],
        on_restarted: Callable[[dict[str, Any]], None],
        timeout_s: float,
    ):
        self.handle = handle
        self._shards = shards
        self._on_restarted = on_restarted
        self._timeout_s = timeout_s
        self._drain: InFlight[int] = InFlight("the learner's drain()", CALL_TIMEOUT)
        self._down_since: float | None = None

    def ask(self, counters: dict[str, int]) -> None:
        """Ask for the learner's metrics since the last answer, unless asked already."""
        self._drain.ask(lambda: {0: self.handle.drain.remote(counters)})

    def take(self) -> dict[str, Any] | None:
        """The learner's `drain()` answer once it is back; None before, and while Ray restarts
        its process."""
        answers = self._drain.take()
        if answers is None:
            return None
        out = _answer(answers[0])
        if out is None:
            gone, now = answers[0], time.monotonic()
            if self._down_since is None:
                self._down_since = now
                print(f"\noffpg: learner unreachable, Ray restarts it: {gone}", file=sys.stderr)
            elif now - self._down_since > self._timeout_s:
                raise RuntimeError(
                    f"the learner has been unreachable for {self._timeout_s:g} s: {gone}"
                ) from gone
            return None
        if not out["started"]:
            ray.get(self.handle.attach_replay.remote(self._shards), timeout=CALL_TIMEOUT)
            info = ray.get(self.handle.start.remote(), timeout=CALL_TIMEOUT * 5)
            self._on_restarted(info)
            out["version"] = info["version"]
        self._down_since = None
        return out


@dataclasses.dataclass
class _Reform:
    """A re-forming in progress: waiting for new processes (`idents`), then for the ranks to
    join and start (`starts`)."""

    since: float
    old: list[str | None]
    idents: list[Any] = dataclasses.field(default_factory=list)
    starts: list[Any] = dataclasses.field(default_factory=list)


class LearnerGroup:
    """Every rank of a job's data-parallel learners (`handles`, rank 0 first).

    `shards_of(rank)` lists the replay shards a rank samples; `on_reformed(info)` is called with
    rank 0's `start()` answer after each re-forming (the job counts the restart); a group that
    is not back within `timeout_s` raises RuntimeError."""

    def __init__(
        self,
        handles: list[Any],
        shards_of: Callable[[int], list[Any]],
        on_reformed: Callable[[dict[str, Any]], None],
        timeout_s: float,
    ):
        self.handles = list(handles)
        self._shards_of = shards_of
        self._on_reformed = on_reformed
        self._timeout_s = timeout_s
        self._incarnations: list[str | None] = [None] * len(handles)
        self._reform: _Reform | None = None
        self._drains: InFlight[int] = InFlight("the learners' drain()", CALL_TIMEOUT)
        #: Each rank's `{"rank", "device", "node"}` (`offpg status`, the run summary).
        self.ranks: list[dict[str, Any]] = []

    def started(self, infos: list[dict[str, Any]]) -> None:
        """Take every rank's `start()` answer (where it runs, which process it is)."""
        self.ranks = where(infos)
        self._incarnations = [info["incarnation"] for info in infos]

    def ask(self, counters: dict[str, int]) -> None:
        """Ask every rank for its metrics (`drain()`; `counters` go to rank 0), unless asked
        already or the group is being re-formed."""
        if self._reform is None:
            self._drains.ask(
                lambda: {
                    r: h.drain.remote(counters if r == 0 else {})
                    for r, h in enumerate(self.handles)
                }
            )

    def take(self) -> dict[str, Any] | None:
        """Rank 0's `drain()` answer once every rank has answered; None before, and while the
        group is re-formed, which starts here when a rank is unreachable, was restarted by Ray
        or left the group. An error of another kind (divergence) is returned in rank 0's
        answer."""
        if self._reform is not None:
            self._advance()
            return None
        answers = self._drains.take()
        if answers is None:
            return None
        outs = [_answer(answers[r]) for r in range(len(self.handles))]
        lost = [r for r, out in enumerate(outs) if not self._in_group(r, out)]
        if lost:
            # A rank Ray has already restarted (a new process, not started) is not killed again.
            fresh = {
                r
                for r, out in enumerate(outs)
                if out is not None
                and not out["started"]
                and out["incarnation"] != self._incarnations[r]
            }
            self._begin(f"rank(s) {', '.join(map(str, lost))} lost", keep=fresh)
            return None
        first = outs[0]
        errors = [out["error"] for out in outs if out["error"]]
        return {**first, "error": first["error"] or (errors[0] if errors else None)}

    def _in_group(self, rank: int, out: dict[str, Any] | None) -> bool:
        if out is None or not out["started"] or out["group_broken"]:
            return False
        if self._incarnations[rank] is None:
            self._incarnations[rank] = out["incarnation"]
        return out["incarnation"] == self._incarnations[rank]

    def _begin(self, why: str, keep: set[int] = frozenset()) -> None:
        """Restart every rank's process but those in `keep`, new ones that have not started
        (Ray restarts them: `max_restarts=-1`)."""
        print(
            f"\noffpg: learner group: {why}; re-forming all {len(self.handles)} ranks from the "
            "last checkpoint",
            file=sys.stderr,
        )
        since = self._reform.since if self._reform is not None else time.monotonic()
        self._reform = _Reform(since, list(self._incarnations))
        for rank, handle in enumerate(self.handles):
            if rank not in keep:
                ray.kill(handle, no_restart=False)

    def _advance(self) -> None:
        """One look at the re-forming, without waiting: new processes up -> join and start ->
        done."""
        reform = self._reform
        if time.monotonic() - reform.since > self._timeout_s:
            raise RuntimeError(f"the learner group did not re-form within {self._timeout_s:g} s")
        if not reform.starts:
            if not reform.idents:
                reform.idents = [h.identity.remote() for h in self.handles]
            if not _all_done(reform.idents):
                return
            try:
                idents = ray.get(reform.idents)
            except _ACTOR_GONE:  # asked while still dying: ask again
                reform.idents = []
                return
            if any(ident == old for ident, old in zip(idents, reform.old, strict=True)):
                reform.idents = []  # an old process answered before its kill landed
                return
            self._incarnations = idents  # the processes a failed attempt would kill again
            address = self.handles[0].rendezvous_address.remote()
            reform.starts = [
                h.start.remote(address, self._shards_of(r)) for r, h in enumerate(self.handles)
            ]
            return
        if not _all_done(reform.starts):
            return
        try:
            infos = ray.get(reform.starts)
        except (ray.exceptions.RayError, RuntimeError) as exc:  # a rank failed to join
            self._begin(f"re-forming failed ({type(exc).__name__}), again")
            return
        self._reform = None
        self.started(infos)
        self._on_reformed(infos[0])

    def stop_others(self) -> None:
        """End every rank but rank 0 (at the stop: rank 0, alone, writes the final checkpoint;
        a step it was in fails at once on the closed connections)."""
        for handle in self.handles[1:]:
            ray.kill(handle, no_restart=True)


def where(infos: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each rank's `{"rank", "device", "node"}` from the ranks' `start()` answers."""
    return [{key: info[key] for key in ("rank", "device", "node")} for info in infos]


def _answer(answer: Any) -> dict[str, Any] | None:
    """A learner's `drain()` answer; None when its process is gone or did not answer in time;
    any other error is raised."""
    if isinstance(answer, _ACTOR_GONE):
        return None
    if isinstance(answer, BaseException):
        raise answer
    return answer


def _all_done(refs: list[Any]) -> bool:
    done, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
    return len(done) == len(refs)
