"""Ray at the edge: the one file that turns the plain classes into Ray actors and wires them.

`actors/`, `learner/` and `replay/` know nothing of Ray placement; here each gets its resources:
the learner a GPU when it wants CUDA and the cluster has one, the replay service and weight
store no CPU reservation (they mostly wait on I/O), the replay service the learner's node (hard
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
from deploy.workers import CALL_TIMEOUT as CALL_TIMEOUT  # the driver's too (re-exported)
from deploy.workers import replay as replay_worker
from deploy.workers.learner import LearnerWorker
from deploy.workers.replay import ReplayWorker
from deploy.workers.rollout import RolloutWorker
from learner.broadcast import WeightStore
from learner.learner import LearnerConfig
from learner.policy import PolicySpec
from replay.service import ReplayConfig
from replay.trajectory import FragmentSpec


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
