"""The training job: start the actors, supervise them, log, and stop cleanly.

`train(config)` is what `offpg train` runs. It starts an embedded Ray (or connects to
`run.address`), wires the replay shards, weight store, learner and rollout actors
(`deploy.topology`), and then, every `run.log_every` seconds, polls them (`deploy.fleet`
restarts dead actors, `deploy.replay_shards` counts replay restarts), records the poll
(`deploy.report`: TensorBoard points, progress line, status), obeys the orders of `offpg scale
| stop` (`deploy.controller`), and checks the stop rules: the step budget or the target return.
Ctrl-C and a learner failure stop it too. Every exit path stops the actors (their last fragment
is sent), writes the learner's final checkpoint and a snapshot of every replay shard, flushes
the logs and shuts down the Ray it started.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from deploy import report, topology
from deploy.config import ConfigError, JobConfig, RunConfig
from deploy.controller import Orders, TokenRefused, check_token
from deploy.fleet import Fleet
from deploy.inprocess import job_policy_spec
from deploy.replay_shards import ReplayShards, stray_snapshots
from deploy.report import Reporter, RunSummary, Stop
from learner import checkpoint

#: Seconds the learner may stay unreachable (Ray restarting it) before the run fails.
LEARNER_RESTART_TIMEOUT_S = 180.0
#: Seconds before each full poll (every `run.log_every` s) that the actors are asked for their
#: stats (one call each, not waited for): their answers are back when the poll takes them.
ASK_AHEAD_S = 0.5
#: From then until the poll, the driver takes the answers that came back this often (asking
#: nothing) and checks the target return: a solved run ends within ~0.25 s of the answers.
SOLVE_CHECK_S = 0.25


def run_name(config: JobConfig) -> str:
    if config.run.name:
        return config.run.name
    env = config.env.id.replace("/", "-").replace(":", "-")
    return f"{env}-{time.strftime('%Y%m%d-%H%M%S')}"


def ray_cpus(config: JobConfig) -> int:
    """Logical CPUs for the embedded Ray: every actor's reservation plus the learner's.

    Ray schedules by logical CPUs, so an actor asking for more than the cluster has would wait
    forever without a word; this gives the embedded Ray enough for what the job starts.
    """
    if config.run.num_cpus:
        return config.run.num_cpus
    need = math.ceil(config.run.num_actors * config.run.actor_cpus) + 1
    return max(need, os.cpu_count() or 1)


@dataclasses.dataclass
class Faults:
    """Restarts of the replay service and of the learner that the driver recovered from."""

    replay_restarts: int = 0  # over all shards
    #: Acknowledged inserts the restarted replay shards had no record of
    #: (`deploy.replay_shards.ReplayShards`).
    lost_fragments: int = 0
    learner_restarts: int = 0
    #: (checkpoint version restored, version continued as) of each learner restart.
    learner_restores: list[tuple[int | None, int]] = dataclasses.field(default_factory=list)


class Job:
    """A training job: its run directory, its Ray actors, and the faults it recovered from."""

    def __init__(self, config: JobConfig):
        self.config = config
        self.name = run_name(config)
        self.run_dir = Path(config.run.logdir) / self.name
        self.checkpoint_dir = self.run_dir / "checkpoints"
        # A relative replay.snapshot_path (the default, "replay.snapshot") is in the run dir.
        self.snapshot_path = self.run_dir / (config.replay.snapshot_path or "replay.snapshot")
        if config.run.resume:  # refused before anything starts, so nothing is overwritten
            try:
                checkpoint.resume_point(str(self.checkpoint_dir))
            except checkpoint.NoCheckpoint as exc:
                raise ConfigError("run.resume", str(exc)) from None
        shards = config.replay.num_shards
        if config.run.resume and (stray := stray_snapshots(self.snapshot_path, shards)):
            raise ConfigError(
                "replay.num_shards",
                f"is {shards}, but the run's replay snapshots "
                f"({', '.join(p.name for p in stray)}) were written by another number of shards: "
                "resume with the number it ran with",
            )
        if not config.run.resume and self.run_dir.exists():
            raise ConfigError("run.name", f"{self.run_dir} exists: add --resume or pick a new name")
        self.spec = job_policy_spec(config)
        self.topology: topology.Topology | None = None
        self.replay: ReplayShards | None = None
        self.fleet: Fleet | None = None
        self.controller: Any = None  # the run's named controller (deploy.controller)
        self.placement: dict[str, Any] = {}
        self.version = 0  # the learner's, at the last poll
        self.faults = Faults()
        #: Milliseconds the last full poll took (actors, learner, replay shards).
        self.poll_ms = 0.0
        self._learner_down_since: float | None = None

    @property
    def env_steps(self) -> int:
        return self.fleet.env_steps if self.fleet is not None else 0

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.toml").write_text(cfg.to_toml())
        try:
            self.controller = topology.start_controller(self.name, cfg.run.num_actors)
        except ValueError:
            raise ConfigError("run.name", f"a run named {self.name!r} is already running") from None
        # The replay shards snapshot into the run directory (periodically when
        # replay.snapshot_every is set, and at the end); a resumed run restores from there.
        core = topology.start_core(
            cfg, self.spec, str(self.checkpoint_dir), str(self.snapshot_path)
        )
        info = core.learner_info
        if cfg.run.resume and info["restored"] is None:  # its node does not see the checkpoints
            ray.kill(core.topology.learner, no_restart=True)  # before it writes one over the run's
            raise ConfigError(
                "run.resume", f"the learner found no readable checkpoint in {self.checkpoint_dir}"
            )
        self.topology, self.placement = core.topology, core.placement
        self.replay = ReplayShards(self.topology.shards, self.snapshot_path, self.faults)
        self.version = info["version"]
        restored_steps = info["counters"].get("env_steps", 0) if info["restored"] is not None else 0
        print(
            f"offpg: run {self.name} resumes from checkpoint version {info['restored']} at "
            f"{int(restored_steps):,} env steps"
            if cfg.run.resume
            else f"offpg: run {self.name} starts from scratch",
            flush=True,
        )
        self.fleet = Fleet(self.topology, cfg, self.spec, int(restored_steps))
        replay_stats = self.poll_replay()
        if replay_stats["restored_fragments"] or replay_stats["restore_errors"]:
            errors = "; ".join(replay_stats["restore_errors"])
            print(
                f"offpg: replay service restored {replay_stats['restored_fragments']} fragments "
                f"from {', '.join(self.replay.snapshot_paths())}"
                + (f" ({errors})" if errors else ""),
                flush=True,
            )
        self.fleet.scale(cfg.run.num_actors)

    def poll_replay(self) -> dict[str, Any]:
        """Every replay shard's stats, merged, after counting shard restarts."""
        return self.replay.poll(self.fleet.acknowledged_by_shard())

    def drain_learner(self) -> dict[str, Any] | None:
        """The learner's metrics since the last call; None while Ray restarts its process.

        A restarted learner has restored its newest checkpoint (see `topology.LearnerWorker`);
        here it gets the replay service again and starts stepping, and the restart is counted.
        Raises RuntimeError when it stays unreachable for `LEARNER_RESTART_TIMEOUT_S`.
        """
        learner = self.topology.learner
        try:
            out = ray.get(
                learner.drain.remote({"env_steps": self.env_steps}), timeout=topology.CALL_TIMEOUT
            )
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            now = time.monotonic()
            if self._learner_down_since is None:
                self._learner_down_since = now
                print(f"\noffpg: learner unreachable, Ray restarts it: {exc}", file=sys.stderr)
            elif now - self._learner_down_since > LEARNER_RESTART_TIMEOUT_S:
                raise RuntimeError(
                    f"the learner has been unreachable for {LEARNER_RESTART_TIMEOUT_S:g} s: {exc}"
                ) from exc
            return None
        if not out["started"]:
            out["version"] = self._restart_learner()
        self._learner_down_since = None
        return out

    def _restart_learner(self) -> int:
        """Attach the replay service to a learner Ray restarted and start it; its new version."""
        learner = self.topology.learner
        ray.get(learner.attach_replay.remote(self.topology.shards), timeout=topology.CALL_TIMEOUT)
        info = ray.get(learner.start.remote(), timeout=topology.CALL_TIMEOUT * 5)
        self.faults.learner_restarts += 1
        self.faults.learner_restores.append((info["restored"], info["version"]))
        print(
            f"\noffpg: learner restarted ({self.faults.learner_restarts}) from checkpoint version "
            f"{info['restored']}, continuing as v{info['version']}",
            file=sys.stderr,
        )
        return info["version"]

    def publish(self, status: dict[str, Any]) -> Orders | None:
        """Publish this poll's status to the run's controller; return what the user asked for
        (None when the controller cannot be reached: the run goes on as it was)."""
        try:
            return ray.get(self.controller.publish.remote(status), timeout=topology.CALL_TIMEOUT)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            print(f"\noffpg: controller unreachable: {exc}", file=sys.stderr)
            return None

    def stop(self) -> dict:
        """Stop actors (last fragments sent), then the learner (final checkpoint), snapshot
        every replay shard."""
        if self.fleet is not None:
            self.fleet.stop()
        try:
            return stop_learner(self.topology.learner, {"env_steps": self.env_steps})
        finally:
            # Whatever became of the learner, the replay's contents are kept for --resume.
            self.replay.snapshot_all()

    def finish_controller(self, reason: str, final: dict) -> None:
        """Tell whoever waits in `offpg stop` how the run ended, then end the controller."""
        try:
            ray.get(
                self.controller.publish.remote(report.stopped_status(self, reason, final)),
                timeout=5.0,
            )
            # Give `offpg stop` (blocked in wait_stopped) a moment to receive its answer.
            time.sleep(0.5)
        except (ray.exceptions.RayError, TimeoutError):
            pass
        ray.kill(self.controller, no_restart=True)


def stop_learner(learner: Any, counters: dict[str, int], timeout: float = 0.0) -> dict:
    """The learner's final metrics after its `stop` (the final checkpoint); `{}` when it does not
    answer within `timeout` seconds (default `2 * CALL_TIMEOUT`), logged: the newest periodic
    checkpoint is then the one to resume from."""
    timeout = timeout or topology.CALL_TIMEOUT * 2
    try:
        try:
            return ray.get(learner.stop.remote(counters), timeout=timeout)
        except ray.exceptions.RayActorError:
            # Killed just now: Ray restarts it from its checkpoint; that one writes the last.
            return ray.get(learner.stop.remote(counters), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        print(
            f"offpg: the learner did not stop within {timeout:g} s: no final checkpoint; "
            "--resume continues from the newest periodic one",
            file=sys.stderr,
        )
        return {}


#: A hook run after every poll of `train`; a true result stops the run.
OnPoll = Callable[[Job], bool | None]


def train(config: JobConfig, on_poll: OnPoll | None = None) -> RunSummary:
    """Run a training job to its budget, its target or Ctrl-C; see the module docstring.

    `on_poll(job)`, when given, runs after every poll (fault-injection tests and
    `benchmarks/chaos.py` kill components from it); a true result stops the run.
    """
    job = Job(config)
    owns_ray = _init_ray(config)
    started_at = time.monotonic()
    reporter: Reporter | None = None
    stop = Stop("stopped")
    try:
        job.start()
        reporter = Reporter(job, started_at)
        stop = _drive(job, reporter, on_poll)
    except KeyboardInterrupt:
        stop = Stop("interrupted")
    finally:
        final = _shut_down(job, reporter, stop.reason, owns_ray)
    summary = report.summarise(job, stop, final, time.monotonic() - started_at)
    summary.save(job.run_dir)
    return summary


def _drive(job: Job, reporter: Reporter, on_poll: OnPoll | None) -> Stop:
    """Every `run.log_every` s: poll, record, obey the controller's orders, check stop rules."""
    run, fleet = job.config.run, job.fleet
    while True:
        busy_s = _wait_for_poll(fleet, run)
        start = time.perf_counter()
        fleet.take_ready()
        learner = job.drain_learner()
        if learner is None:  # being restarted by Ray
            continue
        if learner["error"]:
            return Stop(f"learner failed: {learner['error']}", ok=False)
        job.version = learner["version"]
        replay = job.poll_replay()
        # The driver's own time for this poll: asking the actors, taking their answers, the
        # learner's and the replay shards' calls (not the sleeps between).
        job.poll_ms = (busy_s + time.perf_counter() - start) * 1000
        orders = job.publish(reporter.record(learner, replay))
        if on_poll is not None and on_poll(job):
            return Stop("stopped by on_poll")
        if orders is not None and orders.stop:
            return Stop(orders.stop_reason or "stop requested")
        if orders is not None and orders.desired_actors != fleet.size:
            print(
                f"\noffpg: scaling from {fleet.size} to {orders.desired_actors} actor(s)",
                file=sys.stderr,
            )
            fleet.scale(orders.desired_actors)
        fleet.notice_pending()
        if fleet.episodes.reached(run.target_return):
            return Stop(
                f"target return {run.target_return:g} reached",
                solved_at=(reporter.env_steps, reporter.wall_s),
            )
        if reporter.env_steps >= run.max_env_steps:
            return Stop("env-step budget reached")


def _wait_for_poll(fleet: Fleet, run: RunConfig) -> float:
    """Sleep until the next full poll, `run.log_every` s, asking the actors for their stats
    `ASK_AHEAD_S` before it; earlier once the answers taken show the target return. Returns
    the seconds spent asking and taking (the driver's work, not its sleep)."""
    deadline = time.monotonic() + run.log_every
    time.sleep(max(run.log_every - ASK_AHEAD_S, 0.0))
    start = time.perf_counter()
    fleet.ask()
    busy = time.perf_counter() - start
    if run.target_return is None:
        time.sleep(max(deadline - time.monotonic(), 0.0))
        return busy
    while (remaining := deadline - time.monotonic()) > 0:
        time.sleep(min(remaining, SOLVE_CHECK_S))
        start = time.perf_counter()
        fleet.take_ready()
        busy += time.perf_counter() - start
        if fleet.episodes.reached(run.target_return):
            break
    return busy


def _init_ray(config: JobConfig) -> bool:
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
        ray.init(num_cpus=ray_cpus(config), include_dashboard=False, log_to_driver=True)
    return True


def _shut_down(job: Job, reporter: Reporter | None, reason: str, owns_ray: bool) -> dict:
    """Every exit path: stop the actors and the learner (its `final` answer, returned), close
    the logs, tell the controller how the run ended, and shut down the Ray the job started."""
    final: dict = {}
    try:
        if reporter is not None:
            reporter.end_progress()
        if job.topology is not None:
            final = job.stop()
    finally:
        if reporter is not None:
            reporter.close()
        if job.controller is not None:
            job.finish_controller(reason, final)
        if owns_ray:
            ray.shutdown()
    return final
