"""The training job: start the actors, supervise them, log, and stop cleanly.

`train(config)` is what `offpg train` runs. It starts an embedded Ray (or connects to
`run.address`), wires the replay service, weight store, learner and rollout actors
(`deploy.topology`), and then, every `run.log_every` seconds, polls them, writes TensorBoard
points, prints a progress line, restarts dead actors, and checks the stop conditions: the step
budget, the target return, Ctrl-C, or a learner failure. Every exit path stops the actors (their
last fragment is sent), writes the learner's final checkpoint and a replay snapshot, flushes the
logs and shuts Ray down.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray

from actors.envs import policy_spec, probe_spaces
from deploy import metrics as tags
from deploy import topology
from deploy.config import ConfigError, JobConfig
from deploy.controller import Orders

#: Episodes the target return is averaged over (CartPole-v1's "solved" definition).
RETURN_WINDOW = 100
#: Seconds to wait for actors to start before saying they are pending, and why.
PENDING_NOTICE_S = 10.0
#: Seconds a pending actor (maybe never scheduled) gets to stop before it is killed.
PENDING_STOP_S = 2.0
#: Seconds the learner may stay unreachable (Ray restarting it) before the run fails.
LEARNER_RESTART_TIMEOUT_S = 180.0
#: Between the full polls (every `run.log_every` s), the actors' episode returns are read this
#: often to see the target return: a solved run ends within ~0.25 s, not up to `log_every`.
SOLVE_CHECK_S = 0.25


@dataclasses.dataclass
class RunSummary:
    """What a finished run reports (also printed at the end)."""

    run_dir: str
    env_steps: int
    wall_s: float
    learner_version: int
    episodes: int
    return_mean: float
    solved: bool
    solved_at_env_steps: int | None
    solved_at_s: float | None
    stop_reason: str
    checkpoint: str | None
    actor_restarts: int
    ok: bool = True
    replay_restarts: int = 0
    learner_restarts: int = 0
    lost_fragments: int = 0

    def line(self) -> str:
        solved = (
            f"solved at {self.solved_at_env_steps:,} env steps / {self.solved_at_s:.1f} s"
            if self.solved
            else "not solved"
        )
        return (
            f"offpg: {self.stop_reason}: {self.env_steps:,} env steps in {self.wall_s:.1f} s "
            f"({self.env_steps / max(self.wall_s, 1e-9):,.0f}/s), learner v{self.learner_version}"
            f", mean return {self.return_mean:.1f} over {min(self.episodes, RETURN_WINDOW)} "
            f"episodes, {solved}; logs in {self.run_dir}" + self._faults()
        )

    def _faults(self) -> str:
        if not (self.actor_restarts or self.replay_restarts or self.learner_restarts):
            return ""
        return (
            f"; recovered from {self.actor_restarts} actor, {self.replay_restarts} replay "
            f"({self.lost_fragments} fragments lost) and {self.learner_restarts} learner "
            "restart(s)"
        )


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
    need = math.ceil(config.run.num_actors * config.actors.num_cpus) + 1
    return max(need, os.cpu_count() or 1)


class Progress:
    """One live status line on a terminal, plain lines otherwise."""

    def __init__(self, stream: Any = sys.stdout):
        self._stream = stream
        self._tty = stream.isatty()

    def show(self, text: str) -> None:
        if self._tty:
            self._stream.write("\r\x1b[2K" + text)
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def done(self) -> None:
        if self._tty:
            self._stream.write("\n")
            self._stream.flush()


class Job:
    """A running training job: its Ray actors, counters and logs."""

    def __init__(self, config: JobConfig):
        self.config = config
        self.name = run_name(config)
        self.run_dir = Path(config.run.logdir) / self.name
        self.checkpoint_dir = self.run_dir / "checkpoints"
        # A relative replay.snapshot_path (the default, "replay.snapshot") is in the run dir.
        self.snapshot_path = self.run_dir / (config.replay.snapshot_path or "replay.snapshot")
        if config.run.resume and not self.checkpoint_dir.is_dir():
            raise ConfigError("run.resume", f"no checkpoints to resume in {self.checkpoint_dir}")
        if not config.run.resume and self.run_dir.exists():
            raise ConfigError("run.name", f"{self.run_dir} exists: add --resume or pick a new name")
        obs_space, action_space = probe_spaces(config.env)
        network = None if config.policy.network == "auto" else config.policy.network
        self.spec = policy_spec(
            obs_space, action_space, network=network, hidden_sizes=config.policy.hidden_sizes
        )
        self.returns: collections.deque[float] = collections.deque(maxlen=RETURN_WINDOW)
        self.lengths: collections.deque[float] = collections.deque(maxlen=RETURN_WINDOW)
        self.episodes = 0
        self.env_steps_base = 0  # steps of actors that were restarted or removed
        self.actor_steps: dict[int, int] = {}
        self.restarts = 0
        self.actor_env_errors: dict[int, int] = {}
        self.env_errors_base = 0
        self.pending: list[int] = []
        self.topology: topology.Topology | None = None
        self.version = 0
        self.controller: Any = None  # the run's named controller (deploy.controller)
        self.placement: dict[str, Any] = {}
        self.actor_nodes: dict[int, str] = {}
        # Faults recovered. `inserted` is what the actors were told was inserted (acknowledged);
        # against the replay service's own `inserted` counter (restored from its snapshot when
        # Ray restarts it) it gives the fragments a restart lost, see `check_replay`.
        self.actor_inserted: dict[int, int] = {}
        self.actor_invalid: dict[int, int] = {}
        self.inserted_base = 0
        self.invalid_base = 0
        self.replay_restarts = 0
        self.lost_fragments = 0
        self.learner_restarts = 0
        self._replay_incarnation: str | None = None
        self._lost_baseline = 0
        self._learner_down_since: float | None = None
        self.learner_restores: list[tuple[int | None, int]] = []  # (checkpoint, new version)
        self.actor_versions: dict[int, int] = {}  # policy version each actor acts with

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.toml").write_text(cfg.to_toml())
        try:
            self.controller = topology.start_controller(self.name, cfg.run.num_actors)
        except ValueError:
            raise ConfigError("run.name", f"a run named {self.name!r} is already running") from None
        # The replay service snapshots into the run directory (periodically when
        # replay.snapshot_every is set, and at the end); a resumed run restores from there.
        replay_cfg = dataclasses.replace(cfg.replay, snapshot_path=str(self.snapshot_path))
        store = topology.start_store()
        # The learner is placed first (on a GPU node when it wants one), the replay service
        # next to it, so batches never cross the network.
        learner = topology.start_learner(
            self.spec, cfg.learner, str(self.checkpoint_dir), None, store, cfg.run.resume
        )
        learner_node = ray.get(learner.node_id.remote(), timeout=topology.CALL_TIMEOUT * 5)
        replay = topology.start_replay(replay_cfg, node_id=learner_node)
        # Waited for: the learner is a threaded actor, so calls to it are not ordered.
        ray.get(learner.attach_replay.remote(replay), timeout=topology.CALL_TIMEOUT)
        info = ray.get(learner.start.remote(), timeout=topology.CALL_TIMEOUT * 5)
        self.placement = {
            "learner_node": learner_node,
            "replay_node": ray.get(replay.node_id.remote(), timeout=topology.CALL_TIMEOUT),
        }
        self.version = info["version"]
        if info["restored"] is not None:
            self.env_steps_base = int(info["counters"].get("env_steps", 0))
        self.topology = topology.Topology(replay, store, learner, {}, info["device"])
        replay_stats = ray.get(replay.stats.remote(), timeout=topology.CALL_TIMEOUT)
        self.check_replay(replay_stats)
        if replay_stats["restored_fragments"] or replay_stats["restore_error"]:
            print(
                f"offpg: replay service restored {replay_stats['restored_fragments']} fragments "
                f"from {self.snapshot_path}"
                + (f" ({replay_stats['restore_error']})" if replay_stats["restore_error"] else ""),
                flush=True,
            )
        self.scale(cfg.run.num_actors)

    def scale(self, num_actors: int) -> None:
        """Grow or shrink the actor fleet; removed actors send their last fragment first."""
        topo = self.topology
        assert topo is not None
        # Pending actors (never scheduled, or not yet answering) go first, newest first.
        victims = sorted(topo.actors, key=lambda a: (a in self.pending, a), reverse=True)
        for actor_id in victims[: max(len(topo.actors) - num_actors, 0)]:
            self._retire(actor_id, topo.actors.pop(actor_id))
        new = {}
        next_id = max([*topo.actors, *self.actor_steps, -1]) + 1
        while len(topo.actors) + len(new) < num_actors:
            handle = self._spawn(next_id)
            new[next_id] = handle
            next_id += 1
        topo.actors.update(new)
        self.pending.extend(new)

    def _spawn(self, actor_id: int) -> Any:
        cfg = self.config
        handle = topology.start_actor(
            actor_id, cfg.env, cfg.actors, self.spec, self.topology.replay, self.topology.store
        )
        handle.start.remote()
        return handle

    def _retire(self, actor_id: int, handle: Any) -> None:
        # A pending actor may never have been scheduled: it holds no data, so it does not get
        # the full timeout to answer (that would stall the driver for every one of them).
        pending = actor_id in self.pending
        timeout = PENDING_STOP_S if pending else topology.CALL_TIMEOUT
        try:
            final = ray.get(handle.stop.remote(), timeout=timeout)
            self._absorb(actor_id, final)
        except (ray.exceptions.RayError, TimeoutError):
            pass
        if pending:
            self.pending.remove(actor_id)
        self.actor_nodes.pop(actor_id, None)
        self._forget(actor_id)
        ray.kill(handle, no_restart=True)

    def _absorb(self, actor_id: int, stats: dict) -> None:
        self.actor_steps[actor_id] = int(stats["env_steps"])
        self.returns.extend(float(r) for r in stats["episode_returns"])
        self.lengths.extend(float(n) for n in stats["episode_lengths"])
        self.episodes += len(stats["episode_returns"])
        self.actor_env_errors[actor_id] = int(stats["env_errors"])
        self.actor_inserted[actor_id] = int(stats.get("inserted", 0))
        self.actor_invalid[actor_id] = int(stats.get("invalid_fragments", 0))
        self.actor_versions[actor_id] = int(stats["policy_version"])

    @property
    def env_steps(self) -> int:
        return self.env_steps_base + sum(self.actor_steps.values())

    @property
    def env_errors(self) -> int:
        return self.env_errors_base + sum(self.actor_env_errors.values())

    @property
    def inserted(self) -> int:
        """Fragments the replay service acknowledged to this driver's actors."""
        return self.inserted_base + sum(self.actor_inserted.values())

    @property
    def invalid_fragments(self) -> int:
        return self.invalid_base + sum(self.actor_invalid.values())

    def _forget(self, actor_id: int) -> None:
        """Move a removed actor's counters into the bases, so totals never go backwards."""
        self.env_steps_base += self.actor_steps.pop(actor_id, 0)
        self.env_errors_base += self.actor_env_errors.pop(actor_id, 0)
        self.inserted_base += self.actor_inserted.pop(actor_id, 0)
        self.invalid_base += self.actor_invalid.pop(actor_id, 0)
        self.actor_versions.pop(actor_id, None)

    def poll_actors(self) -> None:
        """Collect actor stats; restart actors that died; note the ones still pending."""
        topo = self.topology
        refs = {actor_id: h.stats.remote() for actor_id, h in topo.actors.items()}
        # One short wait for all of them, so many pending actors cost 0.5 s, not 0.5 s each.
        ray.wait(list(refs.values()), num_returns=len(refs), timeout=0.5)
        for actor_id, ref in refs.items():
            try:
                ready, _ = ray.wait([ref], timeout=0.5 if actor_id in self.pending else 10.0)
                if not ready:
                    continue  # still being scheduled or constructed
                stats = ray.get(ref)
            except ray.exceptions.RayActorError:
                self._restart(actor_id)
                continue
            if actor_id in self.pending:
                self.pending.remove(actor_id)
            self._absorb(actor_id, stats)
            self.actor_nodes[actor_id] = stats.get("node_id", "")
            if not stats["alive"]:
                print(
                    f"\noffpg: actor {actor_id} stopped: {stats['error']}; restarting",
                    file=sys.stderr,
                )
                self._restart(actor_id)

    def _restart(self, actor_id: int) -> None:
        topo = self.topology
        old = topo.actors.pop(actor_id)
        ray.kill(old, no_restart=True)
        self._forget(actor_id)
        self.restarts += 1
        topo.actors[actor_id] = self._spawn(actor_id)
        self.pending.append(actor_id)

    def check_replay(self, stats: dict[str, Any]) -> None:
        """Count a restart of the replay service (a new `incarnation`) and what it lost.

        Lost fragments are the acknowledged inserts the restarted service has no record of:
        its `inserted` counter comes back from the snapshot, so everything inserted after the
        last snapshot and before the crash is missing from it (whether or not the learner had
        already sampled it). The offset `acknowledged - inserted` is steady while nothing is lost
        (it moves only by inserts in flight and by acks of killed actors not yet reported), so
        the loss of a restart is how much the offset grew across the poll that saw it; exact
        up to the inserts in flight then (at most actors x `actors.max_inflight`).
        """
        offset = self.inserted - int(stats["inserted"])
        if (
            self._replay_incarnation is not None
            and stats["incarnation"] != self._replay_incarnation
        ):
            lost = max(0, offset - self._lost_baseline)
            self.replay_restarts += 1
            self.lost_fragments += lost
            error = f"; {stats['restore_error']}" if stats.get("restore_error") else ""
            print(
                f"\noffpg: replay service restarted ({self.replay_restarts}): restored "
                f"{stats['restored_fragments']} fragments from its snapshot, {lost} acknowledged "
                f"fragment(s) lost{error}",
                file=sys.stderr,
            )
        self._replay_incarnation = stats["incarnation"]
        self._lost_baseline = offset

    def drain_learner(self) -> dict[str, Any] | None:
        """The learner's metrics since the last call; None while Ray restarts its process.

        A restarted learner has restored its newest checkpoint (see `topology.LearnerWorker`);
        here it gets the replay service again and starts stepping, and the restart is counted.
        Raises RuntimeError when it stays unreachable for `LEARNER_RESTART_TIMEOUT_S`.
        """
        topo = self.topology
        try:
            out = ray.get(
                topo.learner.drain.remote({"env_steps": self.env_steps}),
                timeout=topology.CALL_TIMEOUT,
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
            ray.get(topo.learner.attach_replay.remote(topo.replay), timeout=topology.CALL_TIMEOUT)
            info = ray.get(topo.learner.start.remote(), timeout=topology.CALL_TIMEOUT * 5)
            self.learner_restarts += 1
            self.learner_restores.append((info["restored"], info["version"]))
            print(
                f"\noffpg: learner restarted ({self.learner_restarts}) from checkpoint version "
                f"{info['restored']}, continuing as v{info['version']}",
                file=sys.stderr,
            )
            out["version"] = info["version"]
        self._learner_down_since = None
        return out

    def publish(self, status: dict[str, Any]) -> Orders | None:
        """Publish this poll's status to the run's controller; return what the user asked for
        (None when the controller cannot be reached: the run goes on as it was)."""
        try:
            return ray.get(self.controller.publish.remote(status), timeout=topology.CALL_TIMEOUT)
        except (ray.exceptions.RayError, TimeoutError) as exc:
            print(f"\noffpg: controller unreachable: {exc}", file=sys.stderr)
            return None

    def status(self, **interval: Any) -> dict[str, Any]:
        """What `offpg status` shows: the job's counters plus this poll's `interval` values."""
        topo = self.topology
        nodes = collections.Counter(self.actor_nodes.values())
        return {
            "run": self.name,
            "state": "running",
            "env_id": self.config.env.id,
            "actors": {
                "running": len(topo.actors) - len(self.pending),
                "pending": len(self.pending),
                "restarted": self.restarts,
                "ids": sorted(topo.actors),
                "pending_ids": sorted(self.pending),
                "num_cpus_each": self.config.actors.num_cpus,
                "num_envs_each": self.config.actors.num_envs,
                "by_node": dict(nodes),
            },
            "env_steps": self.env_steps,
            "env_errors": self.env_errors,
            "episodes": self.episodes,
            "learner": {"version": self.version, "device": topo.learner_device},
            "placement": self.placement,
            "cluster": {
                "cpus_free": ray.available_resources().get("CPU", 0.0),
                "cpus_total": ray.cluster_resources().get("CPU", 0.0),
            },
            "run_dir": str(self.run_dir.resolve()),
            "tensorboard": f"offpg tensorboard {self.run_dir.resolve()}",
            "updated_at": time.time(),
            **interval,
        }

    def stop(self) -> dict:
        """Stop actors (last fragments sent), then the learner (final checkpoint), snapshot."""
        topo = self.topology
        for actor_id in sorted(topo.actors):
            self._retire(actor_id, topo.actors.pop(actor_id))
        try:
            final = ray.get(
                topo.learner.stop.remote({"env_steps": self.env_steps}),
                timeout=topology.CALL_TIMEOUT * 2,
            )
        except ray.exceptions.RayActorError:
            # Killed just now: Ray restarts it from its checkpoint; that one writes the last.
            final = ray.get(
                topo.learner.stop.remote({"env_steps": self.env_steps}),
                timeout=topology.CALL_TIMEOUT * 2,
            )
        ray.get(topo.replay.snapshot.remote(str(self.snapshot_path)), timeout=topology.CALL_TIMEOUT)
        return final


def _solved(job: Job, target: float | None) -> bool:
    returns = job.returns
    return (
        target is not None
        and len(returns) >= RETURN_WINDOW
        and sum(returns) / len(returns) >= target
    )


def _wait_for_poll(job: Job, config: JobConfig) -> None:
    """Sleep until the next full poll, `run.log_every` s; earlier once the target is reached."""
    target = config.run.target_return
    deadline = time.monotonic() + config.run.log_every
    if target is None:
        time.sleep(config.run.log_every)
        return
    while (remaining := deadline - time.monotonic()) > 0:
        time.sleep(min(remaining, SOLVE_CHECK_S))
        if time.monotonic() < deadline:
            job.poll_actors()
            if _solved(job, target):
                return


def _replay_status(now: dict, before: dict | None, seconds: float) -> dict[str, Any]:
    """Replay size and insert/sample rates (per second) since the last poll."""
    rates = {}
    for key in ("inserted", "sampled", "evicted", "dropped_stale"):
        if before is not None and seconds > 0:
            rates[f"{key}_per_s"] = (now[key] - before[key]) / seconds
    return {
        "size_fragments": now["size_fragments"],
        "size_bytes": now["size_bytes"],
        "inserted": now["inserted"],
        "sampled": now["sampled"],
        "rejected": sum(now["rejected"].values()),
        **rates,
    }


def _finish_controller(job: Job, reason: str, final: dict) -> None:
    """Tell whoever waits in `offpg stop` how the run ended, then end the controller."""
    status = {
        "run": job.name,
        "state": "stopped",
        "stop_reason": reason,
        "env_steps": job.env_steps,
        "learner": {"version": int(final.get("version", job.version))},
        "last_checkpoint": final.get("checkpoint"),
        "run_dir": str(job.run_dir.resolve()),
    }
    try:
        ray.get(job.controller.publish.remote(status), timeout=5.0)
        # Give `offpg stop` (blocked in wait_stopped) a moment to receive its answer.
        time.sleep(0.5)
    except (ray.exceptions.RayError, TimeoutError):
        pass
    ray.kill(job.controller, no_restart=True)


def train(config: JobConfig, on_poll: Callable[[Job], bool | None] | None = None) -> RunSummary:
    """Run a training job to its budget, its target or Ctrl-C; see the module docstring.

    `on_poll(job)`, when given, runs after every poll (fault-injection tests and
    `benchmarks/chaos.py` kill components from it); a true result stops the run.
    """
    job = Job(config)
    # A Ray this process already runs (a notebook, a test session) is used as it is and left
    # running; otherwise the job starts (or connects to) its own and shuts it down at the end.
    owns_ray = not ray.is_initialized()
    # A job submitted to a cluster (`offpg launch`, `ray job submit`, a KubeRay RayJob) finds
    # the cluster in RAY_ADDRESS.
    address = config.run.address or os.environ.get("RAY_ADDRESS", "")
    if owns_ray and address:
        ray.init(address=address, log_to_driver=True)
    elif owns_ray:
        ray.init(num_cpus=ray_cpus(config), include_dashboard=False, log_to_driver=True)
    writer = None
    progress = Progress()
    start = time.monotonic()
    reason = "stopped"
    ok = True
    solved_at: tuple[int, float] | None = None
    last_steps, last_time = 0, start
    final: dict = {}
    try:
        job.start()
        writer = tags.MetricsWriter(str(job.run_dir), purge_step=job.env_steps or None)
        writer.write_config(config.to_dict(), config.to_toml())
        print(
            f"offpg: run {job.name}: {config.env.id}, {config.run.num_actors} actor(s) x "
            f"{config.actors.num_envs} envs, learner on {job.topology.learner_device}; "
            f"TensorBoard: offpg tensorboard {job.run_dir}",
            flush=True,
        )
        last_steps = job.env_steps
        pending_since = time.monotonic()
        last_replay, last_time_replay = None, time.monotonic()
        last_written = -1
        while True:
            _wait_for_poll(job, config)
            job.poll_actors()
            learner = job.drain_learner()
            if learner is None:  # being restarted by Ray
                continue
            if learner["error"]:
                reason, ok = f"learner failed: {learner['error']}", False
                break
            job.version = learner["version"]
            replay = ray.get(job.topology.replay.stats.remote(), timeout=topology.CALL_TIMEOUT)
            job.check_replay(replay)
            now = time.monotonic()
            steps = job.env_steps
            rate = (steps - last_steps) / max(now - last_time, 1e-9)
            last_steps, last_time = steps, now
            summary = tags.summarise_steps(learner["steps"])
            mean_return = sum(job.returns) / len(job.returns) if job.returns else float("nan")
            # One point per env step at most: while the actors stall (a replay restart blocks
            # their inserts) the x-axis does not move, and a second point there would duplicate.
            write = steps > last_written
            last_written = max(last_written, steps)
            if write:
                writer.write(
                    steps,
                    {
                        tags.EPISODE_RETURN: mean_return,
                        tags.EPISODE_LENGTH: (
                            sum(job.lengths) / len(job.lengths) if job.lengths else float("nan")
                        ),
                        tags.ENV_STEPS_PER_S: rate,
                        tags.LEARNER_SAMPLES_PER_S: summary.samples / config.run.log_every,
                        tags.LEARNER_VERSION: job.version,
                        tags.SKIPPED_STEPS: summary.skipped,
                        tags.REPLAY_SIZE: replay["size_fragments"],
                        tags.REPLAY_INSERTED: replay["inserted"],
                        tags.REPLAY_SAMPLED: replay["sampled"],
                        tags.REPLAY_EVICTED: replay["evicted"],
                        tags.REPLAY_REJECTED: sum(replay["rejected"].values()),
                        tags.REPLAY_STALE: replay["dropped_stale"],
                        tags.ACTORS_COUNT: len(job.topology.actors) - len(job.pending),
                        tags.ACTORS_PENDING: len(job.pending),
                        tags.ACTORS_RESTARTS: job.restarts,
                        tags.ACTORS_ENV_ERRORS: job.env_errors,
                        tags.ACTORS_INVALID: job.invalid_fragments,
                        tags.REPLAY_RESTARTS: job.replay_restarts,
                        tags.REPLAY_LOST: job.lost_fragments,
                        tags.LEARNER_RESTARTS: job.learner_restarts,
                    },
                    summary,
                )
            lag = summary.scalars.get(tags.LAG_MEAN, float("nan"))
            progress.show(
                f"{steps:>12,} steps  {rate:>9,.0f}/s  return {mean_return:7.1f}  "
                f"v{job.version:<6} lag {lag:5.1f}  actors {len(job.topology.actors)}"
                + (f" ({len(job.pending)} pending)" if job.pending else "")
            )
            orders = job.publish(
                job.status(
                    env_steps_per_s=rate,
                    return_mean=mean_return,
                    policy_lag_mean=lag,
                    policy_lag_max=summary.scalars.get(tags.LAG_MAX, float("nan")),
                    learner_samples_per_s=summary.samples / config.run.log_every,
                    replay=_replay_status(replay, last_replay, now - last_time_replay),
                    last_checkpoint=learner.get("last_checkpoint"),
                    wall_s=now - start,
                    max_env_steps=config.run.max_env_steps,
                )
            )
            last_replay, last_time_replay = replay, now
            if on_poll is not None and on_poll(job):
                reason = "stopped by on_poll"
                break
            if orders is not None and orders.stop:
                reason = orders.stop_reason or "stop requested"
                break
            if orders is not None and orders.desired_actors != len(job.topology.actors):
                print(
                    f"\noffpg: scaling from {len(job.topology.actors)} to "
                    f"{orders.desired_actors} actor(s)",
                    file=sys.stderr,
                )
                job.scale(orders.desired_actors)
            free = ray.available_resources().get("CPU", 0) if job.pending else 0.0
            # Only actors the cluster has no room for are "pending"; others are just starting.
            if (
                job.pending
                and free < config.actors.num_cpus
                and now - pending_since > PENDING_NOTICE_S
            ):
                print(
                    f"\noffpg: {len(job.pending)} actor(s) pending: each needs "
                    f"{config.actors.num_cpus} CPU, the cluster has {free:g} free; they start "
                    "when resources appear",
                    file=sys.stderr,
                )
                pending_since = now
            if _solved(job, config.run.target_return):
                solved_at = (steps, now - start)
                reason = f"target return {config.run.target_return:g} reached"
                break
            if steps >= config.run.max_env_steps:
                reason = "env-step budget reached"
                break
    except KeyboardInterrupt:
        reason = "interrupted"
    finally:
        progress.done()
        try:
            if job.topology is not None:
                final = job.stop()
        finally:
            if writer is not None:
                writer.close()
            if job.controller is not None:
                _finish_controller(job, reason, final)
            if owns_ray:
                ray.shutdown()
    wall = time.monotonic() - start
    summary = RunSummary(
        run_dir=str(job.run_dir),
        env_steps=job.env_steps,
        wall_s=wall,
        learner_version=int(final.get("version", job.version)),
        episodes=job.episodes,
        return_mean=(sum(job.returns) / len(job.returns)) if job.returns else float("nan"),
        solved=solved_at is not None,
        solved_at_env_steps=solved_at[0] if solved_at else None,
        solved_at_s=solved_at[1] if solved_at else None,
        stop_reason=reason,
        checkpoint=final.get("checkpoint"),
        actor_restarts=job.restarts,
        ok=ok,
        replay_restarts=job.replay_restarts,
        learner_restarts=job.learner_restarts,
        lost_fragments=job.lost_fragments,
    )
    print(summary.line(), flush=True)
    if job.run_dir.is_dir():
        (job.run_dir / "summary.json").write_text(json.dumps(dataclasses.asdict(summary), indent=1))
    return summary
