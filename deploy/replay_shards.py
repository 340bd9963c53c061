"""The driver's view of a job's replay shards: their stats gathered in one wait, each shard's
restarts counted with the fragments it lost, and their snapshots.

Every shard is its own Ray actor (`deploy.topology.start_core`) that Ray restarts when its
process dies; the restarted shard restores its own snapshot file (`replay.shards`). This module
is how `deploy.job` sees them: `take` returns one merged stats dict (`replay.shards.merge_stats`)
for the reports, after counting, per shard, a restart (a new `incarnation`) and what it lost.
The driver's poll asks every shard in one poll and takes the answers in a later one
(`deploy.inflight`); `poll` asks and waits (at the start).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Protocol

import ray

from deploy.inflight import InFlight
from deploy.workers import CALL_TIMEOUT
from replay.shards import merge_stats, snapshot_path


class Faults(Protocol):
    """Where replay restarts are counted (`deploy.job.Faults`)."""

    replay_restarts: int
    lost_fragments: int


class ReplayShards:
    """Polls a job's replay shards and counts their restarts into `faults`."""

    def __init__(self, shards: list[Any], snapshot: Path, faults: Faults):
        self.shards = shards
        self._snapshot = snapshot
        self._faults = faults
        self._incarnations: list[str | None] = [None] * len(shards)
        self._baselines = [0] * len(shards)
        self.stats_calls: InFlight[int] = InFlight("the replay shards' stats()", CALL_TIMEOUT)
        self._acknowledged: list[int] = []

    def snapshot_paths(self) -> list[str]:
        """Each shard's snapshot file, in shard order."""
        return snapshot_paths(self._snapshot, len(self.shards))

    def ask(self, acknowledged: list[int]) -> None:
        """Ask every shard for its stats, unless asked already; `acknowledged[k]` is how many
        fragments the actors of shard k have had acknowledged by now
        (`Fleet.acknowledged_by_shard`), which the answers are checked against."""
        if self.stats_calls.ask(lambda: {k: s.stats.remote() for k, s in enumerate(self.shards)}):
            self._acknowledged = list(acknowledged)

    def take(self) -> dict[str, Any] | None:
        """Every shard's stats, merged (`account`), once all the shards asked have answered;
        None before. Raises what a shard's call raised."""
        answers = self.stats_calls.take()
        return None if answers is None else self._merge(answers)

    def poll(self, acknowledged: list[int]) -> dict[str, Any]:
        """Every shard's stats as of now, merged: asked afresh (once the answers to an earlier
        `ask` are in, which are dropped) and waited for."""
        if self.stats_calls.busy:
            self.stats_calls.wait()
        self.ask(acknowledged)
        return self._merge(self.stats_calls.wait())

    def _merge(self, answers: dict[int, Any]) -> dict[str, Any]:
        for answer in answers.values():
            if isinstance(answer, BaseException):
                raise answer
        return self.account([answers[k] for k in range(len(self.shards))], self._acknowledged)

    def shard_stats(self) -> list[dict[str, Any]] | None:
        """Each shard's own stats (all asked at once), in shard order; None if one is gone."""
        try:
            return ray.get([shard.stats.remote() for shard in self.shards], timeout=CALL_TIMEOUT)
        except ray.exceptions.RayError:
            return None

    def account(self, stats: list[dict[str, Any]], acknowledged: list[int]) -> dict[str, Any]:
        """`poll` on stats already fetched (one dict per shard, in shard order)."""
        for k, shard_stats in enumerate(stats):
            self._check(k, shard_stats, acknowledged[k])
        merged = merge_stats(stats)
        merged["restored_fragments"] = sum(s["restored_fragments"] for s in stats)
        merged["restore_errors"] = [s["restore_error"] for s in stats if s["restore_error"]]
        merged["incarnations"] = [s["incarnation"] for s in stats]
        return merged

    def _check(self, k: int, stats: dict[str, Any], acknowledged: int) -> None:
        """Count a restart of shard `k` (a new `incarnation`) and what it lost.

        Lost fragments are the acknowledged inserts the restarted shard has no record of: its
        `inserted` counter comes back from its snapshot, so everything inserted after the last
        snapshot and before the crash is missing from it (whether or not the learner had
        already sampled it). The offset `acknowledged - inserted` is steady while nothing is lost
        (it moves only by inserts in flight and by acks of killed actors not yet reported), so
        the loss of a restart is how much the offset grew across the poll that saw it; exact
        up to the inserts in flight then (at most the shard's actors x
        `run.actor_max_inflight`).
        """
        offset = acknowledged - int(stats["inserted"])
        before = self._incarnations[k]
        if before is not None and stats["incarnation"] != before:
            lost = max(0, offset - self._baselines[k])
            self._faults.replay_restarts += 1
            self._faults.lost_fragments += lost
            error = f"; {stats['restore_error']}" if stats.get("restore_error") else ""
            which = f" shard {k}" if len(self.shards) > 1 else ""
            print(
                f"\noffpg: replay{which} restarted ({self._faults.replay_restarts}): restored "
                f"{stats['restored_fragments']} fragments from its snapshot, {lost} acknowledged "
                f"fragment(s) lost{error}",
                file=sys.stderr,
            )
        self._incarnations[k] = stats["incarnation"]
        self._baselines[k] = offset

    def admit_all(self) -> None:
        """Tell every shard to let every insert go from now on (`ReplayService.admit_all`).
        Not waited for: an insert held back goes as soon as its shard has the call."""
        for shard in self.shards:
            shard.admit_all.remote()

    def snapshot_all(self) -> int:
        """Every shard writes its snapshot (all at once); the fragments written, in total."""
        calls = [
            s.snapshot.remote(p) for s, p in zip(self.shards, self.snapshot_paths(), strict=True)
        ]
        return sum(ray.get(calls, timeout=CALL_TIMEOUT))


def snapshot_paths(base: Path, num_shards: int) -> list[str]:
    """The snapshot file of each of `num_shards` shards whose snapshots go to `base`."""
    return [snapshot_path(str(base), k, num_shards) for k in range(num_shards)]


def stray_snapshots(base: Path, num_shards: int) -> list[Path]:
    """Snapshot files next to `base` that another number of shards wrote (a resumed run must
    keep its `replay.num_shards`, or those shards' contents would be left behind)."""
    own = {Path(p) for p in snapshot_paths(base, num_shards)}
    names = [base, *base.parent.glob(f"{base.stem}-*{base.suffix}")]
    return sorted(p for p in names if p.exists() and p not in own and _is_shard(p, base))


def _is_shard(path: Path, base: Path) -> bool:
    """Whether `path` is `base` itself or one of its shard files `<stem>-<k><suffix>`."""
    if path == base:
        return True
    index = path.name[len(base.stem) + 1 :]
    return (index.removesuffix(base.suffix) if base.suffix else index).isdigit()
