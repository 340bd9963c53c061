"""`ReplayConfig`: the replay policy of a `ReplayService`, explicit and validated up front.

Sampler, capacity, rate limiter, staleness bound, snapshots and the named recipes
(`fifo_queue`, `uniform_replay`, `mixed_replay`); `replay.service` says what each does.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from replay import codec
from replay.fields import FieldError, check, setting
from replay.limiter import RateLimiter

#: Upper bounds of the replay's sizes (a fragment count, a seed).
MAX_FRAGMENTS = 10_000_000
MAX_SEED = 2**32 - 1
#: Longest wait between snapshots, in seconds (a day).
MAX_SNAPSHOT_EVERY = 86_400.0
#: Most replay shards a job may split its replay into (each is its own process).
MAX_SHARDS = 256


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
    """The replay policy. Each field's `doc` metadata is its CLI help."""

    sampler: Literal["fifo", "uniform", "mixed"] = setting(
        "fifo",
        "fifo: each fragment once, oldest first (IMPALA queue); uniform: uniform replay; "
        "mixed: replay_fraction of each batch replayed uniformly, the rest fresh",
    )
    replay_fraction: float = setting(
        0.0, "mixed only: fraction of each batch drawn from already-sampled fragments", ge=0, le=1
    )
    capacity_fragments: int = setting(
        10_000, "most fragments held; the oldest is evicted first", ge=1, le=MAX_FRAGMENTS
    )
    capacity_bytes: int = setting(
        2 * 1024**3,
        "most array bytes held (Fragment.nbytes); the oldest is evicted first",
        ge=1,
        le=2**40,
    )
    max_times_sampled: int = setting(
        0,
        "a fragment is retired after this many samples; 0 = unlimited (fifo: always 1)",
        ge=0,
        le=1_000_000,
    )
    samples_per_insert: float | None = setting(
        None, "target ratio of sampled to inserted fragments; None: no ratio limit", gt=0
    )
    tolerance: float = setting(
        0.0,
        "how many fragments sampling may run ahead of or behind the ratio before blocking",
        ge=0,
    )
    min_size_to_sample: int = setting(
        1, "sampling waits until this many fragments are held", ge=1, le=MAX_FRAGMENTS
    )
    max_staleness: int | None = setting(
        None,
        "fragments more than this many versions behind the learner are dropped",
        ge=0,
        le=10**12,
    )
    max_message_bytes: int = setting(
        codec.DEFAULT_MAX_BYTES, "insert refuses longer messages", ge=1, le=2**31 - 1
    )
    snapshot_path: str | None = setting(
        None,
        "restore from this file at start if it exists; periodic snapshots go here",
        max_len=4096,
    )
    snapshot_every: float = setting(
        0.0, "seconds between periodic snapshots; 0 = none", ge=0, le=MAX_SNAPSHOT_EVERY
    )
    seed: int | None = setting(None, "seed of the uniform sampler", ge=0, le=MAX_SEED)
    num_shards: int = setting(
        1,
        "replay services (processes) the job splits this replay into, each with 1/num_shards of "
        "the capacity and the same samples-per-insert ratio (replay.shards)",
        ge=1,
        le=MAX_SHARDS,
    )

    def __post_init__(self) -> None:
        check(self)
        if self.sampler == "mixed" and not 0.0 < self.replay_fraction < 1.0:
            raise FieldError(
                "replay_fraction",
                f"is {self.replay_fraction}: the mixed sampler needs a fraction strictly between "
                "0 and 1 (use fifo for 0, uniform for 1)",
            )
        if self.sampler != "mixed" and self.replay_fraction != 0.0:
            raise FieldError(
                "replay_fraction", f"is {self.replay_fraction}: only the mixed sampler uses it"
            )
        if self.sampler == "fifo" and self.max_times_sampled not in (0, 1):
            raise FieldError(
                "max_times_sampled",
                f"is {self.max_times_sampled}: the fifo sampler delivers each fragment exactly "
                "once, so it must be 1 (or 0, which means the same for fifo)",
            )
        if self.min_size_to_sample > self.capacity_fragments:
            raise FieldError(
                "min_size_to_sample",
                f"is {self.min_size_to_sample}, above capacity_fragments "
                f"{self.capacity_fragments}: sampling would wait forever",
            )
        self.rate_limiter()  # refuses ratio settings that could deadlock
        spi = self.samples_per_insert
        if spi is not None and self.retire_after and spi > self.retire_after:
            raise FieldError(
                "samples_per_insert",
                f"is {spi} but each fragment is sampled at most {self.retire_after} times "
                "(max_times_sampled, or fifo): fragments would be retired before the ratio lets "
                "inserts go on, and both sides would block",
            )
        if self.snapshot_every > 0 and not self.snapshot_path:
            raise FieldError("snapshot_every", "is set but snapshot_path is not: nowhere to write")
        if self.num_shards > self.capacity_fragments:
            raise FieldError(
                "num_shards",
                f"is {self.num_shards}, above capacity_fragments {self.capacity_fragments}: "
                "every shard must hold at least one fragment",
            )

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
