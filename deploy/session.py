"""The job's Ray: start an embedded one or join a cluster, and shut it down again.

The embedded Ray starts without the dashboard unless `run.dashboard` asks for it: `offpg status
| scale | stop` reach the run's controller through the GCS and need no dashboard; the dashboard
serves Ray's web UI and state API, and `offpg launch | logs` talk to a cluster's dashboard, not
to this one.
"""

from __future__ import annotations

import contextlib
import math
import os

import ray

from deploy.config import ConfigError, JobConfig
from deploy.controller import TokenRefused, check_token


def ray_cpus(config: JobConfig) -> int:
    """Logical CPUs for the embedded Ray: every actor's reservation plus the learners'.

    Ray schedules by logical CPUs, so an actor asking for more than the cluster has would wait
    forever without a word; this gives the embedded Ray enough for what the job starts.
    """
    if config.run.num_cpus:
        return config.run.num_cpus
    need = math.ceil(config.run.num_actors * config.run.actor_cpus) + config.learner.num_learners
    return max(need, os.cpu_count() or 1)


def start(config: JobConfig) -> bool:
    """Start or join Ray unless this process runs one already; whether the job owns it.

    A Ray this process already runs (a notebook, a test session) is used as it is and left
    running; otherwise the job starts (or connects to) its own and shuts it down at the end.
    A job submitted to a cluster (`offpg launch`, `ray job submit`, a KubeRay RayJob) finds
    the cluster in RAY_ADDRESS.
    """
    if ray.is_initialized():
        return False
    address = config.run.address or os.environ.get("RAY_ADDRESS", "")
    if address:
        try:
            check_token(address)
        except TokenRefused as exc:
            raise ConfigError("run.address", str(exc)) from None
        ray.init(address=address, log_to_driver=True)
    else:
        ray.init(
            num_cpus=ray_cpus(config),
            include_dashboard=config.run.dashboard,
            log_to_driver=True,
        )
    return True


def shut_down(config: JobConfig, *, exiting: bool = False) -> None:
    """`ray.shutdown()` of the Ray `start` started or joined, without the second it waits for
    the autoscaler's monitor of an embedded Ray; nothing at all for an embedded Ray when the
    process is `exiting`.

    Ray stops its GCS first and its monitor later; the monitor answers SIGTERM by reporting
    to the GCS, which is gone by then, so Ray waits its full second before killing it
    (benchmarks/README.md, start-up). A one-node embedded Ray has nothing to autoscale, so
    the monitor is killed first. The process list is Ray's own (2.60) and looked up
    defensively: without it, this is a plain `ray.shutdown()`.

    An embedded Ray's processes are started to share this process's fate (on Linux the kernel
    kills them when it ends: Ray's `kernel_fate_share`, and the raylet's workers end with the
    raylet), so a process about to exit leaves them to that instead of shutting them down one
    by one, which took seconds on the loaded 2-core machine (benchmarks/README.md, start-up).
    """
    embedded = not (config.run.address or os.environ.get("RAY_ADDRESS"))
    node = getattr(ray._private.worker, "_global_node", None) if embedded else None
    if exiting and getattr(node, "kernel_fate_share", False):
        return
    for info in (getattr(node, "all_processes", None) or {}).get("monitor", []):
        with contextlib.suppress(OSError, AttributeError):
            info.process.kill()
    ray.shutdown()
