"""Ray at the edge: the one file that turns the plain classes into Ray actors and wires them.

`actors/`, `learner/` and `replay/` know nothing of Ray placement; here each gets its resources:
the learner a GPU when it wants CUDA and the cluster has one, the replay service and weight
store no CPU reservation (they mostly wait on I/O) and, where possible, the learner's node,
and each rollout actor `actors.num_cpus`.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from typing import Any

import numpy as np
import ray

from actors.envs import EnvConfig
from actors.rollout import ActorConfig, RolloutActor
from learner.broadcast import WeightStore, fetch_weights, publisher
from learner.learner import Learner, LearnerConfig
from learner.policy import PolicySpec
from replay.service import ReplayConfig, ReplayService

#: Seconds any driver-side Ray call may block before it is reported as stuck.
CALL_TIMEOUT = 60.0


class RaySink:
    """`actors.rollout.FragmentSink` over the replay actor, with bounded inserts in flight."""

    def __init__(self, replay: Any, max_inflight: int):
        self._replay = replay
        self._max_inflight = max_inflight
        self._pending: collections.deque = collections.deque()
        self.rejected = 0

    def put(self, data: bytes) -> None:
        self._pending.append(self._replay.insert.remote(data))
        while len(self._pending) > self._max_inflight:
            self._settle(self._pending.popleft())

    def flush(self) -> None:
        while self._pending:
            self._settle(self._pending.popleft())

    def _settle(self, ref: Any) -> None:
        if not ray.get(ref, timeout=CALL_TIMEOUT):
            self.rejected += 1


class RayWeightSource:
    """`actors.rollout.WeightSource` over the weight-store actor."""

    def __init__(self, store: Any):
        self._store = store

    def version(self) -> int:
        return ray.get(self._store.version.remote(), timeout=CALL_TIMEOUT)

    def fetch(self, have_version: int) -> tuple[int, dict[str, np.ndarray]] | None:
        return fetch_weights(self._store, have_version)


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
    ):
        self.actor_id = actor_id
        self._sink = RaySink(replay, actor_config.max_inflight)
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
        stats["error"] = self._error
        stats["alive"] = self._thread.is_alive()
        return stats

    def stop(self, timeout: float = 30.0) -> dict:
        """Finish the fragment in progress, send it, and return the final stats."""
        self._stop.set()
        self._thread.join(timeout)
        return self.stats()


class LearnerWorker:
    """The learner fed from the replay actor; it publishes weights to the weight store."""

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
        self.restored = self.learner.restore_latest() if resume else None
        self._batch_size = config.batch_size
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._metrics: list = []
        self._error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="offpg-learner", daemon=True)
        # Actors start from the learner's weights (restored ones on resume).
        self.learner.publish_weights()

    def _batches(self):
        while not self._stop.is_set():
            batch = ray.get(
                self._replay.sample.remote(self._batch_size, self.learner.version, timeout=0.5),
                timeout=CALL_TIMEOUT,
            )
            if batch is not None:
                yield batch

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
        self._thread.start()
        return {
            "device": str(self.learner.device),
            "version": self.learner.version,
            "restored": self.restored,
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
        }

    def stop(self, counters: dict[str, int], timeout: float = 60.0) -> dict:
        """Stop stepping, write the final checkpoint, and return the last metrics."""
        self._stop.set()
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


def start_replay(config: ReplayConfig) -> Any:
    return (
        ray.remote(ReplayService).options(num_cpus=0, max_concurrency=64, name=None).remote(config)
    )


def start_store() -> Any:
    return ray.remote(WeightStore).options(num_cpus=0, max_concurrency=8).remote()


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
        .options(num_cpus=1, num_gpus=gpus, max_concurrency=4)
        .remote(spec.to_dict(), config, checkpoint_dir, replay, store, resume)
    )


def start_actor(
    actor_id: int, env: EnvConfig, actors: ActorConfig, spec: PolicySpec, replay: Any, store: Any
) -> Any:
    return (
        ray.remote(RolloutWorker)
        .options(num_cpus=actors.num_cpus, max_concurrency=4, max_restarts=0)
        .remote(actor_id, env, actors, spec.to_dict(), replay, store)
    )


def wait_started(refs: dict[int, Any], timeout: float) -> tuple[list[int], list[int]]:
    """Which actors answered their `start()` within `timeout` s: (started, still pending)."""
    deadline = time.monotonic() + timeout
    pending = dict(refs)
    started = []
    while pending and time.monotonic() < deadline:
        ready, _ = ray.wait(
            list(pending.values()), num_returns=1, timeout=max(0.0, deadline - time.monotonic())
        )
        for ref in ready:
            actor_id = next(k for k, v in pending.items() if v == ref)
            ray.get(ref)
            started.append(actor_id)
            del pending[actor_id]
    return started, list(pending)
