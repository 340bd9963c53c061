"""Ray at the edge: the one file that turns the plain classes into Ray actors and wires them.

`actors/`, `learner/` and `replay/` know nothing of Ray placement; here each gets its resources:
the learner a GPU when it wants CUDA and the cluster has one, the replay service and weight
store no CPU reservation (they mostly wait on I/O), the replay service the learner's node (hard
node affinity), each rollout actor `run.actor_cpus`, spread across the nodes, and the run's
named controller (`deploy.controller`) no resources, on the driver's node.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import threading
import uuid
import warnings
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.envs import EnvConfig
from actors.rollout import ActorConfig, RolloutActor
from deploy.config import JobConfig
from deploy.controller import NAMESPACE, Controller, controller_name
from deploy.weights import RayWeightSource, publisher
from learner.broadcast import WeightStore
from learner.learner import Learner, LearnerConfig
from learner.policy import PolicySpec
from replay.service import ReplayConfig, ReplayService
from replay.trajectory import Batch

log = logging.getLogger(__name__)

#: Seconds any driver-side Ray call may block before it is reported as stuck.
CALL_TIMEOUT = 60.0


def was_restarted() -> bool:
    """Whether Ray restarted the current actor (its process died and this is a new one)."""
    # Ray 2.60's property reads its own deprecated `actor_id` inside: silence that warning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


class RaySink:
    """`actors.rollout.FragmentSink` over the replay actor, with bounded inserts in flight."""

    def __init__(self, replay: Any, max_inflight: int):
        self._replay = replay
        self._max_inflight = max_inflight
        self._pending: collections.deque = collections.deque()
        self.rejected = 0
        self.accepted = 0  # inserts the service acknowledged (the driver's lost-fragment count)

    def put(self, data: bytes) -> None:
        self._pending.append(self._replay.insert.remote(data))
        while len(self._pending) > self._max_inflight:
            self._settle(self._pending.popleft())

    def flush(self) -> None:
        while self._pending:
            self._settle(self._pending.popleft())

    def _settle(self, ref: Any) -> None:
        if ray.get(ref, timeout=CALL_TIMEOUT):
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
        self._actor = RolloutActor(
            actor_id,
            env_config,
            actor_config,
            PolicySpec.from_dict(spec),
            sink=self._sink,
            weights=RayWeightSource(store),
        )
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
        stats["error"] = self._error
        # A threaded actor may answer stats() before start(): a thread not started yet is
        # not a dead one (ident is None until it starts).
        stats["alive"] = self._thread.is_alive() or self._thread.ident is None
        stats["node_id"] = ray.get_runtime_context().get_node_id()
        return stats

    def pid(self) -> int:
        """This worker's process id (fault-injection tests SIGKILL it)."""
        return os.getpid()

    def stop(self, timeout: float = 30.0) -> dict:
        """Finish the fragment in progress, send it, and return the final stats."""
        self._stop.set()
        self._thread.join(timeout)
        return self.stats()


class LearnerWorker:
    """The learner fed from the replay actor; it publishes weights to the weight store.

    Ray restarts it when its process dies (`start_learner`: `max_restarts=-1`). The restarted
    actor (`was_current_actor_reconstructed`) restores its newest checkpoint, and then takes a
    version above everything already published: the weight store ignores versions it has seen,
    so a learner going back to its checkpoint's version would never reach the actors (and their
    policy lag would go negative). Versions stay monotonic everywhere (weights, fragments,
    checkpoint names, TensorBoard); the jump is `store version + 1 - checkpoint version`.
    The driver sees `started: False` in `drain()`, re-attaches the replay service and calls
    `start()`.
    """

    def __init__(
        self,
        spec: dict,
        config: LearnerConfig,
        checkpoint_dir: str,
        replay: Any,
        store: Any,
        resume: bool,
    ):
        self._replay = replay
        self.learner = Learner(
            PolicySpec.from_dict(spec),
            config,
            checkpoint_dir=checkpoint_dir,
            publish=publisher(store),
        )
        self.reconstructed = was_restarted()
        self.incarnation = uuid.uuid4().hex[:8]
        restore = resume or self.reconstructed
        self.restored = self.learner.restore_latest() if restore else None
        if self.reconstructed:
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
        self._batch_size = config.batch_size
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._metrics: list = []
        self._error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="offpg-learner", daemon=True)
        # Actors start from the learner's weights (restored ones on resume).
        self.learner.publish_weights()

    def node_id(self) -> str:
        """The node this learner runs on (the replay service is placed next to it)."""
        return ray.get_runtime_context().get_node_id()

    def pid(self) -> int:
        """This worker's process id (fault-injection tests SIGKILL it)."""
        return os.getpid()

    def attach_replay(self, replay: Any) -> None:
        """Set the replay actor when it was started after the learner (to share its node)."""
        self._replay = replay

    def _batches(self):
        # Stacked here, in the learner's prefetch thread, not in the replay service: for Atari
        # fragments service-side stacking cost 4.4x the raw transfer, learner-side 1.0x
        # (benchmarks/replay.py), and the service's lock is held for less time.
        while not self._stop.is_set():
            fragments = ray.get(
                self._replay.sample_fragments.remote(
                    self._batch_size, self.learner.version, timeout=0.5
                ),
                timeout=CALL_TIMEOUT,
            )
            if fragments is not None:
                yield Batch.stack(fragments)

    def _loop(self) -> None:
        try:
            self.learner.run(self._batches(), stop=self._stop, on_step=self._on_step)
        except BaseException as exc:
            self._error = f"{type(exc).__name__}: {exc}"
            raise

    def _on_step(self, metrics: Any) -> None:
        with self._lock:
            self._metrics.append(metrics)

    def start(self) -> dict:
        """Start stepping (once; a repeated call only reports)."""
        if self._thread.ident is None:
            self._thread.start()
        return {
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
            "version": self.learner.version,
            "error": self._error,
            "alive": self._thread.is_alive(),
            "started": self._thread.ident is not None,
            "incarnation": self.incarnation,
            "last_checkpoint": self._last_checkpoint(),
        }

    def _last_checkpoint(self) -> str | None:
        paths = self.learner.checkpoints() if self.learner.checkpoint_dir else []
        return paths[-1] if paths else None

    def stop(self, counters: dict[str, int], timeout: float = 60.0) -> dict:
        """Stop stepping, write the final checkpoint, and return the last metrics."""
        self._stop.set()
        if self._thread.ident is not None:  # a restarted learner may not have been started
            self._thread.join(timeout)
        self.learner.counters.update(counters)
        path = self.learner.save_checkpoint()
        final = self.drain(counters)
        final["checkpoint"] = str(path) if path else None
        return final


@dataclasses.dataclass
class Topology:
    """Handles of one job's Ray actors."""

    replay: Any
    store: Any
    learner: Any
    actors: dict[int, Any]
    learner_device: str = "cpu"


def learner_wants_gpu(config: LearnerConfig) -> bool:
    if config.device == "cpu":
        return False
    return ray.cluster_resources().get("GPU", 0) >= 1


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


def start_replay(config: ReplayConfig, node_id: str | None = None) -> Any:
    """The replay service, on `node_id` when given (hard affinity: it lives and dies with that
    node), so the learner's batches and the actors' fragments each cross the network at most
    once."""
    strategy = (
        # Hard affinity: soft affinity lets Ray place it elsewhere when that node is busy. The
        # learner is on that node now, so it is alive.
        NodeAffinitySchedulingStrategy(node_id, soft=False) if node_id is not None else "DEFAULT"
    )
    return (
        ray.remote(ReplayWorker)
        .options(
            num_cpus=0,
            max_concurrency=64,
            scheduling_strategy=strategy,
            max_restarts=-1,
            max_task_retries=-1,
        )
        .remote(config)
    )


def start_controller(run: str, num_actors: int) -> Any:
    """The run's named controller (see `deploy.controller`), owned by this driver.

    Raises ValueError when a run of that name is already running on the cluster.
    It lives on the driver's node: losing any other node must not take `offpg status`, `scale`
    and `stop` with it (the driver's node gone ends the run anyway)."""
    driver_node = ray.get_runtime_context().get_node_id()
    return (
        ray.remote(Controller)
        .options(
            name=controller_name(run),
            namespace=NAMESPACE,
            num_cpus=0,
            max_concurrency=8,
            max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(driver_node, soft=False),
        )
        .remote(run, num_actors)
    )


def start_store() -> Any:
    # Restarted empty if its process dies; the learner's next publish refills it.
    return (
        ray.remote(WeightStore)
        .options(num_cpus=0, max_concurrency=8, max_restarts=-1, max_task_retries=-1)
        .remote()
    )


def start_learner(
    spec: PolicySpec,
    config: LearnerConfig,
    checkpoint_dir: str,
    replay: Any,
    store: Any,
    resume: bool,
) -> Any:
    gpus = 1 if learner_wants_gpu(config) else 0
    return (
        ray.remote(LearnerWorker)
        .options(num_cpus=1, num_gpus=gpus, max_concurrency=4, max_restarts=-1)
        .remote(spec.to_dict(), config, checkpoint_dir, replay, store, resume)
    )


def start_actor(actor_id: int, config: JobConfig, spec: PolicySpec, replay: Any, store: Any) -> Any:
    """Rollout actor `actor_id`: `run.actor_cpus` CPUs, `run.actor_max_inflight` inserts."""
    return (
        ray.remote(RolloutWorker)
        .options(
            num_cpus=config.run.actor_cpus,
            max_concurrency=4,
            max_restarts=0,
            # Across the CPU nodes, so one node's loss takes few actors with it.
            scheduling_strategy="SPREAD",
        )
        .remote(
            actor_id,
            config.env,
            config.actors,
            spec.to_dict(),
            replay,
            store,
            config.run.actor_max_inflight,
        )
    )
