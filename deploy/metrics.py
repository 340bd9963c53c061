"""TensorBoard tags of the driver, and the writer that turns polled stats into points.

The x-axis of every scalar is the environment-step count, so runs with different actor counts
or learner speeds compare on sample efficiency.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from learner.metrics import (
    ESS,
    GRAD_NORM,
    LAG_HIST,
    LAG_MAX,
    LAG_MEAN,
    LOG_RHO_HIST,
    LOSS_ENTROPY,
    LOSS_POLICY,
    LOSS_VALUE,
    LR,
    RHO_CLIPPED,
    RHO_MEAN,
    StepMetrics,
)

# The learner's tags (its `StepMetrics.scalars()` and `histograms()`) are defined in
# `learner.metrics`; these are the driver's own.
EPISODE_RETURN = "episode/return_mean"
EPISODE_LENGTH = "episode/length_mean"
ENV_STEPS_PER_S = "throughput/env_steps_per_s"
LEARNER_SAMPLES_PER_S = "throughput/learner_samples_per_s"
LEARNER_VERSION = "learner/version"
SKIPPED_STEPS = "learner/skipped_steps"
REPLAY_SIZE = "replay/size"
REPLAY_INSERTED = "replay/inserted"
REPLAY_SAMPLED = "replay/sampled"
REPLAY_EVICTED = "replay/evicted"
REPLAY_REJECTED = "replay/rejected"
REPLAY_STALE = "replay/dropped_stale"
ACTORS_COUNT = "actors/count"
ACTORS_PENDING = "actors/pending"
ACTORS_RESTARTS = "actors/restarts"
ACTORS_ENV_ERRORS = "actors/env_errors"
ACTORS_INVALID = "actors/invalid_fragments"  # refused by the codec at the actor (NaN rewards)
# Faults recovered (deploy/job.py): restarts of the replay service and of the learner, and the
# acknowledged fragments a replay restart lost (inserted after its last snapshot).
REPLAY_RESTARTS = "replay/restarts"
REPLAY_LOST = "replay/lost_fragments"
LEARNER_RESTARTS = "learner/restarts"
#: Periodic replay snapshots that failed (each logged; the next one is tried as usual).
REPLAY_SNAPSHOT_FAILURES = "replay/snapshot_failures"
# Backpressure: inserts the replay's rate limiter held back (each sent again by its actor), and
# the seconds the actors waited for their inserts to settle, summed over actors (cumulative).
REPLAY_HELD_BACK = "replay/held_back"
ACTORS_BACKPRESSURE_S = "actors/backpressure_s"
#: Milliseconds the driver spent on its last poll (actors, learner, replay shards).
DRIVER_POLL_MS = "driver/poll_ms"


def shard_tag(shard: int, name: str) -> str:
    """A replay shard's own tag (`replay/shard_3/size`), written when there are several."""
    return f"replay/shard_{shard}/{name}"


#: Tags every run must write (the integration test reads them back).
REQUIRED_TAGS: tuple[str, ...] = (
    EPISODE_RETURN,
    EPISODE_LENGTH,
    ENV_STEPS_PER_S,
    LEARNER_SAMPLES_PER_S,
    LAG_MEAN,
    LAG_MAX,
    RHO_MEAN,
    RHO_CLIPPED,
    ESS,
    LOSS_POLICY,
    LOSS_VALUE,
    LOSS_ENTROPY,
    GRAD_NORM,
    LR,
    REPLAY_SIZE,
    REPLAY_INSERTED,
    REPLAY_SAMPLED,
    REPLAY_EVICTED,
    REPLAY_REJECTED,
    ACTORS_COUNT,
    ACTORS_RESTARTS,
)
REQUIRED_HISTOGRAMS: tuple[str, ...] = (LAG_HIST, LOG_RHO_HIST)


@dataclasses.dataclass
class LearnerSummary:
    """The learner's step metrics of one logging interval, reduced."""

    steps: int
    samples: int
    skipped: int
    scalars: dict[str, float]  # tag -> mean over the interval's steps (max for the max lag)
    histograms: dict[str, np.ndarray]  # tag -> values of all the interval's steps


def summarise_steps(steps: Sequence[StepMetrics]) -> LearnerSummary:
    good = [s for s in steps if not s.skipped]
    rows = [s.scalars() for s in good]
    scalars = {}
    for tag in rows[0] if rows else ():
        values = [r[tag] for r in rows if math.isfinite(r[tag])]
        if values:
            scalars[tag] = float(max(values) if tag == LAG_MAX else np.mean(values))
    histograms: dict[str, list[np.ndarray]] = {}
    for s in good:
        for tag, values in s.histograms().items():
            histograms.setdefault(tag, []).append(np.asarray(values).ravel())
    return LearnerSummary(
        steps=len(good),
        samples=sum(s.samples for s in good),
        skipped=len(steps) - len(good),
        scalars=scalars,
        histograms={tag: np.concatenate(v) for tag, v in histograms.items()},
    )


class MetricsWriter:
    """Writes one interval's worth of stats to TensorBoard event files in `run_dir`."""

    def __init__(self, run_dir: str, purge_step: int | None = None):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step drops events at or after it, so a resumed run never writes a step twice.
        self._writer = SummaryWriter(run_dir, purge_step=purge_step, flush_secs=10)

    def write_config(self, config: Mapping[str, Mapping[str, Any]], text: str) -> None:
        from torch.utils.tensorboard.summary import hparams

        self._writer.add_text("config", f"```toml\n{text}\n```", 0)
        flat = {
            f"{section}.{key}": (
                value if isinstance(value, (int, float, str, bool)) else json.dumps(value)
            )
            for section, values in config.items()
            for key, value in values.items()
            if value is not None
        }
        exp, ssi, sei = hparams(flat, {EPISODE_RETURN: 0.0})
        for item in (exp, ssi, sei):
            self._writer.file_writer.add_summary(item)

    def write(self, step: int, values: Mapping[str, float], learner: LearnerSummary | None) -> None:
        for tag, value in values.items():
            if value is not None and math.isfinite(value):
                self._writer.add_scalar(tag, value, step)
        if learner is None:
            return
        for tag, value in learner.scalars.items():
            self._writer.add_scalar(tag, value, step)
        for tag, values in learner.histograms.items():
            if values.size:
                self._writer.add_histogram(tag, values, step)

    def close(self) -> None:
        self._writer.flush()
        self._writer.close()
