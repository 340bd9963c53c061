"""Sharded replay: one `ReplayConfig` split into `num_shards` services, and their stats merged.

A job with `replay.num_shards` = N runs N `ReplayService`s, each its own process (`deploy/`
starts them). Rollout actor i inserts into shard `i % N`; the learner keeps one sample call in
flight per shard and trains on whichever batch comes back first, so every batch comes from one
shard and each shard's rate limiter sees exactly its own inserts and samples.

How a shard's config derives from the job's (`shard_configs`):

- capacity (fragments and bytes) and `min_size_to_sample`: 1/N of the job's, rounded up;
- `samples_per_insert` and `tolerance`: the same in every shard. The ratio is per shard, so the
  learner samples each shard about as often as that shard's actors insert, and the whole replay
  keeps the job's ratio; the tolerance is in fragments of one batch, which one shard serves;
- snapshots: one file per shard, `<stem>-<k><suffix>` (`replay-0.snapshot`, ...); a single
  shard keeps the configured path, so one-shard runs read and write what they always did;
- seeds: shard k samples with `seed + k`, so shards do not draw the same sequence.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence
from pathlib import PurePath
from typing import Any

from replay.config import ReplayConfig
from replay.service import COUNTERS

#: Stats that add up over shards (counters and sizes); see `merge_stats` for the rest.
SUMMED = (
    "size_fragments",
    "size_bytes",
    "fresh_fragments",
    *COUNTERS,
    "insert_wait_seconds",
    "sample_wait_seconds",
    "snapshot_failures",
)


def snapshot_path(path: str, shard: int, num_shards: int) -> str:
    """Shard `shard`'s snapshot file: `path` itself for a single shard, else `<stem>-<k><ext>`
    next to it (`runs/x/replay.snapshot` -> `runs/x/replay-3.snapshot`)."""
    if num_shards == 1:
        return path
    p = PurePath(path)
    return str(p.with_name(f"{p.stem}-{shard}{p.suffix}"))


def shard_configs(config: ReplayConfig) -> list[ReplayConfig]:
    """The config of each of `config.num_shards` shards (see the module docstring); each is a
    one-shard `ReplayConfig`."""
    n = config.num_shards
    return [
        dataclasses.replace(
            config,
            num_shards=1,
            capacity_fragments=math.ceil(config.capacity_fragments / n),
            capacity_bytes=math.ceil(config.capacity_bytes / n),
            min_size_to_sample=math.ceil(config.min_size_to_sample / n),
            snapshot_path=(
                snapshot_path(config.snapshot_path, k, n) if config.snapshot_path else None
            ),
            seed=None if config.seed is None else config.seed + k,
        )
        for k in range(n)
    ]


def merge_stats(shards: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One replay's stats from its shards' `ReplayService.stats()` dicts: counters and sizes
    summed, rejections and histograms summed by key, the lag mean weighted by samples and its
    max the largest; `shards` keeps each shard's size, inserts and samples, in shard order."""
    merged: dict[str, Any] = {key: sum(s[key] for s in shards) for key in SUMMED}
    for key in ("rejected", "times_sampled"):
        merged[key] = dict(sum((Counter(s[key]) for s in shards), Counter()))
    sampled = merged["sampled"]
    lag_sum = sum((s["lag"]["mean"] or 0.0) * s["sampled"] for s in shards)
    maxima = [s["lag"]["max"] for s in shards if s["lag"]["max"] is not None]
    merged["lag"] = {
        "mean": lag_sum / sampled if sampled else None,
        "max": max(maxima) if maxima else None,
        "histogram": dict(sum((Counter(s["lag"]["histogram"]) for s in shards), Counter())),
    }
    merged["shards"] = [
        {key: s[key] for key in ("size_fragments", "inserted", "sampled", "insert_timeouts")}
        for s in shards
    ]
    return merged
