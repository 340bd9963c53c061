"""ReplayService in-process: samplers, capacity, staleness, rate limiter, snapshots, threads."""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from replay import codec
from replay.service import InsertResult, ReplayConfig, ReplayService
from replay.trajectory import Batch

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def fill(make_fragment):
    """fill(service, count, **kw) inserts `count` fragments with ids "0", "1", ... in order."""

    def fill(service: ReplayService, count: int, start: int = 0, **kwargs) -> list[str]:
        ids = [str(i) for i in range(start, start + count)]
        for i in ids:
            fragment = make_fragment(fragment_id=i, seed=int(i), **kwargs)
            assert service.insert_fragment(fragment, timeout=5.0), f"insert {i} blocked"
        return ids

    return fill


def _thread(target, name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"sampler": "lifo"}, "sampler"),
        ({"sampler": "mixed", "replay_fraction": 1.0}, "replay_fraction"),
        ({"sampler": "uniform", "replay_fraction": 0.5}, "replay_fraction"),
        ({"capacity_fragments": 0}, "capacity_fragments"),
        ({"capacity_bytes": 0}, "capacity_bytes"),
        ({"sampler": "fifo", "max_times_sampled": 2}, "max_times_sampled"),
        ({"min_size_to_sample": 11, "capacity_fragments": 10}, "min_size_to_sample"),
        ({"sampler": "uniform", "samples_per_insert": 0.0}, "samples_per_insert"),
        ({"sampler": "uniform", "samples_per_insert": 4.0, "tolerance": 2.0}, "tolerance"),
        (
            {"sampler": "uniform", "max_times_sampled": 2, "samples_per_insert": 4, "tolerance": 9},
            "samples_per_insert",
        ),
        ({"sampler": "uniform", "tolerance": 3.0}, "tolerance"),
        ({"max_staleness": -1}, "max_staleness"),
        ({"snapshot_every": 5.0}, "snapshot_every"),
        ({"snapshot_every": float("inf"), "snapshot_path": "x"}, "snapshot_every"),
        ({"sampler": "uniform", "samples_per_insert": float("nan")}, "samples_per_insert"),
        ({"sampler": "uniform", "samples_per_insert": 1.0, "tolerance": float("inf")}, "tolerance"),
        ({"capacity_fragments": 10**12}, "capacity_fragments"),
    ],
)
def test_config_refuses_bad_settings_naming_the_field(kwargs, field):
    with pytest.raises(ValueError) as info:
        ReplayConfig(**kwargs)
    assert str(info.value).startswith(field)


@pytest.mark.parametrize(
    "config",
    [
        ReplayConfig(),
        ReplayConfig.fifo_queue(),
        ReplayConfig.uniform_replay(),
        ReplayConfig.uniform_replay(samples_per_insert=8.0),
        ReplayConfig.mixed_replay(),
    ],
    ids=["default", "fifo_queue", "uniform_replay", "uniform_ratio", "mixed_replay"],
)
def test_default_and_recipes_are_valid_and_serve_a_batch(config, fill):
    service = ReplayService(config)
    fill(service, 8)
    batch = service.sample(4, learner_version=0, timeout=1.0)
    assert batch is not None and len(batch.fragment_ids) == 4


def test_fifo_with_a_ratio_above_one_would_deadlock():
    with pytest.raises(ValueError, match="both sides would block"):
        ReplayConfig.fifo_queue(samples_per_insert=2.0, tolerance=4.0)


def test_deadlocking_tolerance_is_explained():
    with pytest.raises(ValueError, match="deadlock"):
        ReplayConfig.uniform_replay(samples_per_insert=4.0, tolerance=2.0)


def test_every_config_field_has_a_doc():
    for field in dataclasses.fields(ReplayConfig):
        assert field.metadata.get("doc"), field.name


# ------------------------------------------------------------------ samplers


def test_fifo_delivers_each_fragment_once_oldest_first(fill):
    service = ReplayService(ReplayConfig.fifo_queue())
    fill(service, 7)
    first = service.sample(3, learner_version=0, timeout=0)
    second = service.sample(3, learner_version=0, timeout=0)
    assert isinstance(first, Batch)
    assert first.fragment_ids == ("0", "1", "2")
    assert second.fragment_ids == ("3", "4", "5")
    assert service.sample(2, learner_version=0, timeout=0.01) is None  # one left: not enough
    stats = service.stats()
    assert (stats["size_fragments"], stats["sampled"], stats["retired"]) == (1, 6, 6)
    assert stats["sample_timeouts"] == 1


def test_sample_stacks_along_the_env_axis(fill):
    service = ReplayService(ReplayConfig.fifo_queue())
    fill(service, 3)  # each fragment: T=4, N=2, obs (4,)
    batch = service.sample(3, learner_version=5, timeout=0)
    assert batch.obs.shape == (5, 6, 4)
    assert batch.rewards.shape == (4, 6)
    np.testing.assert_array_equal(batch.policy_version, np.zeros(6, np.int64))
    assert service.stats()["lag"] == {"mean": 5.0, "max": 5, "histogram": {"5-8": 3}}


def test_uniform_replays_without_replacement_within_a_batch(fill):
    service = ReplayService(ReplayConfig.uniform_replay(seed=1))
    ids = fill(service, 10)
    counts = collections.Counter()
    for _ in range(500):
        batch = service.sample(4, learner_version=0, timeout=0)
        assert len(set(batch.fragment_ids)) == 4
        counts.update(batch.fragment_ids)
    assert sorted(counts) == ids
    # 2000 draws over 10 items: each ~200, binomial sd ~13.
    assert all(140 < c < 260 for c in counts.values()), counts
    stats = service.stats()
    assert stats["size_fragments"] == 10
    assert sum(int(k) * v for k, v in stats["times_sampled"].items()) == 2000


def test_max_times_sampled_retires_fragments(fill):
    service = ReplayService(ReplayConfig.uniform_replay(max_times_sampled=2, seed=0))
    fill(service, 4)
    for _ in range(4):
        assert service.sample(2, learner_version=0, timeout=0) is not None
    stats = service.stats()
    assert stats["retired"] == 4 and stats["size_fragments"] == 0
    assert service.sample(1, learner_version=0, timeout=0) is None


def test_mixed_sampler_takes_fresh_oldest_first_and_replays_the_rest(fill):
    service = ReplayService(ReplayConfig.mixed_replay(replay_fraction=0.5, seed=0))
    fill(service, 4)
    first = service.sample(4, learner_version=0, timeout=0)
    assert first.fragment_ids == ("0", "1", "2", "3")  # nothing to replay yet: all fresh
    fill(service, 4, start=4)
    second = service.sample(4, learner_version=0, timeout=0)
    assert second.fragment_ids[:2] == ("4", "5")
    assert set(second.fragment_ids[2:]) <= {"0", "1", "2", "3"}
    assert len(set(second.fragment_ids)) == 4
    stats = service.stats()
    assert stats["fresh_fragments"] == 2
    assert stats["times_sampled"] == {"0": 2, "1": 4, "2": 2}


def test_mixed_sampler_waits_for_fresh_fragments(fill):
    service = ReplayService(ReplayConfig.mixed_replay(replay_fraction=0.25, seed=0))
    fill(service, 4)
    service.sample(4, learner_version=0, timeout=0)
    fill(service, 2, start=4)
    assert service.sample(4, learner_version=0, timeout=0.01) is None  # needs 3 fresh
    fill(service, 1, start=6)
    assert service.sample(4, learner_version=0, timeout=0).fragment_ids[:3] == ("4", "5", "6")


# ------------------------------------------------------------------ capacity and staleness


def test_capacity_in_fragments_evicts_oldest_first(fill):
    service = ReplayService(ReplayConfig.fifo_queue(capacity_fragments=3))
    fill(service, 5)
    assert service.stats()["evicted"] == 2
    assert service.sample(3, learner_version=0, timeout=0).fragment_ids == ("2", "3", "4")


def test_capacity_in_bytes_evicts_oldest_first(make_fragment, fill):
    nbytes = make_fragment().nbytes
    config = ReplayConfig.uniform_replay(capacity_bytes=3 * nbytes + nbytes // 2)
    service = ReplayService(config)
    fill(service, 5)  # fragments differ by their finished episodes: a few bytes either way
    stats = service.stats()
    assert stats["size_bytes"] <= config.capacity_bytes
    assert stats["size_fragments"] + stats["evicted"] == 5
    held = service.sample(stats["size_fragments"], learner_version=0, timeout=0).fragment_ids
    assert sorted(held, key=int) == [str(i) for i in range(5 - stats["size_fragments"], 5)]


def test_fragment_larger_than_byte_capacity_is_rejected(make_fragment):
    service = ReplayService(ReplayConfig.fifo_queue(capacity_bytes=100))
    assert service.insert_fragment(make_fragment(8, 8)) is InsertResult.REJECTED
    assert service.stats()["rejected"] == {"too_large": 1}


def test_duplicate_fragment_id_is_rejected(make_fragment):
    service = ReplayService(ReplayConfig.fifo_queue())
    assert service.insert(codec.encode(make_fragment(fragment_id="a"))) is InsertResult.ACCEPTED
    again = service.insert(codec.encode(make_fragment(fragment_id="a", seed=1)))
    assert again is InsertResult.REJECTED
    assert service.stats()["rejected"] == {"duplicate_id": 1}


@pytest.mark.parametrize("sampler", ["fifo", "uniform", "mixed"])
def test_stale_fragments_are_dropped_and_counted(make_fragment, sampler):
    kwargs = {"replay_fraction": 0.5} if sampler == "mixed" else {}
    config = ReplayConfig(
        sampler=sampler, max_times_sampled=int(sampler == "fifo"), max_staleness=2, **kwargs
    )
    service = ReplayService(config)
    for i, version in enumerate([0, 1, 2, 3, 4, 5, 1]):  # the last one is from a slow actor
        assert service.insert_fragment(make_fragment(policy_version=version, fragment_id=str(i)))
    batch = service.sample(3, learner_version=5, timeout=0)
    assert sorted(batch.fragment_ids) == ["3", "4", "5"]
    for _ in range(20):  # until the late fragment is met (uniform: each time with p = 1/2)
        batch = service.sample(2, learner_version=5, timeout=0)
        assert batch is None or set(batch.fragment_ids) <= {"3", "4", "5"}
    stats = service.stats()
    assert stats["dropped_stale"] == 4
    # fifo delivered 3, 4, 5 once; the other two keep them for replay.
    assert stats["size_fragments"] == (0 if sampler == "fifo" else 3)
    assert stats["lag"]["max"] == 2


def test_fragments_are_stamped_with_the_learner_version_they_arrive_at(make_fragment):
    """The stamp is the newest version a sample call showed, never below the fragment's own;
    a Batch carries it per column, so the learner can split the lag (learner.metrics)."""
    service = ReplayService(ReplayConfig(sampler="fifo", max_times_sampled=1))
    assert service.insert_fragment(make_fragment(policy_version=0, fragment_id="a"))
    assert service.sample(1, learner_version=7, timeout=0).insert_version.tolist() == [0] * 2
    assert service.insert_fragment(make_fragment(policy_version=3, fragment_id="b"))
    assert service.insert_fragment(make_fragment(policy_version=9, fragment_id="c"))
    batch = service.sample(2, learner_version=12, timeout=0)
    columns = dict(zip(batch.fragment_ids, np.split(batch.insert_version, 2), strict=True))
    assert columns["b"].tolist() == [7] * 2  # acting lag 7 - 3 = 4, data age 12 - 7 = 5
    assert columns["c"].tolist() == [9] * 2  # the actor was newer than the replay's view


# ------------------------------------------------------------------ rate limiter

# Each row: samples_per_insert, tolerance, min_size_to_sample, fragments inserted first, then
# fragments sampled (in batches of 1), then whether one more insert / one more sample of
# `batch` fragments goes through at once (False: it would block).
RATE_LIMITER_TABLE = [
    # spi tol  min  ins smp batch  insert  sample
    (1.0, 1.0, 1, 1, 0, 1, True, True),  # credit 1: insert -> 2 <= 1+1
    (1.0, 1.0, 1, 2, 0, 1, False, True),  # insert -> 3 > 2: inserts ran ahead
    (1.0, 1.0, 1, 2, 1, 1, True, True),
    (1.0, 1.0, 1, 2, 2, 1, True, False),  # sample -> 0 - 1 < 1 - 1: samples ran ahead
    (1.0, 1.0, 3, 2, 0, 1, True, False),  # below min_size: inserts free, samples wait
    (1.0, 1.0, 3, 3, 0, 1, True, True),  # insert -> 4 <= 3 + 1
    (1.0, 1.0, 3, 4, 0, 1, False, True),  # insert -> 5 > 4
    (4.0, 4.0, 1, 2, 0, 1, False, True),  # insert -> 12 > 4 + 4
    (4.0, 4.0, 1, 2, 4, 1, True, True),  # insert -> 12 - 4 <= 8
    (4.0, 4.0, 1, 2, 8, 1, True, False),  # sample -> 0 - 1 < 4 - 4
    (0.5, 2.0, 1, 5, 0, 1, False, True),  # insert -> 3 > 2.5: half a sample per insert
    (0.5, 2.0, 1, 5, 1, 1, True, True),  # insert -> 3 - 1 <= 2.5
    (0.5, 2.0, 1, 5, 0, 3, False, True),  # sample -> 2.5 - 3 >= 0.5 - 2
    (0.5, 2.0, 1, 5, 2, 3, True, False),  # sample -> 0.5 - 3 < 0.5 - 2
    (1.0, 3.0, 1, 2, 0, 4, True, False),  # the ratio allows 4 but only 2 are held
]


@pytest.mark.parametrize(
    "spi, tol, min_size, inserts, samples, batch, insert_ok, sample_ok", RATE_LIMITER_TABLE
)
def test_rate_limiter_table(
    fill, make_fragment, spi, tol, min_size, inserts, samples, batch, insert_ok, sample_ok
):
    config = ReplayConfig.uniform_replay(
        samples_per_insert=spi, tolerance=tol, min_size_to_sample=min_size, seed=0
    )

    def prepared() -> ReplayService:
        service = ReplayService(config)
        fill(service, inserts)
        for _ in range(samples):
            assert service.sample(1, learner_version=0, timeout=0) is not None
        return service

    sampler, inserter = prepared(), prepared()
    assert (sampler.sample(batch, learner_version=0, timeout=0) is not None) == sample_ok
    probe = inserter.insert_fragment(make_fragment(fragment_id="probe"), timeout=0)
    assert probe is (InsertResult.ACCEPTED if insert_ok else InsertResult.HELD_BACK)
    assert sampler.stats()["sample_timeouts"] == int(not sample_ok)
    assert inserter.stats()["insert_timeouts"] == int(not insert_ok)


def test_blocked_insert_resumes_when_the_learner_samples(fill, make_fragment):
    config = ReplayConfig.uniform_replay(samples_per_insert=1.0, tolerance=1.0, seed=0)
    service = ReplayService(config)
    fill(service, 2)
    results = []
    producer = _thread(
        lambda: results.append(service.insert_fragment(make_fragment(fragment_id="x"), 5.0)),
        "test-producer",
    )
    producer.join(0.1)
    assert producer.is_alive(), "the insert should be blocked by the ratio"
    assert service.sample(1, learner_version=0, timeout=1.0) is not None
    producer.join(5.0)
    assert results == [InsertResult.ACCEPTED]
    stats = service.stats()
    assert stats["insert_waits"] == 1 and stats["insert_timeouts"] == 0


def test_admit_all_lets_a_held_back_insert_and_every_later_one_go(fill, make_fragment):
    # A stopping run: the learner takes no more samples, the actors' last fragments still go in.
    service = ReplayService(ReplayConfig.uniform_replay(samples_per_insert=1.0, tolerance=1.0))
    fill(service, 2)
    results = []
    producer = _thread(
        lambda: results.append(service.insert_fragment(make_fragment(fragment_id="x"), 30.0)),
        "test-producer",
    )
    producer.join(0.1)
    assert producer.is_alive(), "the insert should be held back by the ratio"
    service.admit_all()
    producer.join(5.0)
    assert results == [InsertResult.ACCEPTED]
    for k in range(3):  # no sample in between: the ratio alone would hold each back
        assert service.insert_fragment(make_fragment(fragment_id=f"y{k}"), timeout=0)
    stats = service.stats()
    assert (stats["inserted"], stats["insert_timeouts"], stats["rejected"]) == (6, 0, {})


def test_a_stopping_actors_last_fragment_goes_at_once_and_later_ones_still_wait(
    fill, make_fragment
):
    # An actor removed by `offpg scale` sends its held-back fragments as `last`: they do not
    # wait for the learner, the limiter counts them, and other inserts are held back as before.
    service = ReplayService(ReplayConfig.uniform_replay(samples_per_insert=1.0, tolerance=1.0))
    fill(service, 2)
    held = make_fragment(fragment_id="held")
    assert service.insert_fragment(held, timeout=0) is InsertResult.HELD_BACK
    assert service.insert_fragment(held, timeout=0, last=True) is InsertResult.ACCEPTED
    assert service.insert_fragment(make_fragment(fragment_id="z"), timeout=0) is (
        InsertResult.HELD_BACK
    )
    stats = service.stats()
    assert (stats["inserted"], stats["size_fragments"]) == (3, 3)


def test_insert_is_never_blocked_while_a_sampler_starves(fill, make_fragment):
    # spi 4, tolerance 8: after 3 inserts the ratio blocks inserts, but a batch of 8 needs 8
    # fragments: without the starvation rule both sides would wait forever.
    config = ReplayConfig.uniform_replay(samples_per_insert=4.0, tolerance=8.0, seed=0)
    service = ReplayService(config)
    fill(service, 3)
    early = service.insert_fragment(make_fragment(fragment_id="early"), timeout=0)
    assert early is InsertResult.HELD_BACK
    results = []
    learner = _thread(
        lambda: results.append(service.sample(8, learner_version=0, timeout=5.0)), "test-learner"
    )
    fill(service, 5, start=3)
    learner.join(5.0)
    assert results and results[0] is not None and len(results[0].fragment_ids) == 8


def test_held_back_insert_changes_nothing_and_the_same_bytes_go_later(fill, make_fragment):
    service = ReplayService(ReplayConfig.uniform_replay(samples_per_insert=1.0, tolerance=1.0))
    fill(service, 2)
    data = codec.encode(make_fragment(fragment_id="late"))
    assert service.insert(data, timeout=0.05) is InsertResult.HELD_BACK
    stats = service.stats()
    assert (stats["size_fragments"], stats["inserted"], stats["rejected"]) == (2, 2, {})
    assert stats["insert_timeouts"] == 1
    assert service.sample(1, learner_version=0, timeout=0) is not None
    assert service.insert(data, timeout=0) is InsertResult.ACCEPTED  # not a duplicate
    service.close()
    after_close = service.insert(codec.encode(make_fragment(fragment_id="x")), timeout=0)
    assert after_close is InsertResult.REJECTED
    assert service.stats()["rejected"] == {"closed": 1}


def test_batch_larger_than_the_limiter_window_is_refused(fill):
    service = ReplayService(ReplayConfig.uniform_replay(samples_per_insert=1.0, tolerance=2.0))
    fill(service, 3)
    assert service.sample(3, learner_version=0, timeout=0) is not None  # 3 = 2 * 2 - 1
    with pytest.raises(ValueError, match="deadlock"):
        service.sample(4, learner_version=0, timeout=0)


def test_close_wakes_a_waiting_sampler():
    service = ReplayService(ReplayConfig.fifo_queue())
    results = []
    learner = _thread(
        lambda: results.append(service.sample(1, learner_version=0, timeout=None)), "test-learner"
    )
    learner.join(0.05)
    assert learner.is_alive()
    service.close()
    learner.join(2.0)
    assert not learner.is_alive() and results == [None]


# ------------------------------------------------------------------ stats


def test_stats_are_json_and_complete(fill):
    service = ReplayService(ReplayConfig.uniform_replay(seed=0))
    fill(service, 4)
    service.sample(2, learner_version=3, timeout=0)
    service.insert(b"junk")
    stats = json.loads(json.dumps(service.stats()))
    assert stats["size_fragments"] == 4 and stats["inserted"] == 4 and stats["sampled"] == 2
    assert stats["rejected"] == {"not_msgpack": 1}
    assert stats["times_sampled"] == {"0": 2, "1": 2}
    assert stats["lag"] == {"mean": 3.0, "max": 3, "histogram": {"3-4": 2}}
    for key in ("evicted", "dropped_stale", "insert_waits", "sample_waits", "size_bytes"):
        assert key in stats


# ------------------------------------------------------------------ snapshots


def _comparable(stats: dict) -> dict:
    return {k: v for k, v in stats.items() if not k.endswith("wait_seconds")}


def test_snapshot_restore_is_identical(tmp_path, fill, make_fragment):
    config = ReplayConfig.mixed_replay(replay_fraction=0.5, seed=0, max_staleness=10)
    service = ReplayService(config)
    fill(service, 6)
    service.sample(4, learner_version=1, timeout=0)
    service.sample(2, learner_version=2, timeout=0)
    fill(service, 3, start=6)
    service.insert(b"\x00")
    path = tmp_path / "replay.snap"
    assert service.snapshot(path) == 9

    restored = ReplayService(dataclasses.replace(config, snapshot_path=str(path)))
    assert _comparable(restored.stats()) == _comparable(service.stats())
    again = tmp_path / "again.snap"
    restored.snapshot(again)
    assert again.read_bytes() == path.read_bytes()  # contents, order, times sampled, counters
    # Same order: the fresh ones ("4" went out fresh in the second batch) come out oldest first.
    a = service.sample(2, learner_version=2, timeout=0).fragment_ids[:1]
    b = restored.sample(2, learner_version=2, timeout=0).fragment_ids[:1]
    assert a == b == ("5",)


def test_failed_snapshot_leaves_the_previous_one_intact(tmp_path, fill, monkeypatch):
    service = ReplayService(ReplayConfig.fifo_queue())
    fill(service, 3)
    path = tmp_path / "replay.snap"
    service.snapshot(path)
    previous = path.read_bytes()
    fill(service, 2, start=3)

    def crash(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk went away"):
        service.snapshot(path)
    assert path.read_bytes() == previous
    assert [p.name for p in tmp_path.iterdir()] == ["replay.snap"]  # temp file removed


def test_killed_writer_leaves_the_previous_snapshot_intact(tmp_path):
    path = tmp_path / "replay.snap"
    script = textwrap.dedent(
        f"""
        import sys
        sys.path[:0] = [{str(REPO)!r}, {str(REPO / "tests")!r}]
        from conftest import _make_fragment
        from replay.service import ReplayConfig, ReplayService
        service = ReplayService(ReplayConfig.fifo_queue(capacity_fragments=400))
        for i in range(4):
            service.insert_fragment(_make_fragment(fragment_id=str(i)))
        service.snapshot({str(path)!r})
        for i in range(4, 44):
            service.insert_fragment(_make_fragment(20, 4, obs_shape=(4, 42, 42),
                                                   obs_dtype="uint8", fragment_id=str(i)))
        print("ready", flush=True)
        while True:
            service.snapshot({str(path)!r} + ".next")  # keep a large write in flight
            service.snapshot({str(path)!r})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        tmp = f".{path.name}.{proc.pid}.tmp"
        while not (tmp_path / tmp).exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        assert (tmp_path / tmp).exists(), "the writer never started a snapshot"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        assert (tmp_path / tmp).exists(), "killed after the write finished: not a torn write"
    finally:
        proc.kill()
        proc.wait(10)
    config = ReplayConfig.fifo_queue(capacity_fragments=400, snapshot_path=str(path))
    restored = ReplayService(config)
    size = restored.stats()["size_fragments"]
    assert size in (4, 44)  # the old snapshot or a complete new one, never a torn one
    assert restored.sample(size, learner_version=0, timeout=0).fragment_ids[:4] == tuple("0123")


def test_periodic_snapshots_run_on_a_named_thread_joined_by_close(tmp_path, fill):
    path = tmp_path / "replay.snap"
    service = ReplayService(ReplayConfig.fifo_queue(snapshot_path=str(path), snapshot_every=0.02))
    fill(service, 2)
    names = [t.name for t in threading.enumerate()]
    assert "replay-snapshotter" in names
    restore = ReplayConfig.fifo_queue(snapshot_path=str(path))
    deadline = time.monotonic() + 5
    while not (path.exists() and ReplayService(restore).stats()["size_fragments"] == 2):
        assert time.monotonic() < deadline, "no periodic snapshot with both fragments appeared"
        time.sleep(0.02)
    service.close()
    assert "replay-snapshotter" not in [t.name for t in threading.enumerate()]


def test_periodic_snapshots_survive_an_unexpected_error(tmp_path, fill, monkeypatch):
    """A periodic snapshot failing with something other than OSError is counted and logged, and
    the thread writes the next ones as usual."""
    from replay import snapshot as snapshot_file

    real_write = snapshot_file.write
    failures = []

    def flaky_write(path, state, records):
        if not failures:
            failures.append(path)
            raise ValueError("an encoder bug")
        return real_write(path, state, records)

    monkeypatch.setattr(snapshot_file, "write", flaky_write)
    path = tmp_path / "replay.snap"
    service = ReplayService(ReplayConfig.fifo_queue(snapshot_path=str(path), snapshot_every=0.02))
    try:
        fill(service, 2)
        deadline = time.monotonic() + 5
        while not path.exists():
            assert time.monotonic() < deadline, "no snapshot after the failed one"
            time.sleep(0.02)
        assert failures and service.stats()["snapshot_failures"] == 1
        assert "replay-snapshotter" in [t.name for t in threading.enumerate()]
    finally:
        service.close()
