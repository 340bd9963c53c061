"""The training job: start the actors, supervise them, log, and stop cleanly.

`train(config)` is what `offpg train` runs. It starts an embedded Ray (or connects to
`run.address`), wires the replay shards, weight store, learner and rollout actors
(`deploy.topology`), and then polls them as often as the TensorBoard points need
(`deploy.points`; `deploy.fleet` restarts dead actors and grants env steps out of the budget,
`deploy.budget`; `deploy.replay_shards` counts replay restarts), records each poll
(`deploy.report`) and checks the stop rules (the env-step budget, the target return); every
`run.log_every` seconds it also shows the progress line, publishes the status and obeys the
orders of `offpg scale | stop` (`deploy.controller`). Ctrl-C and a learner failure stop it too.
Every exit path stops the actors (their last fragment is sent), writes the learner's final
checkpoint and a snapshot of every replay shard, flushes the logs and shuts down the Ray it
started.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from deploy import report, session, topology
from deploy.config import ConfigError, JobConfig
from deploy.controller import Orders
from deploy.fleet import Fleet
from deploy.learners import LearnerGroup, SoleLearner, where
from deploy.replay_shards import ReplayShards, stray_snapshots
from deploy.report import Reporter, RunSummary, Stop
from deploy.specs import job_policy_spec
from deploy.timeline import MOMENTS, Timeline
from learner import checkpoint

#: Seconds the learner may stay unreachable (Ray restarting it) before the run fails.
LEARNER_RESTART_TIMEOUT_S = 180.0
#: Seconds the controller lives on after the final status when `offpg stop` waits for it.
STOP_ANSWER_S = 0.5


def run_name(config: JobConfig) -> str:
    if config.run.name:
        return config.run.name
    env = config.env.id.replace("/", "-").replace(":", "-")
    return f"{env}-{time.strftime('%Y%m%d-%H%M%S')}"


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

    def __init__(self, config: JobConfig, timeline: Timeline | None = None):
        self.config = config
        self.timeline = Timeline() if timeline is None else timeline
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
        #: Each replay shard's stats at the stop, after the actors' last inserts (`stop`).
        self.final_shard_stats: list[dict[str, Any]] | None = None
        self.fleet: Fleet | None = None
        #: The driver's side of the learner, or of its ranks (`deploy.learners`).
        self.learner: SoleLearner | LearnerGroup | None = None
        self.controller: Any = None  # the run's named controller (deploy.controller)
        self.placement: dict[str, Any] = {}
        self.version = 0  # the learner's, at the last poll
        self.faults = Faults()
        #: Milliseconds of the driver's own work in its last poll (no call is waited for).
        self.poll_ms = 0.0

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
        core.first_calls["controller_ready"] = [self.controller.__ray_ready__.remote()]
        self.topology = core.topology
        # The actors start with the rest; they act once the learner has published its weights.
        self.fleet = Fleet(self.topology, cfg, self.spec, timeline=self.timeline)
        self.fleet.scale(cfg.run.num_actors)
        first = core.wait(lambda name: name in MOMENTS and self.timeline.mark(name))
        info = first["learner_ready"][0]
        if cfg.run.resume and info["restored"] is None:  # its node does not see the checkpoints
            self._abandon()  # the learner is killed before it writes one over the run's
            raise ConfigError(
                "run.resume", f"the learner found no readable checkpoint in {self.checkpoint_dir}"
            )
        self.topology.learner_device = info["device"]
        self.placement = {
            "learner_node": first["learner_node"][0],
            "replay_nodes": first["replay_nodes"],
        }
        self._start_group(first["learner_ready"])
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
        self.fleet.retired.env_steps += int(restored_steps)
        replay_stats = self.replay.poll(self.fleet.acknowledged_by_shard())
        if replay_stats["restored_fragments"] or replay_stats["restore_errors"]:
            errors = "; ".join(replay_stats["restore_errors"])
            print(
                f"offpg: replay service restored {replay_stats['restored_fragments']} fragments "
                f"from {', '.join(self.replay.snapshot_paths())}"
                + (f" ({errors})" if errors else ""),
                flush=True,
            )

    def _start_group(self, infos: list[dict[str, Any]]) -> None:
        """The driver's side of the learner (`deploy.learners`); where each rank runs."""
        topo = self.topology
        if len(topo.learners) > 1:
            n = len(topo.learners)
            self.learner = LearnerGroup(
                topo.learners,
                lambda rank: topology.shards_of_rank(topo.shards, rank, n),
                self._count_restart,
                LEARNER_RESTART_TIMEOUT_S,
            )
            self.learner.started(infos)
        else:
            self.learner = SoleLearner(
                topo.learner, topo.shards, self._count_restart, LEARNER_RESTART_TIMEOUT_S
            )
        self.placement["learners"] = where(infos)

    def _abandon(self) -> None:
        """End a start that must not go on: the learner first (no checkpoint written), then
        the actors, the replay shards (no snapshot) and the weight store."""
        topo, self.topology = self.topology, None
        for learner in topo.learners:
            ray.kill(learner, no_restart=True)
        self.fleet.stop()
        for handle in (*topo.shards, topo.store):
            ray.kill(handle, no_restart=True)

    def ask(self) -> None:
        """Ask the learner(s) for their metrics and the replay shards for their stats, unless
        asked already; the answers are taken at a later poll (`take_learner`, `replay.take`)."""
        self.learner.ask({"env_steps": self.env_steps})
        self.replay.ask(self.fleet.acknowledged_by_shard())

    def take_learner(self) -> dict[str, Any] | None:
        """The learner's metrics since its last answer, once back; None before, and while Ray
        restarts it or the group re-forms (`deploy.learners`)."""
        out = self.learner.take()
        if out is not None:
            self.version = out["version"]
        return out

    def _count_restart(self, info: dict[str, Any]) -> None:
        """Count a learner restart (or a re-forming of the group) from rank 0's `start()`."""
        self.faults.learner_restarts += 1
        self.faults.learner_restores.append((info["restored"], info["version"]))
        if isinstance(self.learner, LearnerGroup):
            self.placement["learners"] = self.learner.ranks
        print(
            f"\noffpg: learner restarted ({self.faults.learner_restarts}) from checkpoint version "
            f"{info['restored']}, continuing as v{info['version']}",
            file=sys.stderr,
        )

    def publish(self, status: dict[str, Any]) -> Orders | None:
        """Publish this poll's status to the run's controller; return what the user asked for
        (None when the controller cannot be reached: the run goes on as it was)."""
        try:
            return ray.get(self.controller.publish.remote(status), timeout=topology.CALL_TIMEOUT)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            print(f"\noffpg: controller unreachable: {exc}", file=sys.stderr)
            return None

    def stop(self) -> dict:
        """Stop the actors (their last fragments go in at once: the replay shards admit every
        insert from now on), then at once the learner (final checkpoint, with the final env-step
        count) and every replay shard (snapshot)."""
        if self.fleet is not None:
            if self.replay is not None:
                self.replay.admit_all()
            self.fleet.stop()
        learner = self.topology.learner
        counters = {"env_steps": self.env_steps}
        stopping = learner.stop.remote(counters)
        if isinstance(self.learner, LearnerGroup):
            self.learner.stop_others()  # rank 0 alone writes the final checkpoint
        try:
            # Whatever becomes of the learner, the replay's contents are kept for --resume; the
            # shards write them while the learner writes its final checkpoint.
            if self.replay is not None:
                self.replay.snapshot_all()
                self.final_shard_stats = self.replay.shard_stats()
        finally:
            final = stop_learner(learner, counters, call=stopping)
        return final

    def finish_controller(self, reason: str, final: dict) -> None:
        """Tell whoever waits in `offpg stop` how the run ended, then end the controller."""
        try:
            orders = ray.get(
                self.controller.publish.remote(report.stopped_status(self, reason, final)),
                timeout=5.0,
            )
            if orders.waiting_for_stop:
                # The publish woke them; give their answers a moment to leave the controller.
                time.sleep(STOP_ANSWER_S)
        except (ray.exceptions.RayError, TimeoutError):
            pass
        ray.kill(self.controller, no_restart=True)


def stop_learner(
    learner: Any, counters: dict[str, int], timeout: float = 0.0, call: Any = None
) -> dict:
    """The learner's final metrics after its `stop` (the final checkpoint); `{}` when it does not
    answer within `timeout` seconds (default `2 * CALL_TIMEOUT`), logged: the newest periodic
    checkpoint is then the one to resume from. `call`: the `stop` call, when already made."""
    timeout = timeout or topology.CALL_TIMEOUT * 2
    try:
        try:
            return ray.get(call or learner.stop.remote(counters), timeout=timeout)
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


#: A hook run after every full poll of `train` (every `run.log_every` s); a true result stops
#: the run.
OnPoll = Callable[[Job], bool | None]


#: Stats calls one poll makes at most: the actors asked longest ago go first, so every actor is
#: asked once every ceil(actors / ASKS_PER_POLL) polls and a poll costs the same at 16 actors
#: and at 1,000.
ASKS_PER_POLL = 16


def train(config: JobConfig, on_poll: OnPoll | None = None, *, exiting: bool = False) -> RunSummary:
    """Run a training job to its budget, its target or Ctrl-C; see the module docstring.

    `on_poll(job)`, when given, runs after every full poll, every `run.log_every` s
    (fault-injection tests and `benchmarks/chaos.py` kill components from it); a true result
    stops the run. The summary is printed before Ray is shut down, and summary.json written
    again after, with the `exit` moment of its timeline (`deploy.timeline`). `exiting`: the
    process ends as soon as this returns (the `offpg` program), so an embedded Ray is left to
    end with it (`deploy.session.shut_down`).
    """
    timeline = Timeline()
    timeline.mark("train_called")
    job = Job(config, timeline)
    owns_ray = session.start(config)
    timeline.mark("ray_started")
    started_at = time.monotonic()
    reporter: Reporter | None = None
    stop = Stop("stopped")
    final: dict = {}
    try:
        try:
            job.start()
            reporter = Reporter(job, started_at)
            stop = _drive(job, reporter, on_poll)
        except KeyboardInterrupt:
            stop = Stop("interrupted")
        finally:
            timeline.mark("stop_seen")
            final = _stop_job(job, reporter, stop)
            timeline.mark("stopped")
        summary = report.summarise(job, stop, final, time.monotonic() - started_at)
        summary.save(job.run_dir)
        timeline.mark("summary")
    finally:
        if job.controller is not None:
            job.finish_controller(stop.reason, final)
        if owns_ray:
            session.shut_down(config, exiting=exiting)
        elif job.topology is not None:
            job.topology.release()  # the Ray goes on: give back what the job held
    timeline.mark("exit")
    summary.timeline = timeline.seconds()
    summary.write(job.run_dir)
    return summary


def _drive(job: Job, reporter: Reporter, on_poll: OnPoll | None) -> Stop:
    """Poll often enough for the TensorBoard points (`deploy.points`), grant env steps and
    check the stop rules at every poll; every `run.log_every` s also publish the status, run
    `on_poll` and obey the controller's orders."""
    run, fleet = job.config.run, job.fleet
    next_status = time.monotonic() + run.log_every
    replay = job.replay.poll(fleet.acknowledged_by_shard())
    learner: dict[str, Any] = {}  # the learner's last answer
    while True:
        time.sleep(reporter.clock.tick_s())
        start, cpu = time.perf_counter(), time.thread_time()
        # Every call is answered for a later poll (`deploy.inflight`): the answers that are
        # back are taken without waiting, and whoever answered is asked again.
        fleet.take_ready()
        fleet.ask(limit=ASKS_PER_POLL)
        drained = job.take_learner()
        replay = job.replay.take() or replay
        job.ask()
        # The driver's own time for this poll (not the sleep between polls).
        job.poll_ms = (time.perf_counter() - start) * 1000
        fleet.grant_steps(reporter.clock.tick_s())
        if drained is not None:
            if drained["error"]:
                return Stop(f"learner failed: {drained['error']}", ok=False)
            if drained.get("first_step_at") is not None:
                job.timeline.mark("first_learner_step", drained["first_step_at"])
            learner = drained
        # What the poll cost: this thread's CPU time, not the calls' latency (nor the CPU of
        # Ray's own threads while it waits, which a loaded machine inflates).
        reporter.record(drained, replay, time.thread_time() - cpu)
        if fleet.episodes.reached(run.target_return):
            return Stop(
                f"target return {run.target_return:g} reached",
                solved_at=(reporter.env_steps, reporter.wall_s),
            )
        if reporter.env_steps >= run.max_env_steps or fleet.budget_spent():
            return Stop("env-step budget reached")
        if time.monotonic() < next_status:
            continue
        next_status = time.monotonic() + run.log_every
        stop = _full_poll(job, reporter, learner, on_poll)
        if stop is not None:
            return stop


def _full_poll(
    job: Job, reporter: Reporter, learner: dict[str, Any], on_poll: OnPoll | None
) -> Stop | None:
    """Publish the status, run `on_poll`, obey the orders of `offpg scale | stop`."""
    fleet = job.fleet
    orders = job.publish(reporter.status(learner.get("last_checkpoint")))
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
    return None


def _stop_job(job: Job, reporter: Reporter | None, stop: Stop) -> dict:
    """Every exit path: stop the actors and the learner (its `final` answer, returned) and
    close the logs."""
    final: dict = {}
    try:
        if reporter is not None:
            reporter.end_progress()
            reporter.finish(stop)  # while the fleet still counts its actors
        if job.topology is not None:
            final = job.stop()
            if final.get("first_step_at") is not None:
                job.timeline.mark("first_learner_step", final["first_step_at"])
    finally:
        if reporter is not None:
            reporter.close(stop.ok)
    return final
