"""replay/shards.py: how a job's replay splits into shards and how their stats add up; the
driver's per-shard restart accounting and snapshot files (deploy/replay_shards.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from deploy.job import Faults
from deploy.replay_shards import ReplayShards, stray_snapshots
from replay.service import ReplayConfig, ReplayService
from replay.shards import merge_stats, shard_configs, snapshot_path


def test_one_shard_is_the_config_itself():
    config = ReplayConfig.uniform_replay(64, samples_per_insert=4.0, snapshot_path="r.snapshot")
    assert shard_configs(config) == [config]


def test_shards_split_capacity_and_keep_the_ratio():
    config = ReplayConfig.uniform_replay(
        10,
        samples_per_insert=8.0,
        tolerance=64.0,
        min_size_to_sample=5,
        capacity_bytes=1001,
        snapshot_path="runs/x/replay.snapshot",
        seed=7,
        num_shards=4,
    )
    shards = shard_configs(config)
    # Rounded up, so the shards hold at least what the job asked for.
    assert [s.capacity_fragments for s in shards] == [3, 3, 3, 3]
    assert [s.capacity_bytes for s in shards] == [251] * 4
    assert [s.min_size_to_sample for s in shards] == [2] * 4
    assert {(s.samples_per_insert, s.tolerance, s.num_shards) for s in shards} == {(8.0, 64.0, 1)}
    assert [s.snapshot_path for s in shards] == [f"runs/x/replay-{k}.snapshot" for k in range(4)]
    assert [s.seed for s in shards] == [7, 8, 9, 10]


@pytest.mark.parametrize(
    ("path", "expected"),
    [("replay.snapshot", "replay-2.snapshot"), ("/a/b/snap", "/a/b/snap-2")],
)
def test_shard_snapshot_paths(path, expected):
    assert snapshot_path(path, 2, 3) == expected
    assert snapshot_path(path, 0, 1) == path


def test_more_shards_than_fragments_is_refused():
    with pytest.raises(ValueError, match=r"^num_shards: is 5, above capacity_fragments 4"):
        ReplayConfig(capacity_fragments=4, num_shards=5)


def test_merged_stats_add_up_the_shards(make_fragment):
    a = ReplayService(ReplayConfig.uniform_replay(seed=0))
    b = ReplayService(ReplayConfig.uniform_replay(seed=1))
    for i in range(5):
        assert (a if i < 3 else b).insert_fragment(make_fragment(fragment_id=str(i), seed=i))
    a.sample(2, learner_version=4, timeout=0)  # lag 4 each
    b.sample(1, learner_version=1, timeout=0)  # lag 1
    b.insert(b"junk")
    merged = merge_stats([a.stats(), b.stats()])
    assert (merged["size_fragments"], merged["inserted"], merged["sampled"]) == (5, 5, 3)
    assert merged["rejected"] == {"not_msgpack": 1}
    assert merged["lag"]["mean"] == pytest.approx((4 + 4 + 1) / 3)
    assert merged["lag"]["max"] == 4
    assert merged["lag"]["histogram"] == {"3-4": 2, "1": 1}
    assert merged["times_sampled"] == {"0": 2, "1": 3}
    assert [s["inserted"] for s in merged["shards"]] == [3, 2]


def _shard_stats(incarnation: str, inserted: int, restored: int = 0) -> dict:
    stats = ReplayService(ReplayConfig()).stats()
    stats.update(
        inserted=inserted,
        incarnation=incarnation,
        restored_fragments=restored,
        restore_error=None,
    )
    return stats


def test_a_restarted_shard_is_counted_with_what_it_lost(tmp_path, capsys):
    faults = Faults()
    shards = ReplayShards([None, None], tmp_path / "replay.snapshot", faults)
    # Poll 1: both shards up; shard 1 has 2 acknowledged inserts in flight.
    shards.account([_shard_stats("a", 10), _shard_stats("b", 8)], acknowledged=[10, 10])
    # Poll 2: shard 1 restarted from a snapshot of 5 inserts; its actors had 14 acknowledged.
    merged = shards.account(
        [_shard_stats("a", 12), _shard_stats("c", 5, restored=5)], acknowledged=[12, 14]
    )
    # Its offset went from 10 - 8 = 2 to 14 - 5 = 9: 7 acknowledged fragments are gone.
    assert (faults.replay_restarts, faults.lost_fragments) == (1, 7)
    assert "replay shard 1 restarted (1)" in capsys.readouterr().err
    assert merged["inserted"] == 17 and merged["incarnations"] == ["a", "c"]
    assert merged["restored_fragments"] == 5
    assert [Path(p).name for p in shards.snapshot_paths()] == [
        "replay-0.snapshot",
        "replay-1.snapshot",
    ]


def test_stray_snapshots_of_another_shard_count(tmp_path):
    base = tmp_path / "replay.snapshot"
    for name in ("replay-0.snapshot", "replay-1.snapshot", "replay-x.snapshot", "other.snapshot"):
        (tmp_path / name).write_bytes(b"")
    assert stray_snapshots(base, 2) == []
    assert [p.name for p in stray_snapshots(base, 1)] == ["replay-0.snapshot", "replay-1.snapshot"]
    assert [p.name for p in stray_snapshots(base, 3)] == []  # shard 2's file is just missing
    base.write_bytes(b"")
    assert [p.name for p in stray_snapshots(base, 2)] == ["replay.snapshot"]
