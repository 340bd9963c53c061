"""What a job tells the world: TensorBoard points, the progress line, the controller's status,
and the `RunSummary` at the end.

`Reporter.record` takes every poll of the job and writes a TensorBoard point when one is due
(`deploy.points`: fine enough to show what happened); `Reporter.status`, every `run.log_every`,
writes the histograms and shows the progress line from the same numbers, and returns the status
the driver (`deploy.job.train`) publishes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray

from deploy import metrics as tags
from deploy.fleet import RETURN_WINDOW
from deploy.points import REPLAY_RATES, PointClock, Sample, Window
from learner.metrics import StepMetrics

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
    #: Each learner rank's `{"rank", "device", "node"}` (`learner.num_learners`).
    learners: list[dict[str, Any]] = dataclasses.field(default_factory=list)
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
            f"episodes, {solved}; logs in {self.run_dir}" + self._faults() + self._ranks()
        )

    def _ranks(self) -> str:
        if len(self.learners) < 2:
            return ""
        return f"; {len(self.learners)} learners: " + learner_ranks(self.learners)

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
        learners=list(job.placement.get("learners", [])),
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
    """Takes each poll of a started job: writes a TensorBoard point when one is due
    (`deploy.points`), and at `run.log_every` the histograms, the progress line and the status
    `offpg status` shows."""

    def __init__(self, job: Job, started_at: float):
        config = job.config
        self._job = job
        self._started_at = started_at
        self._writer = tags.MetricsWriter(str(job.run_dir), purge_step=job.env_steps or None)
        self._writer.write_config(config)
        self._progress = Progress()
        now = time.monotonic()
        self.clock = PointClock(config.run.max_env_steps, job.env_steps, now)
        self._window = Window()
        self._steps: list[StepMetrics] = []  # learner steps since the last point
        self._histogram_steps: list[StepMetrics] = []  # ... since the last histograms
        self._learner_samples = 0
        self._replay: dict[str, Any] = {}
        self._device: dict[str, float] = {}
        #: The scalars of the last point (the progress line and the status read them).
        self.last: dict[str, float] = {}
        #: Env steps and seconds since the start at the last `record`.
        self.env_steps, self.wall_s = job.env_steps, 0.0
        print(
            f"offpg: run {job.name}: {config.env.id}, {config.run.num_actors} actor(s) x "
            f"{config.actors.num_envs} envs, "
            + (f"{n} learners" if (n := config.learner.num_learners) > 1 else "learner")
            + f" on {job.topology.learner_device}; "
            f"TensorBoard: offpg tensorboard {job.run_dir}",
            flush=True,
        )

    def record(self, learner: dict[str, Any] | None, replay: dict[str, Any], poll_s: float) -> None:
        """Take one poll (the learner's `drain()` answer if one came back, the replay
        service's newest `stats()`, and what the poll cost); write a point when one is due."""
        job, now = self._job, time.monotonic()
        if learner is not None:
            steps = learner["steps"]
            self._steps.extend(steps)
            self._histogram_steps.extend(steps)
            self._learner_samples += sum(s.samples for s in steps if not s.skipped)
            self._device = learner.get("device_stats") or {}
        self._replay = replay
        fleet = job.fleet
        actors = {i: s.counters for i, s in fleet.state.items() if not s.pending}
        self._window.add(
            Sample(now, job.env_steps, self._learner_samples, replay_counters(replay), actors)
        )
        self.env_steps, self.wall_s = job.env_steps, now - self._started_at
        self.clock.polled(poll_s, self._window.rates().get(tags.ENV_STEPS_PER_S, 0.0))
        if self.clock.due(self.env_steps, now):
            self.write_point()

    def write_point(self) -> None:
        """Write the scalars of the learner steps since the last point and of this poll."""
        if not self._replay:
            return
        learner = tags.summarise_steps(self._steps, histograms=False)
        self._steps = []
        actors, _ = self._window.actors()
        points = {
            **tensorboard_points(self._job, learner, self._replay),
            **self._window.rates(),
            **actors,
            **learner.scalars,
            **self._device,
        }
        self._writer.scalars(self.env_steps, points)
        self.clock.written(self.env_steps, time.monotonic())
        self.last.update(points)

    def status(self, last_checkpoint: str | None) -> dict[str, Any]:
        """Every `run.log_every`: write the histograms, show the progress line; the status to
        publish to the run's controller."""
        learner = tags.summarise_steps(self._histogram_steps)
        self._histogram_steps = []
        _, actors = self._window.actors()
        self._writer.histograms(self.env_steps, {**learner.histograms, **actors})
        job, last, fleet = self._job, self.last, self._job.fleet
        rates = self._window.rates()
        rate = rates.get(tags.ENV_STEPS_PER_S, math.nan)
        lag = last.get(tags.LAG_MEAN, math.nan)
        self._progress.show(
            f"{self.env_steps:>12,} steps  {rate:>9,.0f}/s  return "
            f"{fleet.episodes.mean_return:7.1f}  v{job.version:<6} lag {lag:5.1f}  actors "
            f"{fleet.size}" + (f" ({len(fleet.pending)} pending)" if fleet.pending else "")
        )
        return running_status(
            job,
            env_steps_per_s=rate,
            return_mean=fleet.episodes.mean_return,
            policy_lag_mean=lag,
            policy_lag_max=last.get(tags.LAG_MAX, math.nan),
            acting_lag_mean=last.get(tags.ACTING_LAG_MEAN, math.nan),
            data_age_mean=last.get(tags.DATA_AGE_MEAN, math.nan),
            learner_samples_per_s=rates.get(tags.LEARNER_SAMPLES_PER_S, math.nan),
            replay=replay_status(self._replay, rates),
            last_checkpoint=last_checkpoint,
            wall_s=self.wall_s,
            max_env_steps=job.config.run.max_env_steps,
        )

    def end_progress(self) -> None:
        """End the live progress line (before the shutdown prints its own lines)."""
        self._progress.done()

    def finish(self, stop: Stop) -> None:
        """The run's last point, and the env steps at which it reached its target."""
        if self.env_steps > self.clock.last_steps:
            self.write_point()
        if stop.solved_at is not None:
            self._writer.scalars(self.env_steps, {tags.SOLVED_AT: stop.solved_at[0]})

    def close(self, ok: bool) -> None:
        """End the hparams session (success or failure) and close the event file."""
        self._writer.close(ok=ok)


def tensorboard_points(
    job: Job, learner: tags.LearnerSummary, replay: dict[str, Any]
) -> dict[str, float]:
    """The driver's own scalars of one point (the learner's are `learner.scalars`)."""
    fleet, faults = job.fleet, job.faults
    total = fleet.total()
    return {
        tags.EPISODE_RETURN: fleet.episodes.mean_return,
        tags.EPISODE_LENGTH: fleet.episodes.mean_length,
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


def replay_counters(stats: dict[str, Any]) -> dict[str, float]:
    """The cumulative replay counters `deploy.points` turns into rates."""
    return {
        **{key: stats[key] for key in ("inserted", "sampled", "evicted", "dropped_stale")},
        "rejected": sum(stats["rejected"].values()),
        "held_back": stats["insert_timeouts"],
    }


def replay_status(stats: dict[str, Any], rates: dict[str, float]) -> dict[str, Any]:
    """Replay size, counters and the insert/sample rates (per second) of the last second, over
    all shards, and each shard's size, inserts, samples and held-back inserts (`shards`)."""
    return {
        "size_fragments": stats["size_fragments"],
        "size_bytes": stats["size_bytes"],
        "inserted": stats["inserted"],
        "sampled": stats["sampled"],
        "rejected": sum(stats["rejected"].values()),
        "held_back": stats["insert_timeouts"],
        "snapshot_failures": stats["snapshot_failures"],
        "shards": stats["shards"],
        **{
            f"{key}_per_s": rates[tag]
            for key, tag in REPLAY_RATES.items()
            if tag in rates and key != "rejected"
        },
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
        "learner": {
            "version": job.version,
            "device": job.topology.learner_device,
            "ranks": job.placement.get("learners", []),
        },
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


def learner_ranks(ranks: list[dict[str, Any]]) -> str:
    """`rank 0 cuda on 10.0.0.1, rank 1 ...`: where each learner rank runs."""
    return ", ".join(f"rank {r['rank']} {r['device']} on {r['node']}" for r in ranks)


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
