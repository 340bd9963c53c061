"""The replay service's Ray actor: `ReplayService` plus what the driver asks of its process.

Imports neither torch nor Gymnasium (see `deploy.workers`).
"""

from __future__ import annotations

import logging
import os
import uuid

import ray

from deploy.workers import was_restarted
from replay.service import ReplayConfig, ReplayService

log = logging.getLogger(__name__)


class ReplayWorker(ReplayService):
    """The replay service, able to say which node it landed on and whether Ray restarted it.

    Ray restarts it when its process dies (`start_replay`: `max_restarts=-1`, and calls in flight
    are retried: inserts are idempotent by fragment id, samples and stats are reads), so the
    learner's and actors' handles stay valid. The restarted service restores the latest snapshot
    (`ReplayConfig.snapshot_path`), counters included; `stats()` then shows a new `incarnation`,
    from which the driver counts the restart and the fragments lost. A snapshot that cannot be
    read is moved aside (`<path>.unreadable`) and reported rather than crash-looping the actor.
    """

    def __init__(self, config: ReplayConfig):
        self.incarnation = uuid.uuid4().hex[:8]
        self.reconstructed = was_restarted()
        self.restore_error: str | None = None
        try:
            super().__init__(config)
        except Exception as exc:  # an unreadable snapshot: start empty, and say so
            path = config.snapshot_path
            self.restore_error = f"{path}: {type(exc).__name__}: {exc}"
            log.error("replay snapshot unreadable, starting empty: %s", self.restore_error)
            if path and os.path.exists(path):
                os.replace(path, path + ".unreadable")
            super().__init__(config)
        self.restored_fragments = super().stats()["size_fragments"]

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        """This worker's process id (fault-injection tests SIGKILL it)."""
        return os.getpid()

    def stats(self) -> dict:
        return {
            **super().stats(),
            "incarnation": self.incarnation,
            "reconstructed": self.reconstructed,
            "restored_fragments": self.restored_fragments,
            "restore_error": self.restore_error,
        }
