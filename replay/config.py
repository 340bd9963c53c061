"""`ReplayConfig`: the replay policy of a `ReplayService`, explicit and validated up front.

Sampler, capacity, rate limiter, staleness bound, snapshots and the named recipes
(`fifo_queue`, `uniform_replay`, `mixed_replay`); `replay.service` says what each does.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from replay import codec
from replay.limiter import RateLimiter


def _doc(default: object, doc: str) -> dataclasses.Field:
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
    """The replay policy. Each field's `doc` metadata is its CLI help."""

    sampler: Literal["fifo", "uniform", "mixed"] = _doc(
        "fifo",
        "fifo: each fragment once, oldest first (IMPALA queue); uniform: uniform replay; "
        "mixed: replay_fraction of each batch replayed uniformly, the rest fresh",
    )
    replay_fraction: float = _doc(
        0.0, "mixed only: fraction of each batch drawn from already-sampled fragments"
    )
    capacity_fragments: int = _doc(10_000, "most fragments held; the oldest is evicted first")
    capacity_bytes: int = _doc(
        2 * 1024**3, "most array bytes held (Fragment.nbytes); the oldest is evicted first"
    )
    max_times_sampled: int = _doc(
        0, "a fragment is retired after this many samples; 0 = unlimited (fifo: always 1)"
    )
    samples_per_insert: float | None = _doc(
        None, "target ratio of sampled to inserted fragments; None: no ratio limit"
    )
    tolerance: float = _doc(
        0.0, "how many fragments sampling may run ahead of or behind the ratio before blocking"
    )
    min_size_to_sample: int = _doc(1, "sampling waits until this many fragments are held")
    max_staleness: int | None = _doc(
        None, "fragments more than this many versions behind the learner are dropped"
    )
    max_message_bytes: int = _doc(codec.DEFAULT_MAX_BYTES, "insert refuses longer messages")
    snapshot_path: str | None = _doc(
        None, "restore from this file at start if it exists; periodic snapshots go here"
    )
    snapshot_every: float = _doc(0.0, "seconds between periodic snapshots; 0 = none")
    seed: int | None = _doc(None, "seed of the uniform sampler")

    def __post_init__(self) -> None:
        if self.sampler not in ("fifo", "uniform", "mixed"):
            raise ValueError(f"sampler is {self.sampler!r}: must be fifo, uniform or mixed")
        if self.sampler == "mixed" and not 0.0 < self.replay_fraction < 1.0:
            raise ValueError(
                f"replay_fraction is {self.replay_fraction}: the mixed sampler needs a fraction "
                "strictly between 0 and 1 (use fifo for 0, uniform for 1)"
            )
        if self.sampler != "mixed" and self.replay_fraction != 0.0:
            raise ValueError(
                f"replay_fraction is {self.replay_fraction}: only the mixed sampler uses it"
            )
        if self.capacity_fragments < 1:
            raise ValueError(f"capacity_fragments is {self.capacity_fragments}: must be >= 1")
        if self.capacity_bytes < 1:
            raise ValueError(f"capacity_bytes is {self.capacity_bytes}: must be >= 1")
        if self.max_times_sampled < 0:
            raise ValueError(f"max_times_sampled is {self.max_times_sampled}: must be >= 0")
        if self.sampler == "fifo" and self.max_times_sampled not in (0, 1):
            raise ValueError(
                f"max_times_sampled is {self.max_times_sampled}: the fifo sampler delivers each "
                "fragment exactly once, so it must be 1 (or 0, which means the same for fifo)"
            )
        if self.min_size_to_sample < 1:
            raise ValueError(f"min_size_to_sample is {self.min_size_to_sample}: must be >= 1")
        if self.min_size_to_sample > self.capacity_fragments:
            raise ValueError(
                f"min_size_to_sample is {self.min_size_to_sample}, above capacity_fragments "
                f"{self.capacity_fragments}: sampling would wait forever"
            )
        self.rate_limiter()  # refuses ratio settings that could deadlock
        spi = self.samples_per_insert
        if spi is not None and self.retire_after and spi > self.retire_after:
            raise ValueError(
                f"samples_per_insert is {spi} but each fragment is sampled at most "
                f"{self.retire_after} times (max_times_sampled, or fifo): fragments would be "
                "retired before the ratio lets inserts go on, and both sides would block"
            )
        if self.max_staleness is not None and self.max_staleness < 0:
            raise ValueError(f"max_staleness is {self.max_staleness}: must be >= 0 (or None)")
        if self.max_message_bytes < 1:
            raise ValueError(f"max_message_bytes is {self.max_message_bytes}: must be >= 1")
        if self.snapshot_every < 0:
            raise ValueError(f"snapshot_every is {self.snapshot_every}: must be >= 0")
        if self.snapshot_every > 0 and not self.snapshot_path:
            raise ValueError("snapshot_every is set but snapshot_path is not: nowhere to write")

    def rate_limiter(self) -> RateLimiter:
        """A fresh `RateLimiter` with this config's ratio, tolerance and minimum size."""
        return RateLimiter(self.samples_per_insert, self.tolerance, self.min_size_to_sample)

    @property
    def retire_after(self) -> int:
        """Samples after which a fragment is retired: 1 for fifo, else `max_times_sampled`."""
        return 1 if self.sampler == "fifo" else self.max_times_sampled

    @classmethod
    def fifo_queue(cls, capacity_fragments: int = 1_000, **overrides: object) -> ReplayConfig:
        """IMPALA's queue: each fragment once, oldest first; a full queue evicts its oldest."""
        return cls(
            sampler="fifo", capacity_fragments=capacity_fragments, max_times_sampled=1, **overrides
        )

    @classmethod
    def uniform_replay(
        cls,
        capacity_fragments: int = 10_000,
        *,
        samples_per_insert: float | None = None,
        min_size_to_sample: int = 1,
        **overrides: object,
    ) -> ReplayConfig:
        """Uniform replay; with `samples_per_insert`, a tolerance of 2 batches of 32 fragments."""
        if samples_per_insert is not None:
            overrides.setdefault("tolerance", max(64.0, (samples_per_insert + 1) / 2))
        return cls(
            sampler="uniform",
            capacity_fragments=capacity_fragments,
            samples_per_insert=samples_per_insert,
            min_size_to_sample=min_size_to_sample,
            **overrides,
        )

    @classmethod
    def mixed_replay(
        cls, replay_fraction: float = 0.5, capacity_fragments: int = 10_000, **overrides: object
    ) -> ReplayConfig:
        """IMPALA's experience replay: each batch `replay_fraction` replayed, the rest fresh."""
        return cls(
            sampler="mixed",
            replay_fraction=replay_fraction,
            capacity_fragments=capacity_fragments,
            **overrides,
        )
