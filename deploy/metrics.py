"""TensorBoard tags of the driver, and the writer that turns polled stats into points.

The x-axis of every scalar is the environment-step count, so runs with different actor counts
or learner speeds compare on sample efficiency. Each run also writes its config (as text and
as hparams: every key), and a custom-scalars layout (`LAYOUT`) that opens on the signals to
read first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from learner.metrics import (
    ACTING_LAG_HIST,
    ACTING_LAG_MAX,
    ACTING_LAG_MEAN,
    DATA_AGE_HIST,
    DATA_AGE_MAX,
    DATA_AGE_MEAN,
    ESS,
    GRAD_NORM,
    LAG_HIST,
    LAG_MAX,
    LAG_MEAN,
    LOG_RHO_HIST,
    LOSS_ENTROPY,
    LOSS_POLICY,
    LOSS_TOTAL,
    LOSS_VALUE,
    LR,
    MAX_TAGS,
    POLICY_ENTROPY,
    PUBLISH_MS,
    RHO_CLIPPED,
    RHO_MEAN,
    STEP_MS,
    WAIT_MS,
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
REPLAY_INSERTED_PER_S = "replay/inserted_per_s"
REPLAY_SAMPLED_PER_S = "replay/sampled_per_s"
REPLAY_EVICTED_PER_S = "replay/evicted_per_s"
REPLAY_REJECTED_PER_S = "replay/rejected_per_s"
REPLAY_STALE_PER_S = "replay/dropped_stale_per_s"
ACTORS_COUNT = "actors/count"
ACTORS_PENDING = "actors/pending"
ACTORS_RESTARTS = "actors/restarts"
ACTORS_ENV_ERRORS = "actors/env_errors"
ACTORS_INVALID = "actors/invalid_fragments"  # refused by the codec at the actor (NaN rewards)
# Per actor over the last second (deploy.points): the mean over actors as a scalar, the
# per-actor values as a histogram of the same name; throughput also its min and max.
ACTOR_ENV_STEPS_PER_S = "actors/env_steps_per_s"
ACTOR_ENV_STEPS_PER_S_MIN = "actors/env_steps_per_s_min"
ACTOR_ENV_STEPS_PER_S_MAX = "actors/env_steps_per_s_max"
ACTORS_INFERENCE_MS = "actors/inference_ms"  # per fragment: the policy's batched inference
ACTORS_ENV_MS = "actors/env_ms"  # per fragment: stepping the envs
ACTORS_BACKPRESSURE_MS = "actors/backpressure_ms"  # per fragment: held back by the replay
# Faults recovered (deploy/job.py): restarts of the replay service and of the learner, and the
# acknowledged fragments a replay restart lost (inserted after its last snapshot).
REPLAY_RESTARTS = "replay/restarts"
REPLAY_LOST = "replay/lost_fragments"
LEARNER_RESTARTS = "learner/restarts"
#: Periodic replay snapshots that failed (each logged; the next one is tried as usual).
REPLAY_SNAPSHOT_FAILURES = "replay/snapshot_failures"
# The learner's device, CUDA only (`DeviceStats`).
GPU_UTILIZATION = "gpu/utilization_pct"
GPU_MEMORY = "gpu/memory_allocated_mb"
GPU_MEMORY_RESERVED = "gpu/memory_reserved_mb"
GPU_MEMORY_PEAK = "gpu/memory_peak_mb"
#: Written once, when the run reaches its target return (an hparams metric).
SOLVED_AT = "run/solved_at_env_steps"
# Backpressure: inserts the replay's rate limiter held back (each sent again by its actor), and
# the seconds the actors waited for their inserts to settle, summed over actors (cumulative).
REPLAY_HELD_BACK = "replay/held_back"
REPLAY_HELD_BACK_PER_S = "replay/held_back_per_s"
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
    ACTING_LAG_MEAN,
    ACTING_LAG_MAX,
    DATA_AGE_MEAN,
    DATA_AGE_MAX,
    RHO_MEAN,
    RHO_CLIPPED,
    ESS,
    LOSS_POLICY,
    LOSS_VALUE,
    LOSS_ENTROPY,
    LOSS_TOTAL,
    POLICY_ENTROPY,
    GRAD_NORM,
    LR,
    WAIT_MS,
    STEP_MS,
    PUBLISH_MS,
    REPLAY_SIZE,
    REPLAY_INSERTED,
    REPLAY_SAMPLED,
    REPLAY_EVICTED,
    REPLAY_REJECTED,
    REPLAY_INSERTED_PER_S,
    REPLAY_SAMPLED_PER_S,
    ACTORS_COUNT,
    ACTORS_RESTARTS,
    ACTOR_ENV_STEPS_PER_S,
    ACTOR_ENV_STEPS_PER_S_MIN,
    ACTOR_ENV_STEPS_PER_S_MAX,
    ACTORS_INFERENCE_MS,
    ACTORS_ENV_MS,
    ACTORS_BACKPRESSURE_MS,
)
REQUIRED_HISTOGRAMS: tuple[str, ...] = (
    LAG_HIST,
    ACTING_LAG_HIST,
    DATA_AGE_HIST,
    LOG_RHO_HIST,
    ACTOR_ENV_STEPS_PER_S,
    ACTORS_INFERENCE_MS,
)


def _line(tag: str) -> list[Any]:
    return ["Multiline", [f"^{tag}$"]]


def _band(value: str, lower: str, upper: str) -> list[Any]:
    return ["Margin", [value, lower, upper]]


#: The custom-scalars dashboard (`offpg tensorboard` prints its address): one series per chart,
#: or a line with a band, so a chart reads at a glance; its first category holds what to read
#: first. (TensorBoard draws a category's line charts before its band charts.)
LAYOUT: dict[str, dict[str, list[Any]]] = {
    "offpg: at a glance": {
        "mean return (last 100 episodes)": _line(EPISODE_RETURN),
        "env steps / s": _line(ENV_STEPS_PER_S),
        "acting lag, versions (mean)": _line(ACTING_LAG_MEAN),
        "data age, versions (mean)": _line(DATA_AGE_MEAN),
        "importance ESS (1: on-policy)": _line(ESS),
        "loss/policy": _line(LOSS_POLICY),
        "loss/value (value_coef x value loss)": _line(LOSS_VALUE),
        "loss/entropy (-entropy_coef x entropy)": _line(LOSS_ENTROPY),
        "loss/total": _line(LOSS_TOTAL),
    },
    "offpg: staleness (mean, band up to max)": {
        "acting lag: weights' age when the data reached replay": _band(
            ACTING_LAG_MEAN, ACTING_LAG_MEAN, ACTING_LAG_MAX
        ),
        "data age: time in replay, in versions": _band(DATA_AGE_MEAN, DATA_AGE_MEAN, DATA_AGE_MAX),
        "policy lag = acting lag + data age": _band(LAG_MEAN, LAG_MEAN, LAG_MAX),
    },
    "offpg: where the time goes": {
        "learner: ms waiting for a batch": _line(WAIT_MS),
        "learner: ms per step": _line(STEP_MS),
        "learner: ms publishing weights, per step": _line(PUBLISH_MS),
        "actors: ms of inference per fragment": _line(ACTORS_INFERENCE_MS),
        "actors: ms in the envs per fragment": _line(ACTORS_ENV_MS),
        "actors: ms held back per fragment": _line(ACTORS_BACKPRESSURE_MS),
        "learner samples / s": _line(LEARNER_SAMPLES_PER_S),
        "replay: fragments inserted / s": _line(REPLAY_INSERTED_PER_S),
        "GPU utilisation, %": _line(GPU_UTILIZATION),
        "GPU memory allocated, MiB": _line(GPU_MEMORY),
        "env steps / s per actor (mean, band min to max)": _band(
            ACTOR_ENV_STEPS_PER_S, ACTOR_ENV_STEPS_PER_S_MIN, ACTOR_ENV_STEPS_PER_S_MAX
        ),
    },
}


@dataclasses.dataclass
class LearnerSummary:
    """The learner's step metrics of one interval, reduced."""

    steps: int
    samples: int
    skipped: int
    scalars: dict[str, float]  # tag -> mean over the interval's steps (max for MAX_TAGS)
    histograms: dict[str, np.ndarray]  # tag -> values of all the interval's steps


def summarise_steps(steps: Sequence[StepMetrics], histograms: bool = True) -> LearnerSummary:
    """Reduce step metrics: scalars by mean (max for `MAX_TAGS`, NaN values left out), the
    histogram arrays concatenated (only when `histograms`)."""
    good = [s for s in steps if not s.skipped]
    rows = [s.scalars() for s in good]
    scalars = {}
    for tag in rows[0] if rows else ():
        values = [r[tag] for r in rows if math.isfinite(r[tag])]
        if values:
            scalars[tag] = float(max(values) if tag in MAX_TAGS else np.mean(values))
    arrays: dict[str, list[np.ndarray]] = {}
    for s in good if histograms else ():
        for tag, values in s.histograms().items():
            arrays.setdefault(tag, []).append(np.asarray(values).ravel())
    return LearnerSummary(
        steps=len(good),
        samples=sum(s.samples for s in good),
        skipped=len(steps) - len(good),
        scalars=scalars,
        histograms={tag: np.concatenate(v) for tag, v in arrays.items()},
    )


def hparams(config: Any) -> dict[str, bool | float | str]:
    """Every key of a `JobConfig` as an hparam: `None` as "none", lists as JSON, and a key that
    may be None always as a string (so it has one type in every run, whatever its value)."""
    out: dict[str, bool | float | str] = {}
    for section in dataclasses.fields(config):
        values = getattr(config, section.name)
        hints = typing.get_type_hints(type(values))
        for field in dataclasses.fields(values):
            value = getattr(values, field.name)
            optional = type(None) in typing.get_args(hints[field.name])
            if value is None:
                value = "none"
            elif isinstance(value, (list, tuple)):
                value = json.dumps(list(value))
            elif optional or not isinstance(value, (bool, int, float, str)):
                value = str(value)
            out[f"{section.name}.{field.name}"] = value
    return out


class MetricsWriter:
    """Writes a run's points to a TensorBoard event file in `run_dir` (`deploy.events`: the
    `tensorboard` package alone, so the driver never loads torch).

    `purge_step`: the env step a resumed run goes on from; TensorBoard hides what the run
    logged before at or after it, so a resumed run never shows a step twice.
    """

    def __init__(self, run_dir: str, purge_step: int | None = None):
        from deploy import events

        self._events = events
        self._writer = events.EventWriter(run_dir, purge_step=purge_step)

    def write_config(self, config: Any) -> None:
        """The config as text and as hparams (every key; the metrics: the mean return, whose
        target the display name says, and the env steps at which the run reached it), and the
        custom-scalars layout."""
        events = self._events
        self._writer.write(events.text("config", f"```toml\n{config.to_toml()}\n```"), 0)
        target = config.run.target_return
        metrics = {
            EPISODE_RETURN: "mean return"
            + (f" (target {target:g})" if target is not None else " (no target)"),
            SOLVED_AT: "env steps to the target",
        }
        for summary in events.hparams_start(hparams(config), metrics):
            self._writer.write(summary)
        self._writer.write(events.custom_scalars(LAYOUT))

    def scalars(self, step: int, values: Mapping[str, float | None]) -> None:
        """One point of scalars at env step `step`, in one event; None and non-finite values are
        left out (`benchmarks/monitoring.py` measures its cost)."""
        summary = self._events.scalars(values)
        if summary is not None:
            self._writer.write(summary, step)

    def histograms(self, step: int, values: Mapping[str, np.ndarray]) -> None:
        """A histogram per tag at env step `step` (an array with no finite value: none)."""
        for tag, array in values.items():
            summary = self._events.histogram(tag, array)
            if summary is not None:
                self._writer.write(summary, step)

    def close(self, ok: bool = True) -> None:
        """End the hparams session (its status: success or failure) and close the file."""
        self._writer.write(self._events.hparams_end(ok))
        self._writer.close()


class DeviceStats:
    """GPU utilisation and memory of the learner's device, as TensorBoard tags; empty on CPU.

    Read in the learner's process at most every `every_s` seconds (an NVML query takes about
    a millisecond), the last reading repeated in between. Utilisation needs NVML's Python
    binding (`nvidia-ml-py`); without it only the memory is reported.
    """

    def __init__(self, device: Any, every_s: float = 1.0):
        self._device = device
        self._every_s = every_s
        self._at = -math.inf
        self._last: dict[str, float] = {}

    def read(self) -> dict[str, float]:
        if self._device.type != "cuda":
            return {}
        now = time.monotonic()
        if now - self._at < self._every_s:
            return self._last
        import torch

        mb = 2.0**20
        out = {
            GPU_MEMORY: torch.cuda.memory_allocated(self._device) / mb,
            GPU_MEMORY_RESERVED: torch.cuda.memory_reserved(self._device) / mb,
            GPU_MEMORY_PEAK: torch.cuda.max_memory_allocated(self._device) / mb,
        }
        # Without an NVML binding (or when NVML refuses), memory only.
        with contextlib.suppress(Exception):
            out[GPU_UTILIZATION] = float(torch.cuda.utilization(self._device))
        self._at, self._last = now, out
        return out
