"""The learner's Ray actor: `LearnerWorker` steps a `Learner` on the replay shards' batches in
its own thread and publishes its weights to the weight store."""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any

import ray

from deploy.metrics import DeviceStats
from deploy.weights import publisher
from deploy.workers import CALL_TIMEOUT, was_restarted
from learner.config import LearnerConfig
from learner.spec import PolicySpec
from replay.trajectory import Batch

if TYPE_CHECKING:  # torch: imported by the learner's process, never by the driver's
    from learner.learner import Learner

log = logging.getLogger(__name__)

#: Seconds a sample call waits for a batch in the replay before it answers None (asked again).
SAMPLE_WAIT_S = 0.5
#: Seconds the prefetch thread waits for a sample answer before it looks at the stop flag again:
#: a stopping learner (its final checkpoint) waits at most about this long for that thread.
BATCH_WAIT_S = 0.05
#: Seconds `LearnerWorker.checkpoint` waits for the learner thread's next step.
CHECKPOINT_WAIT_S = 10.0


class LearnerWorker:
    """The learner fed from the replay actor; it publishes weights to the weight store.

    Ray restarts it when its process dies (`start_learner`: `max_restarts=-1`). The restarted
    actor (`was_current_actor_reconstructed`) restores its newest checkpoint, and then takes a
    version above everything already published: the weight store ignores versions it has seen,
    so a learner going back to its checkpoint's version would never reach the actors (and their
    policy lag would go negative). Versions stay monotonic everywhere (weights, fragments,
    checkpoint names, TensorBoard); the jump is `store version + 1 - checkpoint version`.
    The driver sees `started: False` in `drain()`, re-attaches the replay shards and calls
    `start()`.

    With `learner.num_learners` > 1 it is rank `rank` of a data-parallel group
    (`deploy.learners`): `start(address)` joins the group (rank 0's `rendezvous_address`) and
    takes rank 0's weights and version (`learner.distributed`), each rank samples
    `batch_size / world_size` fragments of its own shards, and only rank 0 publishes weights and
    writes checkpoints. A failed collective ends the stepping thread with `group_broken` set in
    `drain()`; the driver then re-forms the whole group.
    """

    def __init__(
        self,
        spec: dict,
        config: LearnerConfig,
        checkpoint_dir: str,
        shards: list[Any] | None,
        store: Any,
        resume: bool,
        rank: int = 0,
        world_size: int = 1,
    ):
        self._shards = shards or []
        self.rank, self.world_size = rank, world_size
        from learner.learner import Learner  # torch: in this process, not the driver

        self.learner = Learner(
            PolicySpec.from_dict(spec),
            config,
            checkpoint_dir=checkpoint_dir,
            publish=publisher(store) if rank == 0 else None,
        )
        self.reconstructed = was_restarted()
        self.incarnation = uuid.uuid4().hex[:8]
        restore = resume or self.reconstructed
        self.restored = self.learner.restore_latest() if restore else None
        if rank > 0:  # reads the checkpoints, never writes them
            self.learner.checkpoint_dir = None
        self.group_broken = False
        if self.reconstructed and rank == 0:
            published = ray.get(store.version.remote(), timeout=CALL_TIMEOUT)
            if published >= self.learner.version:
                log.warning(
                    "learner restarted from checkpoint version %s; continuing as version %d "
                    "(above the published %d)",
                    self.restored,
                    published + 1,
                    published,
                )
                self.learner.version = published + 1
        self._batch_size = config.batch_size // world_size
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._metrics: list = []
        self._first_step_at: float | None = None  # time.time() of this process's first step
        self._checkpoint_wanted: list[_CheckpointRequest] = []
        self._error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="offpg-learner", daemon=True)
        self._device_stats = DeviceStats(self.learner.device)
        # Actors start from the learner's weights (restored ones on resume).
        self.learner.publish_weights()

    def node_id(self) -> str:
        """The node this learner runs on (the replay shards are placed next to it)."""
        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        """This worker's process id (fault-injection tests SIGKILL it)."""
        return os.getpid()

    def identity(self) -> str:
        """This process's incarnation (a new one after every restart)."""
        return self.incarnation

    def rendezvous_address(self) -> str:
        """`tcp://ip:port` on this node for the group's store (rank 0's; a free port)."""
        from learner.distributed import free_address

        return free_address(ray.util.get_node_ip_address())

    def attach_replay(self, shards: list[Any]) -> None:
        """Set the replay shards (again: the driver does after Ray restarted the learner)."""
        self._shards = list(shards)

    def _batches(self):
        """Batches from every shard: one sample call in flight per shard, the first answer
        trained on first (`replay.shards`). No deadline ends the run: a shard held back or
        restarting by Ray is waited for, with a warning every `CALL_TIMEOUT` s."""
        # Stacked here, in the learner's prefetch thread, not in the replay service: for Atari
        # fragments service-side stacking cost 4.4x the raw transfer, learner-side 1.0x
        # (benchmarks/replay.py), and the service's lock is held for less time.
        calls: dict[Any, int] = {}  # sample call in flight -> its shard's index
        last_batch = time.monotonic()
        while not self._stop.is_set():
            for k in set(range(len(self._shards))) - set(calls.values()):
                call = self._shards[k].sample_fragments.remote(
                    self._batch_size, self.learner.version, timeout=SAMPLE_WAIT_S
                )
                calls[call] = k
            ready, _ = ray.wait(list(calls), num_returns=1, timeout=BATCH_WAIT_S)
            for call in ready:
                del calls[call]
                fragments = ray.get(call)
                if fragments is not None:
                    last_batch = time.monotonic()
                    yield Batch.stack(fragments)
            if time.monotonic() - last_batch > CALL_TIMEOUT:
                log.warning("no batch from the replay for %.0f s; still asking", CALL_TIMEOUT)
                last_batch = time.monotonic()

    def _loop(self) -> None:
        from learner.distributed import GroupBroken

        try:
            self.learner.run(self._batches(), stop=self._stop, on_step=self._on_step)
        except GroupBroken as exc:  # a peer died or stopped: the driver re-forms
            self.group_broken = True
            if not self._stop.is_set():
                log.warning("rank %d left the learner group: %s", self.rank, exc)
        except BaseException as exc:
            self._error = f"{type(exc).__name__}: {exc}"
            raise

    def _on_step(self, metrics: Any) -> None:
        with self._lock:
            self._metrics.append(metrics)
            if self._first_step_at is None:
                self._first_step_at = time.time()
            wanted, self._checkpoint_wanted = self._checkpoint_wanted, []
        for request in wanted:
            request.answer(self.learner)

    def checkpoint(self, counters: dict[str, int]) -> dict | None:
        """Write a checkpoint now: `{"path", "version"}`, or None when the learner took no step
        within `CHECKPOINT_WAIT_S` (Tune's PBT asks for one per perturbation, `deploy.trial`).

        While the learner thread steps, the checkpoint is written by that thread between two
        steps (in `_on_step`), so weights and optimiser state are of one version.
        """
        self.learner.counters.update(counters)
        if not self._thread.is_alive():
            return {"path": str(self.learner.save_checkpoint()), "version": self.learner.version}
        request = _CheckpointRequest()
        with self._lock:
            self._checkpoint_wanted.append(request)
        return request.wait(CHECKPOINT_WAIT_S)

    def start(self, address: str | None = None, shards: list[Any] | None = None) -> dict:
        """Start stepping (once; a repeated call only reports), on `shards` when given. With
        more than one rank, first join the group at `address` and take rank 0's weights and
        version (raises `learner.distributed.GroupBroken` when that fails: the driver re-forms
        the group)."""
        if shards is not None:
            self._shards = list(shards)
        if self.world_size > 1 and self.learner.sync is None:
            from learner import distributed  # torch: in this process, not the driver

            distributed.join(
                address,
                self.rank,
                self.world_size,
                self.learner.device,
                self.learner.config.group_timeout_s,
            )
            all_reduce, broadcast = distributed.group_ops()
            self.learner.version = distributed.align(
                self.learner.model, self.learner.version, self.restored, broadcast
            )
            self.learner.sync = distributed.GradientSync(all_reduce)
        if self._thread.ident is None:
            self._thread.start()
        return {
            "rank": self.rank,
            "incarnation": self.incarnation,
            "node": ray.util.get_node_ip_address(),
            "device": str(self.learner.device),
            "version": self.learner.version,
            "restored": self.restored,
            "reconstructed": self.reconstructed,
            "counters": dict(self.learner.counters),
        }

    def drain(self, counters: dict[str, int]) -> dict:
        """Step metrics since the last call; `counters` (env steps) go into checkpoints."""
        self.learner.counters.update(counters)
        with self._lock:
            metrics, self._metrics = self._metrics, []
        return {
            "steps": metrics,
            "device_stats": self._device_stats.read(),
            "version": self.learner.version,
            "error": self._error,
            "group_broken": self.group_broken,
            "alive": self._thread.is_alive(),
            "started": self._thread.ident is not None,
            "incarnation": self.incarnation,
            "last_checkpoint": self._last_checkpoint(),
            "first_step_at": self._first_step_at,  # for the run's timeline (`deploy.timeline`)
        }

    def _last_checkpoint(self) -> str | None:
        paths = self.learner.checkpoints() if self.learner.checkpoint_dir else []
        return paths[-1] if paths else None

    def stop(self, counters: dict[str, int], timeout: float = 60.0) -> dict:
        """Stop stepping, write the final checkpoint, and return the last metrics.

        The checkpoint is written only once the stepping thread has ended: if it is still
        running after `timeout` seconds, the final checkpoint is skipped (and logged), and the
        newest periodic checkpoint stays the one to resume from."""
        self._stop.set()
        self.learner.counters.update(counters)
        path = final_checkpoint(self.learner, self._thread, timeout)
        final = self.drain(counters)
        final["checkpoint"] = str(path) if path else None
        return final


def final_checkpoint(learner: Learner, stepping: threading.Thread, timeout: float) -> str | None:
    """Wait up to `timeout` seconds for the `stepping` thread to end, then write the learner's
    checkpoint and return its path. A thread still running is inside a step, and a checkpoint
    then could tear the weights it writes: none is written (logged), and the newest periodic
    one stays the one to resume from."""
    if stepping.ident is not None:  # a restarted learner may not have been started
        stepping.join(timeout)
    if stepping.is_alive():
        log.error(
            "the learner's thread did not stop within %.0f s: no final checkpoint (the newest "
            "periodic one stands)",
            timeout,
        )
        return None
    return learner.save_checkpoint()


class _CheckpointRequest:
    """A checkpoint asked of the learner thread, answered after its next step."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._answer: dict | None = None

    def answer(self, learner: Learner) -> None:
        try:
            self._answer = {"path": str(learner.save_checkpoint()), "version": learner.version}
        except OSError as exc:  # the asker gets None (no checkpoint); the learner steps on
            log.error("checkpoint asked for could not be written: %s", exc)
        self._done.set()

    def wait(self, timeout: float) -> dict | None:
        return self._answer if self._done.wait(timeout) else None
