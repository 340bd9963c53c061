"""When a run reached each moment of its start and its stop, in seconds since the command.

The origin is the start of the driver's process (read from /proc where there is one, so the
interpreter's own start and the imports count). Moments seen by other processes (an actor's
first env step, the learner's first step) are reported by them as wall-clock times and put on
the same axis; on one machine they share the clock, across machines they are as good as the
clocks' agreement. `RunSummary.timeline` (summary.json) holds the result; `MOMENTS` lists them in
the order a run normally passes them (components that start at once may finish in any order).
"""

from __future__ import annotations

import os
import time

#: The moments of a run, each with what it marks.
MOMENTS: dict[str, str] = {
    "train_called": "the driver's imports done and its config read: train() starts",
    "ray_started": "the embedded Ray is up (or the cluster joined)",
    "controller_ready": "the run's controller constructed",
    "store_ready": "the weight store constructed",
    "replay_ready": "the replay service constructed",
    "learner_ready": "the learner constructed and stepping (it waits for fragments)",
    "first_env_step": "the first rollout actor constructed, holding the learner's weights, and "
    "stepping its envs",
    "first_fragment": "the first fragment sent to the replay service",
    "first_learner_step": "the learner's first gradient step done",
    "stop_seen": "the driver saw a stop rule (target return, step budget, a stop order)",
    "stopped": "actors stopped, final checkpoint and replay snapshot written, logs flushed",
    "summary": "the summary printed and summary.json written",
    "exit": "the embedded Ray shut down: train() returns",
}
#: Pairs (earlier, later) that every run keeps, whatever runs concurrently.
ORDER: tuple[tuple[str, str], ...] = (
    ("train_called", "ray_started"),
    ("ray_started", "controller_ready"),
    ("ray_started", "store_ready"),
    ("ray_started", "replay_ready"),
    ("ray_started", "learner_ready"),
    ("ray_started", "first_env_step"),
    ("first_env_step", "first_fragment"),
    ("first_fragment", "first_learner_step"),
    ("stop_seen", "stopped"),
    ("stopped", "summary"),
    ("summary", "exit"),
)


def process_started() -> float:
    """Wall-clock time (`time.time()`) at which this process started; now where /proc or
    CLOCK_BOOTTIME are missing."""
    try:
        with open("/proc/self/stat") as stat:
            # Field 22 (starttime, clock ticks after boot); the command name in field 2 may hold
            # spaces, so count from the ')' that closes it (field 3 is first after it).
            fields = stat.read().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - started
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()
    return time.time() - max(age, 0.0)


class Timeline:
    """The moments of one run (`MOMENTS`), each at the earliest time it was marked (several
    actors report a first env step; the first of them counts)."""

    def __init__(self, origin: float | None = None):
        #: Wall-clock time of the command's start.
        self.origin = process_started() if origin is None else origin
        self._at: dict[str, float] = {}

    def mark(self, moment: str, at: float | None = None) -> None:
        """Note `moment` now, or at wall-clock time `at` (a time another process reported);
        a moment already noted keeps the earlier of its times."""
        if moment not in MOMENTS:
            raise KeyError(f"unknown moment {moment!r}; the moments are {', '.join(MOMENTS)}")
        seconds = (time.time() if at is None else float(at)) - self.origin
        self._at[moment] = min(seconds, self._at.get(moment, seconds))

    def __contains__(self, moment: str) -> bool:
        return moment in self._at

    def seconds(self) -> dict[str, float]:
        """Seconds since the command of each moment reached, in `MOMENTS` order."""
        return {m: round(self._at[m], 3) for m in MOMENTS if m in self._at}
