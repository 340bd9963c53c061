"""The replay service's Ray actor: `ReplayService` plus what the driver asks of its process.

Imports neither torch nor Gymnasium (see `deploy.workers`).
"""

from __future__ import annotations

import logging
import os
import uuid
from typing import Any

import ray

from deploy.workers import was_restarted
from replay.service import InsertResult, ReplayConfig, ReplayService
from replay.spec import FragmentSpec

log = logging.getLogger(__name__)

#: Threads of the replay actor's Ray concurrency groups (`deploy.topology.start_replay`).
#: Inserts, samples and control calls each have their own, so no kind of call can take all of
#: them: held-back inserts never keep the learner's sample or the driver's stats waiting.
THREADS = {"insert": 16, "sample": 2, "control": 4}
#: Seconds an insert waits for the rate limiter before it answers HELD_BACK (and the actor's
#: sink sends it again): a held-back insert holds an insert thread at most this long.
INSERT_WAIT_S = 1.0


def _bounded(timeout: float | None) -> float:
    return INSERT_WAIT_S if timeout is None else min(timeout, INSERT_WAIT_S)


class ReplayWorker(ReplayService):
    """The replay service, able to say which node it landed on and whether Ray restarted it.

    Ray restarts it when its process dies (`start_replay`: `max_restarts=-1`, and calls in flight
    are retried: inserts are idempotent by fragment id, samples and stats are reads), so the
    learner's and actors' handles stay valid. The restarted service restores the latest snapshot
    (`ReplayConfig.snapshot_path`), counters included; `stats()` then shows a new `incarnation`,
    from which the driver counts the restart and the fragments lost. A snapshot that cannot be
    read is moved aside (`<path>.unreadable`) and reported rather than crash-looping the actor.
    """

    def __init__(self, config: ReplayConfig, spec: FragmentSpec | None = None):
        self.incarnation = uuid.uuid4().hex[:8]
        self.reconstructed = was_restarted()
        self.restore_error: str | None = None
        try:
            super().__init__(config, spec)
        except Exception as exc:  # an unreadable snapshot: start empty, and say so
            path = config.snapshot_path
            self.restore_error = f"{path}: {type(exc).__name__}: {exc}"
            log.error("replay snapshot unreadable, starting empty: %s", self.restore_error)
            if path and os.path.exists(path):
                os.replace(path, path + ".unreadable")
            super().__init__(config, spec)
        self.restored_fragments = super().stats()["size_fragments"]

    # Each method runs in one of the concurrency groups of `THREADS`; only inserts may wait for
    # the rate limiter, and only on their own threads, for at most `INSERT_WAIT_S`.

    @ray.method(concurrency_group="insert")
    def insert(
        self, data: bytes, timeout: float | None = INSERT_WAIT_S, *, last: bool = False
    ) -> InsertResult:
        """As `ReplayService.insert`, waiting at most `INSERT_WAIT_S` (then HELD_BACK)."""
        return super().insert(data, _bounded(timeout), last=last)

    @ray.method(concurrency_group="insert")
    def insert_fragment(
        self, fragment: Any, timeout: float | None = INSERT_WAIT_S, *, last: bool = False
    ) -> Any:
        return super().insert_fragment(fragment, _bounded(timeout), last=last)

    @ray.method(concurrency_group="sample")
    def sample_fragments(
        self, batch_size: int, learner_version: int, timeout: float | None = None
    ) -> Any:
        return super().sample_fragments(batch_size, learner_version, timeout)

    @ray.method(concurrency_group="sample")
    def sample(self, batch_size: int, learner_version: int, timeout: float | None = None) -> Any:
        return super().sample(batch_size, learner_version, timeout)

    @ray.method(concurrency_group="control")
    def admit_all(self) -> None:
        super().admit_all()

    @ray.method(concurrency_group="control")
    def snapshot(self, path: str) -> int:
        return super().snapshot(path)

    @ray.method(concurrency_group="control")
    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    @ray.method(concurrency_group="control")
    def pid(self) -> int:
        """This worker's process id (fault-injection tests SIGKILL it)."""
        return os.getpid()

    @ray.method(concurrency_group="control")
    def stats(self) -> dict:
        return {
            **super().stats(),
            "incarnation": self.incarnation,
            "reconstructed": self.reconstructed,
            "restored_fragments": self.restored_fragments,
            "restore_error": self.restore_error,
        }
