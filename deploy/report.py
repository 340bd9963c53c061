"""What a job tells the world: TensorBoard points, the progress line, the controller's status,
and the `RunSummary` at the end.

`Reporter.record` turns one poll of the job into all three live outputs at once, so they always
show the same numbers; the driver (`deploy.job.train`) publishes the status it returns.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from deploy import metrics as tags
from deploy.fleet import RETURN_WINDOW

if TYPE_CHECKING:
    from deploy.job import Job


@dataclasses.dataclass
class RunSummary:
    """What a finished run reports (also printed at the end, and saved as summary.json)."""

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
    #: Seconds since the command of each moment of the run (`deploy.timeline.MOMENTS`).
    timeline: dict[str, float] = dataclasses.field(default_factory=dict)

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

    def timeline_line(self) -> str:
        """Where the seconds before the first learner step and after the stop went."""
        names = {
            "ray_started": "Ray up",
            "learner_ready": "learner",
            "first_env_step": "first env step",
            "first_learner_step": "first learner step",
            "stop_seen": "stop seen",
            "stopped": "stopped",
        }
        moments = [
            f"{text} {self.timeline[m]:.1f}" for m, text in names.items() if m in self.timeline
        ]
        return "offpg: seconds since the command: " + ", ".join(moments)

    def save(self, run_dir: Path) -> None:
        """Print the summary and timeline lines and write summary.json into `run_dir`."""
        print(self.line(), flush=True)
        if self.timeline:
            print(self.timeline_line(), flush=True)
        self.write(run_dir)

    def write(self, run_dir: Path) -> None:
        """Write summary.json into `run_dir` (when it exists)."""
        if run_dir.is_dir():
            (run_dir / "summary.json").write_text(json.dumps(dataclasses.asdict(self), indent=1))


@dataclasses.dataclass(frozen=True)
class Stop:
    """Why a run ended, and whether and when it reached its target return."""

    reason: str
    ok: bool = True
    solved_at: tuple[int, float] | None = None  # (env steps, seconds since the start)


def summarise(job: Job, stop: Stop, final: dict[str, Any], wall_s: float) -> RunSummary:
    """The run's summary from the job's counters and the learner's `final` stop answer."""
    fleet, solved_at = job.fleet, stop.solved_at
    return RunSummary(
        run_dir=str(job.run_dir),
        env_steps=job.env_steps,
        wall_s=wall_s,
        learner_version=int(final.get("version", job.version)),
        episodes=fleet.episodes.count if fleet is not None else 0,
        return_mean=fleet.episodes.mean_return if fleet is not None else float("nan"),
        solved=solved_at is not None,
        solved_at_env_steps=solved_at[0] if solved_at else None,
        solved_at_s=solved_at[1] if solved_at else None,
        stop_reason=stop.reason,
        checkpoint=final.get("checkpoint"),
        actor_restarts=fleet.restarts if fleet is not None else 0,
        ok=stop.ok,
        replay_restarts=job.faults.replay_restarts,
        learner_restarts=job.faults.learner_restarts,
        lost_fragments=job.faults.lost_fragments,
        timeline=job.timeline.seconds(),
    )


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


class Reporter:
    """Writes each poll of a started job to TensorBoard and the progress line, and builds the
    status `offpg status` shows; remembers the previous poll for the rates."""

    def __init__(self, job: Job, started_at: float):
        config = job.config
        self._job = job
        self._log_every = config.run.log_every
        self._started_at = started_at
        self._writer = tags.MetricsWriter(str(job.run_dir), purge_step=job.env_steps or None)
        self._writer.write_config(config.to_dict(), config.to_toml())
        self._progress = Progress()
        self._last_steps, self._last_time = job.env_steps, started_at
        self._last_replay: dict[str, Any] | None = None
        self._last_written = -1
        #: Env steps and seconds since the start at the last `record`.
        self.env_steps, self.wall_s = job.env_steps, 0.0
        print(
            f"offpg: run {job.name}: {config.env.id}, {config.run.num_actors} actor(s) x "
            f"{config.actors.num_envs} envs, learner on {job.topology.learner_device}; "
            f"TensorBoard: offpg tensorboard {job.run_dir}",
            flush=True,
        )

    def record(self, learner: dict[str, Any], replay: dict[str, Any]) -> dict[str, Any]:
        """Report one poll (the learner's `drain()` and the replay service's `stats()`);
        returns the status to publish to the run's controller."""
        job, now = self._job, time.monotonic()
        steps = job.env_steps
        rate = (steps - self._last_steps) / max(now - self._last_time, 1e-9)
        summary = tags.summarise_steps(learner["steps"])
        # One point per env step at most: while the actors stall (a replay restart blocks
        # their inserts) the x-axis does not move, and a second point there would duplicate.
        if steps > self._last_written:
            points = tensorboard_points(job, rate, summary, self._log_every, replay)
            self._writer.write(steps, points, summary)
            self._last_written = steps
        lag = summary.scalars.get(tags.LAG_MEAN, float("nan"))
        fleet = job.fleet
        self._progress.show(
            f"{steps:>12,} steps  {rate:>9,.0f}/s  return {fleet.episodes.mean_return:7.1f}  "
            f"v{job.version:<6} lag {lag:5.1f}  actors {fleet.size}"
            + (f" ({len(fleet.pending)} pending)" if fleet.pending else "")
        )
        status = running_status(
            job,
            env_steps_per_s=rate,
            return_mean=fleet.episodes.mean_return,
            policy_lag_mean=lag,
            policy_lag_max=summary.scalars.get(tags.LAG_MAX, float("nan")),
            learner_samples_per_s=summary.samples / self._log_every,
            replay=replay_status(replay, self._last_replay, now - self._last_time),
            last_checkpoint=learner.get("last_checkpoint"),
            wall_s=now - self._started_at,
            max_env_steps=job.config.run.max_env_steps,
        )
        self._last_steps, self._last_time, self._last_replay = steps, now, replay
        self.env_steps, self.wall_s = steps, now - self._started_at
        return status

    def end_progress(self) -> None:
        """End the live progress line (before the shutdown prints its own lines)."""
        self._progress.done()

    def close(self) -> None:
        self._writer.close()


def tensorboard_points(
    job: Job,
    env_steps_per_s: float,
    learner: tags.LearnerSummary,
    seconds: float,
    replay: dict[str, Any],
) -> dict[str, float]:
    """The driver's scalars of one poll; `learner` summarises the learner steps of the last
    `seconds` (its own scalars and histograms are written with it, by `MetricsWriter`)."""
    fleet, faults = job.fleet, job.faults
    total = fleet.total()
    return {
        tags.EPISODE_RETURN: fleet.episodes.mean_return,
        tags.EPISODE_LENGTH: fleet.episodes.mean_length,
        tags.ENV_STEPS_PER_S: env_steps_per_s,
        tags.LEARNER_SAMPLES_PER_S: learner.samples / seconds,
        tags.LEARNER_VERSION: job.version,
        tags.SKIPPED_STEPS: learner.skipped,
        tags.REPLAY_SIZE: replay["size_fragments"],
        tags.REPLAY_INSERTED: replay["inserted"],
        tags.REPLAY_SAMPLED: replay["sampled"],
        tags.REPLAY_EVICTED: replay["evicted"],
        tags.REPLAY_REJECTED: sum(replay["rejected"].values()),
        tags.REPLAY_STALE: replay["dropped_stale"],
        tags.ACTORS_COUNT: fleet.size - len(fleet.pending),
        tags.ACTORS_PENDING: len(fleet.pending),
        tags.ACTORS_RESTARTS: fleet.restarts,
        tags.ACTORS_ENV_ERRORS: total.env_errors,
        tags.ACTORS_INVALID: total.invalid,
        tags.REPLAY_RESTARTS: faults.replay_restarts,
        tags.REPLAY_LOST: faults.lost_fragments,
        tags.LEARNER_RESTARTS: faults.learner_restarts,
        tags.REPLAY_SNAPSHOT_FAILURES: replay["snapshot_failures"],
        tags.REPLAY_HELD_BACK: replay["insert_timeouts"],
        tags.ACTORS_BACKPRESSURE_S: total.backpressure_s,
        tags.DRIVER_POLL_MS: job.poll_ms,
        **shard_points(replay["shards"]),
    }


def shard_points(shards: list[dict[str, Any]]) -> dict[str, float]:
    """Each replay shard's size, inserts and samples (nothing for a single shard: the totals
    say it all)."""
    if len(shards) < 2:
        return {}
    return {
        tags.shard_tag(k, name): shard[key]
        for k, shard in enumerate(shards)
        for name, key in (
            ("size", "size_fragments"),
            ("inserted", "inserted"),
            ("sampled", "sampled"),
        )
    }


def replay_status(now: dict, before: dict | None, seconds: float) -> dict[str, Any]:
    """Replay size and insert/sample rates (per second) since the last poll, over all shards,
    and each shard's size, inserts, samples and held-back inserts (`shards`)."""
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
        "held_back": now["insert_timeouts"],
        "snapshot_failures": now["snapshot_failures"],
        "shards": now["shards"],
        **rates,
    }


def running_status(job: Job, **interval: Any) -> dict[str, Any]:
    """What `offpg status` shows: the job's counters plus this poll's `interval` values."""
    fleet, actors = job.fleet, job.config.actors
    pending = fleet.pending
    return {
        "run": job.name,
        "state": "running",
        "env_id": job.config.env.id,
        "actors": {
            "running": fleet.size - len(pending),
            "pending": len(pending),
            "restarted": fleet.restarts,
            "ids": sorted(fleet.state),
            "pending_ids": sorted(pending),
            "num_cpus_each": job.config.run.actor_cpus,
            "num_envs_each": actors.num_envs,
            "by_node": fleet.by_node(),
        },
        "env_steps": job.env_steps,
        "env_errors": fleet.total().env_errors,
        "backpressure_s": fleet.total().backpressure_s,
        "driver_poll_ms": job.poll_ms,
        "episodes": fleet.episodes.count,
        "learner": {"version": job.version, "device": job.topology.learner_device},
        "placement": job.placement,
        "cluster": {
            "cpus_free": ray.available_resources().get("CPU", 0.0),
            "cpus_total": ray.cluster_resources().get("CPU", 0.0),
        },
        "run_dir": str(job.run_dir.resolve()),
        "tensorboard": f"offpg tensorboard {job.run_dir.resolve()}",
        "updated_at": time.time(),
        **interval,
    }


def stopped_status(job: Job, reason: str, final: dict[str, Any]) -> dict[str, Any]:
    """The last status of a run: how it ended (what `offpg stop` waits for)."""
    return {
        "run": job.name,
        "state": "stopped",
        "stop_reason": reason,
        "env_steps": job.env_steps,
        "learner": {"version": int(final.get("version", job.version))},
        "last_checkpoint": final.get("checkpoint"),
        "run_dir": str(job.run_dir.resolve()),
    }
