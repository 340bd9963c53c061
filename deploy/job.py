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
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import ray

from actors.envs import probe_spaces
from deploy import metrics as tags
from deploy import topology
from deploy.config import ConfigError, JobConfig
from learner.policy import PolicySpec

#: Episodes the target return is averaged over (CartPole-v1's "solved" definition).
RETURN_WINDOW = 100
#: Seconds to wait for actors to start before saying they are pending, and why.
PENDING_NOTICE_S = 10.0


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
            f"episodes, {solved}; logs in {self.run_dir}"
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
        self.snapshot_path = self.run_dir / "replay.snapshot"
        if config.run.resume and not self.checkpoint_dir.is_dir():
            raise ConfigError("run.resume", f"no checkpoints to resume in {self.checkpoint_dir}")
        if not config.run.resume and self.run_dir.exists():
            raise ConfigError("run.name", f"{self.run_dir} exists: add --resume or pick a new name")
        obs_space, action_space = probe_spaces(config.env)
        network = None if config.policy.network == "auto" else config.policy.network
        self.spec = PolicySpec.from_spaces(
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

    # -- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.toml").write_text(cfg.to_toml())
        # The replay service snapshots into the run directory (periodically when
        # replay.snapshot_every is set, and at the end); a resumed run restores from there.
        replay_cfg = dataclasses.replace(cfg.replay, snapshot_path=str(self.snapshot_path))
        replay = topology.start_replay(replay_cfg)
        store = topology.start_store()
        learner = topology.start_learner(
            self.spec, cfg.learner, str(self.checkpoint_dir), replay, store, cfg.run.resume
        )
        info = ray.get(learner.start.remote(), timeout=topology.CALL_TIMEOUT * 5)
        self.version = info["version"]
        if info["restored"] is not None:
            self.env_steps_base = int(info["counters"].get("env_steps", 0))
        self.topology = topology.Topology(replay, store, learner, {}, info["device"])
        self.scale(cfg.run.num_actors)

    def scale(self, num_actors: int) -> None:
        """Grow or shrink the actor fleet; removed actors send their last fragment first."""
        topo = self.topology
        assert topo is not None
        while len(topo.actors) > num_actors:
            actor_id = max(topo.actors)
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
        try:
            final = ray.get(handle.stop.remote(), timeout=topology.CALL_TIMEOUT)
            self._absorb(actor_id, final)
        except (ray.exceptions.RayError, TimeoutError):
            pass
        self._forget(actor_id)
        ray.kill(handle, no_restart=True)

    def _absorb(self, actor_id: int, stats: dict) -> None:
        self.actor_steps[actor_id] = int(stats["env_steps"])
        self.returns.extend(float(r) for r in stats["episode_returns"])
        self.lengths.extend(float(n) for n in stats["episode_lengths"])
        self.episodes += len(stats["episode_returns"])
        self.actor_env_errors[actor_id] = int(stats["env_errors"])

    @property
    def env_steps(self) -> int:
        return self.env_steps_base + sum(self.actor_steps.values())

    @property
    def env_errors(self) -> int:
        return self.env_errors_base + sum(self.actor_env_errors.values())

    def _forget(self, actor_id: int) -> None:
        """Move a removed actor's counters into the bases, so totals never go backwards."""
        self.env_steps_base += self.actor_steps.pop(actor_id, 0)
        self.env_errors_base += self.actor_env_errors.pop(actor_id, 0)

    def poll_actors(self) -> None:
        """Collect actor stats; restart actors that died; note the ones still pending."""
        topo = self.topology
        refs = {actor_id: h.stats.remote() for actor_id, h in topo.actors.items()}
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

    def stop(self) -> dict:
        """Stop actors (last fragments sent), then the learner (final checkpoint), snapshot."""
        topo = self.topology
        for actor_id in sorted(topo.actors):
            self._retire(actor_id, topo.actors.pop(actor_id))
        final = ray.get(
            topo.learner.stop.remote({"env_steps": self.env_steps}),
            timeout=topology.CALL_TIMEOUT * 2,
        )
        ray.get(topo.replay.snapshot.remote(str(self.snapshot_path)), timeout=topology.CALL_TIMEOUT)
        return final


def train(config: JobConfig) -> RunSummary:
    """Run a training job to its budget, its target or Ctrl-C; see the module docstring."""
    job = Job(config)
    # A Ray this process already runs (a notebook, a test session) is used as it is and left
    # running; otherwise the job starts (or connects to) its own and shuts it down at the end.
    owns_ray = not ray.is_initialized()
    if owns_ray and config.run.address:
        ray.init(address=config.run.address, log_to_driver=True)
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
        while True:
            time.sleep(config.run.log_every)
            job.poll_actors()
            learner = ray.get(
                job.topology.learner.drain.remote({"env_steps": job.env_steps}),
                timeout=topology.CALL_TIMEOUT,
            )
            if learner["error"]:
                reason, ok = f"learner failed: {learner['error']}", False
                break
            job.version = learner["version"]
            replay = ray.get(job.topology.replay.stats.remote(), timeout=topology.CALL_TIMEOUT)
            now = time.monotonic()
            steps = job.env_steps
            rate = (steps - last_steps) / max(now - last_time, 1e-9)
            last_steps, last_time = steps, now
            summary = tags.summarise_steps(learner["steps"])
            mean_return = sum(job.returns) / len(job.returns) if job.returns else float("nan")
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
                },
                summary,
            )
            lag = summary.scalars.get(tags.LAG_MEAN, float("nan"))
            progress.show(
                f"{steps:>12,} steps  {rate:>9,.0f}/s  return {mean_return:7.1f}  "
                f"v{job.version:<6} lag {lag:5.1f}  actors {len(job.topology.actors)}"
                + (f" ({len(job.pending)} pending)" if job.pending else "")
            )
            if job.pending and now - pending_since > PENDING_NOTICE_S:
                free = ray.available_resources().get("CPU", 0)
                print(
                    f"\noffpg: {len(job.pending)} actor(s) pending: each needs "
                    f"{config.actors.num_cpus} CPU, the cluster has {free:g} free; they start "
                    "when resources appear",
                    file=sys.stderr,
                )
                pending_since = now
            if (
                config.run.target_return is not None
                and len(job.returns) >= RETURN_WINDOW
                and mean_return >= config.run.target_return
            ):
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
    )
    print(summary.line(), flush=True)
    return summary
