"""Ray at the edge: the one file that turns the plain classes into Ray actors and wires them.

`actors/`, `learner/` and `replay/` know nothing of Ray placement; here each gets its resources:
the learner a GPU when it wants CUDA and the cluster has one, the replay shards and weight
store no CPU reservation (they mostly wait on I/O), every replay shard the learner's node (hard
node affinity), each rollout actor `run.actor_cpus`, spread across the nodes, and the run's
named controller (`deploy.controller`) no resources, on the driver's node. The actor classes
live in `deploy.workers`, one module per kind of process, so that each process imports only
what it needs.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from deploy.config import JobConfig
from deploy.controller import NAMESPACE, Controller, controller_name
from deploy.inprocess import job_fragment_spec
from deploy.workers import CALL_TIMEOUT as CALL_TIMEOUT  # the driver's too (re-exported)
from deploy.workers import replay as replay_worker
from deploy.workers.learner import LearnerWorker
from deploy.workers.replay import ReplayWorker
from deploy.workers.rollout import RolloutWorker
from learner.broadcast import WeightStore
from learner.learner import LearnerConfig
from learner.policy import PolicySpec
from replay.service import ReplayConfig
from replay.shards import shard_configs
from replay.trajectory import FragmentSpec


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

    def shard_of(self, actor_id: int) -> Any:
        """The replay shard rollout actor `actor_id` inserts into: `actor_id % num_shards`."""
        return self.shards[actor_id % len(self.shards)]


@dataclasses.dataclass(frozen=True)
class Core:
    """What `start_core` started: the topology (no rollout actors yet), the learner's
    `start()` answer and where the learner and each replay shard run."""

    topology: Topology
    learner_info: dict[str, Any]
    placement: dict[str, Any]


def learner_wants_gpu(config: LearnerConfig) -> bool:
    if config.device == "cpu":
        return False
    return ray.cluster_resources().get("GPU", 0) >= 1


def start_replay(
    config: ReplayConfig,
    node_id: str | None = None,
    threads: dict[str, int] | None = None,
    spec: FragmentSpec | None = None,
) -> Any:
    """The replay service, on `node_id` when given (hard affinity: it lives and dies with that
    node), so the learner's batches and the actors' fragments each cross the network at most
    once. `threads` overrides sizes of its concurrency groups (`deploy.workers.replay.THREADS`);
    `spec`, the run's fragment layout, makes it refuse fragments of any other."""
    strategy = (
        # Hard affinity: soft affinity lets Ray place it elsewhere when that node is busy. The
        # learner is on that node now, so it is alive.
        NodeAffinitySchedulingStrategy(node_id, soft=False) if node_id is not None else "DEFAULT"
    )
    return (
        ray.remote(concurrency_groups={**replay_worker.THREADS, **(threads or {})})(ReplayWorker)
        .options(
            num_cpus=0,
            # The default group serves the rest (close, can_insert): nothing that waits long.
            max_concurrency=2,
            scheduling_strategy=strategy,
            max_restarts=-1,
            max_task_retries=-1,
        )
        .remote(config, spec)
    )


def start_shards(
    config: ReplayConfig,
    node_id: str | None = None,
    threads: dict[str, int] | None = None,
    spec: FragmentSpec | None = None,
) -> list[Any]:
    """The `config.num_shards` replay shards (`replay.shards.shard_configs`), each its own
    replay actor (`start_replay`), all on `node_id` when given."""
    return [start_replay(shard, node_id, threads, spec) for shard in shard_configs(config)]


def start_core(
    config: JobConfig, spec: PolicySpec, checkpoint_dir: str, snapshot_path: str | None
) -> Core:
    """Start a job's weight store, learner and replay shards, and start the learner stepping.

    The learner is placed first (on a GPU node when it wants one), the shards next to it, so
    batches never cross the network. `snapshot_path` is where shard snapshots go (one file per
    shard, `replay.shards.snapshot_path`); a resumed run restores from there.
    """
    replay_config = dataclasses.replace(config.replay, snapshot_path=snapshot_path)
    store = start_store()
    learner = start_learner(
        spec, config.learner, checkpoint_dir, None, store, resume=config.run.resume
    )
    learner_node = ray.get(learner.node_id.remote(), timeout=CALL_TIMEOUT * 5)
    fragments = job_fragment_spec(config, spec)  # the shards refuse fragments of any other
    shards = start_shards(replay_config, node_id=learner_node, spec=fragments)
    # Waited for: the learner is a threaded actor, so calls to it are not ordered.
    ray.get(learner.attach_replay.remote(shards), timeout=CALL_TIMEOUT)
    info = ray.get(learner.start.remote(), timeout=CALL_TIMEOUT * 5)
    nodes = ray.get([shard.node_id.remote() for shard in shards], timeout=CALL_TIMEOUT)
    topology = Topology(shards, store, learner, {}, info["device"])
    return Core(topology, info, {"learner_node": learner_node, "replay_nodes": nodes})


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
    shards: list[Any] | None,
    store: Any,
    resume: bool,
) -> Any:
    """The learner; `shards` may be None and attached later (`LearnerWorker.attach_replay`)."""
    gpus = 1 if learner_wants_gpu(config) else 0
    return (
        ray.remote(LearnerWorker)
        .options(num_cpus=1, num_gpus=gpus, max_concurrency=4, max_restarts=-1)
        .remote(spec.to_dict(), config, checkpoint_dir, shards, store, resume)
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
