"""Files on disk that are truncated or corrupt: checkpoints, `--resume`, replay snapshots.

Nothing readable is deleted for an unreadable file, a run never starts over silently, and a
corrupt snapshot is refused rather than restored.
"""

from __future__ import annotations

import dataclasses
import os
import random
import subprocess
import sys

import msgpack
import pytest
import ray

from deploy import topology
from deploy.config import ConfigError, load_config
from deploy.job import Job
from learner import checkpoint
from learner.learner import Learner, LearnerConfig
from learner.policy import PolicySpec
from replay import snapshot
from replay.service import ReplayConfig, ReplayService

SPEC = PolicySpec((4,), "float32", "discrete", 2)


def _truncate(path: str) -> None:
    with open(path, "r+b") as f:  # a crash mid-copy
        f.truncate(os.path.getsize(path) // 2)


def _names(directory) -> list[str]:
    return sorted(os.listdir(directory))


def _learner(directory, keep: int) -> Learner:
    return Learner(SPEC, LearnerConfig(keep_checkpoints=keep), checkpoint_dir=str(directory))


# ------------------------------------------------------------------ checkpoints


def test_resume_past_a_truncated_checkpoint_then_retention_keeps_a_readable_one(tmp_path):
    first = _learner(tmp_path, keep=3)
    first.version = 100
    first.save_checkpoint()
    first.version = 200
    _truncate(first.save_checkpoint())

    resumed = _learner(tmp_path, keep=1)
    assert resumed.restore_latest() == 100
    assert _names(tmp_path) == ["ckpt-000000100.pt", "ckpt-000000200.pt.corrupt"]
    resumed.version += 1  # as a training step does
    resumed.save_checkpoint()  # keep=1
    assert _names(tmp_path) == ["ckpt-000000101.pt", "ckpt-000000200.pt.corrupt"]
    assert _learner(tmp_path, keep=1).restore_latest() == 101


def test_retention_never_counts_an_unreadable_checkpoint(tmp_path):
    state = {"version": 0, "model": {}}
    checkpoint.write_checkpoint(str(tmp_path), 100, state, keep=3)
    _truncate(checkpoint.write_checkpoint(str(tmp_path), 200, state, keep=3))
    # No restore in between: the write that finds the corrupt file moves it aside.
    checkpoint.write_checkpoint(str(tmp_path), 150, state, keep=2)
    assert _names(tmp_path) == [
        "ckpt-000000100.pt",
        "ckpt-000000150.pt",
        "ckpt-000000200.pt.corrupt",
    ]
    checkpoint.write_checkpoint(str(tmp_path), 160, state, keep=1)
    assert _names(tmp_path) == ["ckpt-000000160.pt", "ckpt-000000200.pt.corrupt"]


def _resume_config(tmp_path):
    return load_config(
        None, [f"run.logdir={tmp_path}", "run.name=old", "run.resume=true", "run.num_actors=1"]
    )


@pytest.mark.parametrize(
    ("files", "found"),
    [
        (None, r"no checkpoint directory .*old/checkpoints$"),
        ([], r"no readable checkpoint in .*old/checkpoints: it is empty$"),
        (
            ["ckpt-000000200.pt", "events.x"],
            r"no readable checkpoint in .*: it holds ckpt-000000200\.pt\.corrupt, events\.x; "
            r"1 unreadable checkpoint\(s\), moved aside as \*\.corrupt$",
        ),
    ],
)
def test_resume_without_a_readable_checkpoint_is_a_config_error(tmp_path, files, found):
    directory = tmp_path / "old" / "checkpoints"
    if files is not None:
        directory.mkdir(parents=True)
        for name in files:
            (directory / name).write_bytes(b"PK\x03\x04 not a whole checkpoint")
    with pytest.raises(ConfigError, match=r"^run\.resume: nothing to resume: " + found):
        Job(_resume_config(tmp_path))


def test_cli_resume_without_a_readable_checkpoint_exits_2_saying_what_it_found(tmp_path):
    learner = _learner(tmp_path / "old" / "checkpoints", keep=3)
    _truncate(learner.save_checkpoint())
    # In-process first: before the fix this returned a Job that would start from scratch.
    with pytest.raises(ConfigError):
        Job(_resume_config(tmp_path))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "deploy.cli",
            "train",
            "--resume",
            "--name=old",
            f"--logdir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().count("\n") == 0, result.stderr
    assert "no readable checkpoint" in result.stderr
    assert "ckpt-000000000.pt.corrupt" in result.stderr
    assert _names(tmp_path / "old") == ["checkpoints"], "nothing else may be written"


# ------------------------------------------------------------------ replay snapshots


def _snapshot(tmp_path, make_fragment) -> bytes:
    service = ReplayService(ReplayConfig.uniform_replay(capacity_fragments=10, seed=0))
    for i in range(3):
        assert service.insert_fragment(make_fragment(2, 1, obs_shape=(2,), seed=i))
    service.sample(2, learner_version=0)
    path = tmp_path / "replay.snapshot"
    service.snapshot(path)
    return path.read_bytes()


def _restore(path) -> ReplayService:
    return ReplayService(
        ReplayConfig.uniform_replay(capacity_fragments=10, snapshot_path=str(path))
    )


def test_every_single_byte_corruption_of_a_snapshot_is_refused(tmp_path, make_fragment):
    good = _snapshot(tmp_path, make_fragment)
    path = tmp_path / "corrupt.snapshot"
    path.write_bytes(good)
    assert _restore(path).stats()["size_fragments"] == 3
    rng = random.Random(0)
    restored = []
    for i in range(len(good)):
        data = bytearray(good)
        data[i] = (data[i] + rng.randrange(1, 256)) % 256
        path.write_bytes(data)
        try:
            _restore(path)
        except ValueError as exc:
            assert "checksum" in str(exc), (i, exc)
        else:
            restored.append(i)
    assert restored == [], f"{len(restored)} of {len(good)} corruptions restored silently"


def test_every_truncation_of_a_snapshot_is_refused(tmp_path, make_fragment):
    good = _snapshot(tmp_path, make_fragment)
    path = tmp_path / "cut.snapshot"
    for size in range(len(good)):
        path.write_bytes(good[:size])
        with pytest.raises(ValueError, match="has no checksum at its end"):
            _restore(path)


def test_a_version_1_snapshot_is_refused_by_name(tmp_path, make_fragment):
    good = _snapshot(tmp_path, make_fragment)
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(good)
    header, *records, trailer = list(unpacker)
    assert trailer.keys() == {"crc32"}
    old = msgpack.packb({**header, "version": 1}) + b"".join(msgpack.packb(r) for r in records)
    path = tmp_path / "v1.snapshot"
    path.write_bytes(old)
    with pytest.raises(
        ValueError,
        match=r"v1\.snapshot is a version-1 replay snapshot, which has no checksum: this build "
        rf"reads version-{snapshot.VERSION} snapshots",
    ):
        _restore(path)


def test_replay_worker_moves_a_corrupt_snapshot_aside_and_reports_it(
    local_ray, tmp_path, make_fragment
):
    good = _snapshot(tmp_path, make_fragment)
    path = tmp_path / "replay.snapshot"
    path.write_bytes(good[:100] + bytes([good[100] ^ 0x01]) + good[101:])
    config = dataclasses.replace(
        ReplayConfig.uniform_replay(capacity_fragments=10), snapshot_path=str(path)
    )
    worker = topology.start_replay(config)  # the job's own replay actor
    try:
        stats = ray.get(worker.stats.remote(), timeout=60)
    finally:
        ray.kill(worker)
    assert stats["restored_fragments"] == 0 and stats["size_fragments"] == 0
    assert "fails its CRC-32 checksum" in stats["restore_error"]
    assert not path.exists()
    assert (tmp_path / "replay.snapshot.unreadable").read_bytes() != good
