"""Ray at the edge: the one file that turns the plain classes into Ray actors and wires them.

`actors/`, `learner/` and `replay/` know nothing of Ray placement; here each gets its resources:
the learner a GPU when it wants CUDA and the cluster has one, the replay shards and weight
store no CPU reservation (they mostly wait on I/O), every replay shard the learner's
placement-group bundle (so the learner's node), each rollout actor `run.actor_cpus`, spread
across the nodes, and the run's named controller (`deploy.controller`) no resources, on the
driver's node. The actor classes live in `deploy.workers`, one module per kind of process, so
that each process imports only what it needs. Nothing here waits for a component to be
constructed before starting the next: `Core.wait` waits once for all of them.

A job whose driver runs inside a placement group (a Tune trial, `deploy.tune`) keeps its actors
in that group's bundles instead (`deploy.placement`).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

from deploy.config import JobConfig
from deploy.controller import NAMESPACE, Controller, controller_name
from deploy.placement import LEARNER_BUNDLE, in_job_group
from deploy.specs import job_fragment_spec
from deploy.workers import CALL_TIMEOUT as CALL_TIMEOUT  # the driver's too (re-exported)
from deploy.workers import replay as replay_worker
from deploy.workers.learner import LearnerWorker
from deploy.workers.replay import ReplayWorker
from deploy.workers.rollout import RolloutWorker
from learner.broadcast import WeightStore
from learner.config import LearnerConfig
from learner.spec import PolicySpec
from replay.service import ReplayConfig
from replay.shards import shard_configs
from replay.spec import FragmentSpec


@dataclasses.dataclass
class Topology:
    """Handles of one job's Ray actors."""

    #: The replay shards, in shard order (`replay.shards`); rollout actor i inserts into
    #: `shard_of(i)`, the learner samples from all of them.
    shards: list[Any]
    store: Any
    learner: Any
    actors: dict[int, Any]
    learner_device: str = "cpu"
    #: The placement group this job made for its learner (None inside a Tune trial's group).
    group: Any = None
    #: Every learner rank, rank 0 (`learner`) first (`learner.num_learners`, `deploy.learners`).
    learners: list[Any] = dataclasses.field(default_factory=list)

    def release(self) -> None:
        """End every actor of the job and remove its placement group: a Ray that outlives the
        job (a notebook, a test session, `train()` called twice) gets its CPUs back."""
        ranks = self.learners or [self.learner]
        for handle in [*self.actors.values(), *ranks, *self.shards, self.store]:
            ray.kill(handle, no_restart=True)
        self.actors.clear()
        if self.group is not None:
            remove_placement_group(self.group)
            self.group = None

    def shard_of(self, actor_id: int) -> Any:
        """The replay shard rollout actor `actor_id` inserts into: `actor_id % num_shards`."""
        return self.shards[actor_id % len(self.shards)]


@dataclasses.dataclass
class Core:
    """What `start_core` started (the topology, no rollout actors yet), and the first call
    made to each component, by name, whose answer says it is constructed: `learner_ready` (the
    learner's `start()`), `replay_ready` (each shard's stats), `store_ready`, and the nodes the
    learner and the shards landed on (`learner_node`, `replay_nodes`)."""

    topology: Topology
    first_calls: dict[str, list[Any]]

    def wait(self, on_ready: Callable[[str], None]) -> dict[str, list[Any]]:
        """Wait once for every first call (up to `CALL_TIMEOUT` x 5 s in all); `on_ready(name)`
        as soon as all of a name's calls have answered. Their answers, by name."""
        names = {ref: name for name, refs in self.first_calls.items() for ref in refs}
        left = collections.Counter(names.values())
        waiting, deadline = list(names), time.monotonic() + CALL_TIMEOUT * 5
        while waiting:
            done, waiting = ray.wait(waiting, timeout=max(deadline - time.monotonic(), 0.0))
            if not done:
                late = sorted({names[ref] for ref in waiting})
                raise TimeoutError(f"not started after {CALL_TIMEOUT * 5:g} s: {', '.join(late)}")
            for ref in done:
                left[names[ref]] -= 1
                if not left[names[ref]]:
                    on_ready(names[ref])
        return {name: ray.get(refs) for name, refs in self.first_calls.items()}


def learner_wants_gpu(config: LearnerConfig) -> bool:
    """Whether each learner gets a GPU: it may use CUDA and the cluster has one per learner."""
    if config.device == "cpu":
        return False
    return ray.cluster_resources().get("GPU", 0) >= config.num_learners


def learner_bundles(config: LearnerConfig) -> list[PlacementGroupSchedulingStrategy]:
    """Where the learners go: one bundle each of a new placement group, holding its CPU (and a
    GPU when `learner_wants_gpu`), packed on one node when they fit there, spread otherwise.

    The replay shards go into the learners' bundles (they reserve nothing), so all are placed
    at once, without waiting for a learner to say which node it landed on, and still share a
    node with the learner that samples them: batches never cross the network. Ray restarts any
    of them inside its bundle; a bundle on a lost node is placed again elsewhere.
    """
    in_trial = in_job_group(LEARNER_BUNDLE)  # a Tune trial's: its learner bundle
    if in_trial is not None:
        return [in_trial]
    gpu = {"GPU": 1.0} if learner_wants_gpu(config) else {}
    n = config.num_learners
    group = placement_group([{"CPU": 1.0, **gpu}] * n, strategy="PACK" if n > 1 else "STRICT_PACK")
    return [
        PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=k) for k in range(n)
    ]


def rank_of_shard(shard: int, num_shards: int, num_learners: int) -> int:
    """The learner rank that samples replay shard `shard` (and shares its bundle): `shard %
    num_learners` when every learner gets the same number of shards; otherwise every rank
    samples every shard, and the shards sit with rank 0."""
    return shard % num_learners if num_shards % num_learners == 0 else 0


def shards_of_rank(shards: list[Any], rank: int, num_learners: int) -> list[Any]:
    """The replay shards learner `rank` samples (`rank_of_shard`; all when they do not divide)."""
    if len(shards) % num_learners:
        return list(shards)
    return [s for k, s in enumerate(shards) if k % num_learners == rank]


def start_replay(
    config: ReplayConfig,
    place: PlacementGroupSchedulingStrategy | None = None,
    threads: dict[str, int] | None = None,
    spec: FragmentSpec | None = None,
) -> Any:
    """The replay service, in `place` when given (a learner's bundle, `learner_bundles`), so
    the learner's batches and the actors' fragments each cross the network at most once.
    `threads` overrides sizes of its concurrency groups (`deploy.workers.replay.THREADS`);
    `spec`, the run's fragment layout, makes it refuse fragments of any other."""
    return (
        ray.remote(concurrency_groups={**replay_worker.THREADS, **(threads or {})})(ReplayWorker)
        .options(
            num_cpus=0,
            # The default group serves the rest (close, can_insert): nothing that waits long.
            max_concurrency=2,
            scheduling_strategy=place or "DEFAULT",
            max_restarts=-1,
            max_task_retries=-1,
        )
        .remote(config, spec)
    )


def start_core(
    config: JobConfig, spec: PolicySpec, checkpoint_dir: str, snapshot_path: str | None
) -> Core:
    """Start a job's weight store, replay shards and learners, all at once (`Core.wait` waits
    for them), and ask the learners to start stepping (they wait for fragments).

    Each shard shares the bundle of the learner that samples it (`learner_bundles`,
    `rank_of_shard`), so batches never cross the network. With several learners, rank 0's
    `rendezvous_address` is handed to every rank's `start` by Ray itself (an object reference as
    the argument), so they form their group without a round trip through the driver.
    `snapshot_path` is where shard snapshots go (one file per shard,
    `replay.shards.snapshot_path`); a resumed run restores from there.
    """
    replay_config = dataclasses.replace(config.replay, snapshot_path=snapshot_path)
    places = learner_bundles(config.learner)
    n = len(places)
    store = start_store()
    fragments = job_fragment_spec(config, spec)  # the shards refuse fragments of any other
    shards = [
        start_replay(shard, places[rank_of_shard(k, replay_config.num_shards, n)], spec=fragments)
        for k, shard in enumerate(shard_configs(replay_config))
    ]
    learners = [
        start_learner(
            spec,
            config.learner,
            checkpoint_dir,
            shards_of_rank(shards, rank, n),
            store,
            config.run.resume,
            places[rank],
            rank=rank,
        )
        for rank in range(n)
    ]
    address = learners[0].rendezvous_address.remote() if n > 1 else None
    first_calls = {
        "store_ready": [store.__ray_ready__.remote()],
        "replay_ready": [shard.stats.remote() for shard in shards],
        "learner_ready": [learner.start.remote(address) for learner in learners],
        "learner_node": [learner.node_id.remote() for learner in learners],
        "replay_nodes": [shard.node_id.remote() for shard in shards],
    }
    own_group = None if in_job_group(LEARNER_BUNDLE) is not None else places[0].placement_group
    topology = Topology(shards, store, learners[0], {}, group=own_group, learners=learners)
    return Core(topology, first_calls)


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
        .options(
            num_cpus=0,
            max_concurrency=8,
            max_restarts=-1,
            max_task_retries=-1,
            scheduling_strategy=in_job_group(LEARNER_BUNDLE),
        )
        .remote()
    )


def start_learner(
    spec: PolicySpec,
    config: LearnerConfig,
    checkpoint_dir: str,
    shards: list[Any] | None,
    store: Any,
    resume: bool,
    place: PlacementGroupSchedulingStrategy | None = None,
    rank: int = 0,
) -> Any:
    """Learner `rank` (of `config.num_learners`), in `place` when given (`learner_bundles`: its
    CPU and GPU); `shards` may be None and attached later (`LearnerWorker.attach_replay`)."""
    if place is None:
        gpus = 1 if learner_wants_gpu(config) else 0
    else:
        bundle = place.placement_group.bundle_specs[place.placement_group_bundle_index]
        gpus = bundle.get("GPU", 0)
    return (
        ray.remote(LearnerWorker)
        .options(
            num_cpus=1,
            num_gpus=gpus,
            max_concurrency=4,
            max_restarts=-1,
            scheduling_strategy=place or "DEFAULT",
        )
        .remote(
            spec.to_dict(), config, checkpoint_dir, shards, store, resume, rank, config.num_learners
        )
    )


def start_actor(actor_id: int, config: JobConfig, spec: PolicySpec, replay: Any, store: Any) -> Any:
    """Rollout actor `actor_id`: `run.actor_cpus` CPUs, `run.actor_max_inflight` inserts into
    `replay` (its shard, `Topology.shard_of`)."""
    return (
        ray.remote(RolloutWorker)
        .options(
            num_cpus=config.run.actor_cpus,
            max_concurrency=4,
            max_restarts=0,
            # Across the CPU nodes, so one node's loss takes few actors with it; inside a
            # placement group, in any bundle with room (the actors' bundles: the driver's and
            # the learner's are taken).
            scheduling_strategy=in_job_group(-1) or "SPREAD",
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
