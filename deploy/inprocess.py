"""One process, no Ray: the job's own classes wired together and stepped in turn.

`InProcessRun(config)` builds what `offpg train` builds from a `JobConfig` — a `ReplayService`,
a `Learner` publishing into a `WeightStore`, `run.num_actors` `RolloutActor`s syncing from it —
and drives them from one thread, in rounds:

1. every actor collects one fragment into its sink (`MemorySink`), unless fragments from the
   last round are still held back by the rate limiter (the actors wait, as a full sink blocks a
   real actor);
2. the fragments go into the replay service, oldest first, until the rate limiter holds one
   back; the learner then takes the batches the service will serve, and so on until every
   fragment is in (or the learner has taken `learner_steps_per_round` steps).

Nothing waits on a clock, so a run is deterministic for a seed: torch's generator (the network's
initial weights) is seeded with `seed`, the envs and the actors' action sampling with
`env.seed`, the uniform sampler with `replay.seed` (or `seed` when unset). Unit tests use it
where they need the job's data path but not Ray, and `benchmarks/staleness.py` for its forced
policy lag (`policy_lag`).

What a Ray job has and this does not: snapshots, checkpoints, TensorBoard, restarts, and timing.
Here the schedule is fixed, so the policy lag is what `actors.sync_every`, the replay policy and
`policy_lag` make it, never how fast one side runs.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from actors.ports import MemorySink
from actors.rollout import RolloutActor
from deploy.config import JobConfig
from deploy.specs import job_fragment_spec, job_policy_spec
from learner.broadcast import WeightStore
from learner.learner import Learner, StepMetrics
from replay.service import ReplayService

#: Episodes the mean return (and the target) is taken over, as in a Ray job.
RETURN_WINDOW = 100
#: Episodes in the window before a point goes on the learning curve.
CURVE_MIN_EPISODES = 10


class StoreWeights:
    """`actors.ports.WeightSource` over an in-process `WeightStore` holding weight dicts."""

    def __init__(self, store: WeightStore) -> None:
        self._store = store

    def fetch(self, have_version: int) -> tuple[int, dict[str, np.ndarray]] | None:
        return self._store.latest_if_newer(have_version)


class DelayedPublisher:
    """The learner's `publish`: hands the store the weights published `lag` versions ago
    (the first ones until there are that many), so actors act exactly `lag` versions behind."""

    def __init__(self, store: WeightStore, lag: int) -> None:
        if lag < 0:
            raise ValueError(f"policy_lag is {lag}: must be >= 0")
        self._store = store
        self._history: collections.deque[tuple[int, dict[str, np.ndarray]]] = collections.deque(
            maxlen=lag + 1
        )

    def __call__(self, version: int, weights: dict[str, np.ndarray]) -> None:
        self._history.append((version, weights))
        self._store.publish(*self._history[0])


@dataclasses.dataclass
class RunResult:
    """What `InProcessRun.run` did."""

    env_steps: int
    fragments: int  # inserted into the replay service
    learner_steps: int  # taken, skipped ones included
    version: int  # the learner's at the end
    episodes: int
    return_mean: float | None  # over the last RETURN_WINDOW episodes; None before the first
    solved_at: int | None  # env steps when that mean first reached the target; None: never
    #: (env steps, mean return of the last RETURN_WINDOW episodes) after each round once the
    #: window holds CURVE_MIN_EPISODES episodes
    curve: list[tuple[int, float]]


class InProcessRun:
    """A job's replay service, learner, weight store and actors in one process, stepped in turn.

    `learner_steps_per_round` caps the learner's steps per round; None lets it take every batch
    the replay service serves, which needs a replay policy that stops serving (a fifo sampler,
    `max_times_sampled` or `samples_per_insert`). Not thread-safe.
    """

    def __init__(
        self,
        config: JobConfig,
        *,
        seed: int | None = None,
        policy_lag: int = 0,
        learner_steps_per_round: int | None = None,
    ) -> None:
        replay = config.replay
        if config.run.num_actors < 1:
            raise ValueError(f"run.num_actors is {config.run.num_actors}: must be >= 1 here")
        if learner_steps_per_round is not None and learner_steps_per_round < 1:
            raise ValueError(f"learner_steps_per_round is {learner_steps_per_round}: must be >= 1")
        if learner_steps_per_round is None and not (
            replay.samples_per_insert is not None or replay.retire_after
        ):
            raise ValueError(
                f"replay.sampler {replay.sampler} without samples_per_insert or "
                "max_times_sampled serves batches without end: give learner_steps_per_round"
            )
        seed = config.env.seed if seed is None else seed
        self.config = config
        self._steps_per_round = learner_steps_per_round
        spec = job_policy_spec(config)
        self.replay = ReplayService(
            dataclasses.replace(
                replay,
                snapshot_path=None,
                snapshot_every=0.0,
                seed=seed if replay.seed is None else replay.seed,
            ),
            job_fragment_spec(config, spec),
        )
        torch.manual_seed(seed)
        self.store = WeightStore()
        self.learner = Learner(
            spec, config.learner, publish=DelayedPublisher(self.store, policy_lag)
        )
        self.learner.publish_weights()
        self._sink = MemorySink()
        weights = StoreWeights(self.store)
        self.actors = [
            RolloutActor(i, config.env, config.actors, spec, sink=self._sink, weights=weights)
            for i in range(config.run.num_actors)
        ]
        self.learner_steps = 0

    def step(self) -> list[StepMetrics]:
        """One round (see the module docstring); returns the learner's steps' metrics.

        Raises RuntimeError when a fragment is held back and the learner can take no batch: in
        one thread that would wait forever (in a Ray job a waiting sampler lets the insert go).
        """
        if not self._sink.items:
            for actor in self.actors:
                actor.collect()
        cap = self._steps_per_round
        metrics: list[StepMetrics] = []
        while True:
            self._insert()
            new = self._learn(None if cap is None else cap - len(metrics))
            metrics += new
            if not self._sink.items or (cap is not None and len(metrics) >= cap):
                return metrics
            if not new:
                raise RuntimeError(
                    "the replay service holds fragments back and serves the learner no batch "
                    f"of {self.config.learner.batch_size} (stats: {self.replay.stats()}): raise "
                    "replay.tolerance or lower learner.batch_size"
                )

    def _insert(self) -> None:
        """Insert the sink's fragments, oldest first, until the rate limiter holds one back."""
        items = self._sink.items
        while items and self.replay.can_insert():
            self.replay.insert(items.pop(0), timeout=0)  # a refused one is counted there

    def _learn(self, limit: int | None) -> list[StepMetrics]:
        """Learner steps on every batch the replay serves now, at most `limit` of them."""
        metrics = []
        batch_size = self.config.learner.batch_size
        while limit is None or len(metrics) < limit:
            batch = self.replay.sample(batch_size, self.learner.version, timeout=0)
            if batch is None:
                break
            metrics.append(self.learner.step(batch))
        self.learner_steps += len(metrics)
        return metrics

    def run(
        self,
        max_env_steps: int,
        target_return: float | None = None,
        *,
        on_step: Callable[[StepMetrics], None] | None = None,
    ) -> RunResult:
        """Rounds until the actors have taken `max_env_steps` env steps (since they were
        built), or until the mean return of the last `RETURN_WINDOW` episodes (of this call)
        reaches `target_return`; `on_step` sees every learner step."""
        returns: collections.deque[float] = collections.deque(maxlen=RETURN_WINDOW)
        curve: list[tuple[int, float]] = []
        env_steps, episodes, solved_at = 0, 0, None
        while env_steps < max_env_steps and solved_at is None:
            for metrics in self.step():
                if on_step is not None:
                    on_step(metrics)
            stats = [actor.stats() for actor in self.actors]
            env_steps = sum(s.env_steps for s in stats)
            for s in stats:
                returns.extend(s.episode_returns)
                episodes += len(s.episode_returns)
            if len(returns) >= CURVE_MIN_EPISODES:
                curve.append((env_steps, float(np.mean(returns))))
            full = len(returns) == RETURN_WINDOW
            if target_return is not None and full and np.mean(returns) >= target_return:
                solved_at = env_steps
        return RunResult(
            env_steps=env_steps,
            fragments=self.replay.stats()["inserted"],
            learner_steps=self.learner_steps,
            version=self.learner.version,
            episodes=episodes,
            return_mean=float(np.mean(returns)) if returns else None,
            solved_at=solved_at,
            curve=curve,
        )

    def close(self) -> None:
        for actor in self.actors:
            actor.close()
        self.replay.close()
