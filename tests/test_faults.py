"""Faults injected into running jobs: each is survived, counted, and CartPole is still solved.

- a checkpoint writer SIGKILLed mid-write leaves the previous checkpoint intact;
- a learner whose loss diverges (lr = 1e30) stops the job, non-zero, with the learner's message;
- one run on a local Ray that loses a rollout actor to `ray.kill`, another to SIGKILL, the
  replay service and the learner to SIGKILL, gets malformed bytes on the replay's insert path,
  and plays an env that raises in `step`/`reset` and emits NaN rewards: every fault is
  recovered and counted (driver counters and TensorBoard), and the run still solves CartPole.

The driver's own SIGKILL and `--resume` are in `test_driver_kill.py`.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from faulty_env import FAULTY_ID
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from deploy import metrics as tags
from deploy.config import load_config
from deploy.fleet import RETURN_WINDOW
from deploy.job import Job, train
from learner import checkpoint
from replay import codec
from replay.service import InsertResult

ROOT = Path(__file__).resolve().parent.parent
#: CartPole-v1's target return (the recipe's `run.target_return`).
TARGET = 475.0
#: Steps each env takes after the last fault before the episodes that finish are counted as
#: begun after it: CartPole-v1's 500-step limit, and 200 more because the actor counters the
#: driver saw at the fault are up to a poll old (a second at most: well under 200 steps per env).
CLEAN_STEPS = 700


# -- writes are atomic ---------------------------------------------------------------------------


def test_killed_checkpoint_writer_leaves_the_previous_checkpoint_intact(tmp_path):
    """SIGKILL while a large checkpoint is being written: the temp file is torn, every file
    under a checkpoint name loads completely, and the previous one is exactly as written."""
    script = textwrap.dedent(
        f"""
        import sys
        sys.path[:0] = [{str(ROOT)!r}]
        import torch
        from learner import checkpoint
        directory = {str(tmp_path)!r}
        checkpoint.write_checkpoint(directory, 1, {{"x": torch.arange(10.0)}}, keep=10)
        big = {{"x": torch.ones(20_000_000)}}  # 80 MB: the write takes a while
        print("ready", flush=True)
        version = 2
        while True:
            checkpoint.write_checkpoint(directory, version, big, keep=10)
            version += 1
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            temps = list(tmp_path.glob(".ckpt-*.tmp"))
            if temps and temps[0].stat().st_size > 1_000_000:
                break
            time.sleep(0.002)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        torn = list(tmp_path.glob(".ckpt-*.tmp"))
        assert torn, "killed when no write was in flight: not a torn write"
    finally:
        proc.kill()
        proc.wait(10)
    paths = checkpoint.list_checkpoints(str(tmp_path))
    readable = dict(checkpoint.readable_checkpoints(str(tmp_path)))
    assert sorted(readable) == sorted(paths), "a file under a checkpoint name is torn"
    first = readable[checkpoint.checkpoint_path(str(tmp_path), 1)]
    assert torch.equal(first["x"], torch.arange(10.0))
    for path, state in readable.items():
        if path != checkpoint.checkpoint_path(str(tmp_path), 1):
            assert state["x"].shape == (20_000_000,) and bool((state["x"] == 1).all())


# -- divergence ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_diverging_learner_stops_the_job_with_its_message(local_ray, tmp_path, capsys):
    """lr = 1e30 makes every loss after the first step non-finite: `max_nan_steps` skipped steps
    in a row end the run, and `offpg train` returns 1 and prints the learner's message."""
    from deploy.cli import main

    code = main(
        [
            "train",
            "--name",
            "diverge",
            "--logdir",
            str(tmp_path),
            "--set",
            "learner.lr=1e30",
            "--set",
            "learner.max_nan_steps=3",
            "--set",
            "run.log_every=0.5",
        ]
    )
    out = capsys.readouterr().out
    assert code == 1, out[-3000:]
    assert "learner failed: RuntimeError: 3 consecutive learner steps had a non-finite" in out
    assert "the policy has diverged" in out


@ray.remote(num_cpus=0)
class _UnresponsiveLearner:
    def stop(self, counters: dict) -> dict:
        time.sleep(30)
        return {"version": 1}


def test_a_learner_that_does_not_answer_stop_is_given_up_on(local_ray, capfd):
    """`Job.stop` then still snapshots the replay (its `finally`); the driver does not hang."""
    from deploy.job import stop_learner

    learner = _UnresponsiveLearner.remote()
    try:
        assert stop_learner(learner, {"env_steps": 1}, timeout=0.5) == {}
        err = capfd.readouterr().err
        assert "the learner did not stop within 0.5 s: no final checkpoint" in err
    finally:
        ray.kill(learner)


# -- one run, many faults ------------------------------------------------------------------------


def _bad_messages() -> list[bytes]:
    """Garbage, a valid message cut short, and one with a future schema version."""
    import msgpack
    from conftest import _make_fragment

    good = codec.encode(_make_fragment(fragment_id="bad-but-valid"))
    message = msgpack.unpackb(good, raw=False, ext_hook=lambda code, data: data)
    message[codec.VERSION_KEY] = codec.SCHEMA_VERSION + 1
    future = msgpack.packb(message, use_bin_type=True)
    return [b"\x00not a fragment\xff" * 8, good[: len(good) // 2], future]


def _misfit_messages(job: Job) -> list[bytes]:
    """Schema-valid fragments of the run's T and N that do not fit its network: an action
    index of 10**6 and byte observations. Accepted, either would crash the learner."""
    from conftest import _make_fragment

    t, n = job.config.actors.unroll_length, job.config.actors.num_envs
    action = _make_fragment(t, n, fragment_id="misfit-action")
    action.actions[0, 0] = 10**6
    obs = _make_fragment(t, n, obs_dtype="uint8", fragment_id="misfit-obs")
    return [codec.encode(action), codec.encode(obs)]


class Chaos:
    """Injects one fault per phase from the driver's poll, once the previous one is recovered."""

    def __init__(self) -> None:
        self.phase = 0
        self.episodes_clean_from: int | None = None
        self.solved_after_faults: float | None = None
        self.done: list[str] = []
        self.bad_results: list[InsertResult] = []
        self.misfit_results: list[InsertResult] = []
        self.rejected_before: dict[str, int] = {}
        self.rejected_after: dict[str, int] = {}
        self.version_before_learner_kill = -1
        self.actor_steps_at_last_fault: dict[int, int] = {}
        self.synced_versions: dict[int, int] = {}

    def __call__(self, job: Job) -> bool:
        topo = job.topology
        full = len(topo.actors) == 2 and not job.fleet.pending
        if self.phase == 0 and full and job.version >= 20:
            ray.kill(topo.actors[0])
            self._next("actor 0 ray.kill", job)
        elif self.phase == 1 and full and job.fleet.restarts >= 1:
            os.kill(ray.get(topo.actors[1].pid.remote(), timeout=30), signal.SIGKILL)
            self._next("actor 1 SIGKILL", job)
        elif self.phase == 2 and full and job.fleet.restarts >= 2:
            os.kill(ray.get(topo.shards[0].pid.remote(), timeout=30), signal.SIGKILL)
            self._next("replay SIGKILL", job)
        elif (
            self.phase == 3
            and job.faults.replay_restarts >= 1
            and list(job.checkpoint_dir.glob("*.pt"))
        ):
            # Malformed bytes on the restarted service's insert path.
            self.rejected_before = ray.get(topo.shards[0].stats.remote(), timeout=30)["rejected"]
            self.bad_results = ray.get(
                [topo.shards[0].insert.remote(m) for m in _bad_messages()], timeout=30
            )
            self.misfit_results = ray.get(
                [topo.shards[0].insert.remote(m) for m in _misfit_messages(job)], timeout=30
            )
            self.rejected_after = ray.get(topo.shards[0].stats.remote(), timeout=30)["rejected"]
            self.version_before_learner_kill = job.version
            os.kill(ray.get(topo.learner.pid.remote(), timeout=30), signal.SIGKILL)
            self._next("learner SIGKILL", job)
        elif self.phase == 4 and job.faults.learner_restarts >= 1 and full:
            _, version = job.faults.learner_restores[0]
            if min(job.fleet.policy_versions.values()) >= version:
                self.synced_versions = dict(job.fleet.policy_versions)
                self._next("actors synced to the restored learner", job)
        elif self.phase == 5:
            return self._solved_after_faults(job)
        return False

    def _solved_after_faults(self, job: Job) -> bool:
        """Stop the run once a full window of episodes that all began after the last fault
        averages the target. Every env has moved past the episode it was in at the last fault
        once each actor's envs have taken `CLEAN_STEPS` more steps each (an actor's envs step
        together; episodes last at most 500), so episodes finished from then on began after
        it."""
        episodes = job.fleet.episodes
        if self.episodes_clean_from is None:
            if self._every_env_moved_on(job):
                self.episodes_clean_from = episodes.count
            return False
        if episodes.count - self.episodes_clean_from < RETURN_WINDOW:
            return False
        if episodes.mean_return < TARGET:
            return False
        self.solved_after_faults = episodes.mean_return
        return True

    def _every_env_moved_on(self, job: Job) -> bool:
        """Whether every live actor has taken `CLEAN_STEPS` steps per env since the last fault
        (an actor restarted since then counts from its start, which came after it)."""
        per_actor = CLEAN_STEPS * job.config.actors.num_envs
        for actor_id, state in job.fleet.state.items():
            now, then = state.counters.env_steps, self.actor_steps_at_last_fault.get(actor_id, 0)
            if (now - then if now >= then else now) < per_actor:
                return False
        return True

    def _next(self, what: str, job: Job) -> None:
        self.done.append(what)
        self.phase += 1
        self.actor_steps_at_last_fault = {
            actor_id: state.counters.env_steps for actor_id, state in job.fleet.state.items()
        }


@pytest.mark.slow
def test_running_job_survives_faults_and_still_solves(local_ray, tmp_path):
    config = load_config(
        None,
        [
            f"env.id={FAULTY_ID}",
            "run.num_actors=2",
            "actors.num_envs=32",
            "run.log_every=0.25",  # how often Chaos looks: each phase waits for the last
            "run.max_env_steps=3000000",
            # The target is checked by Chaos, on episodes begun after the last fault: the
            # recipe can solve before the faults (each waits for the previous recovery and for
            # a checkpoint) have all landed.
            "run.target_return=none",
            "learner.checkpoint_every=2.0",
            "replay.snapshot_every=2.0",
        ],
        extra={"run.logdir": str(tmp_path), "run.name": "chaos"},
    )
    chaos = Chaos()
    summary = train(config, on_poll=chaos)

    assert chaos.phase == 5, f"faults injected: {chaos.done}; {summary.line()}"
    assert summary.ok, summary.stop_reason
    assert summary.stop_reason == "stopped by on_poll", summary.line()
    assert chaos.solved_after_faults >= TARGET, summary.line()
    # Actors: both kills restarted and counted.
    assert summary.actor_restarts >= 2
    # Replay: restarted once from its snapshot; what it lost is counted (inserted after the
    # last snapshot, 3 s of two actors' output at most), never silently.
    assert summary.replay_restarts == 1
    assert 0 < summary.lost_fragments < 3000, summary.lost_fragments
    # Malformed bytes: each refused and counted by reason, training went on.
    assert chaos.bad_results == [InsertResult.REJECTED] * 3
    assert (
        chaos.rejected_after.get("not_msgpack", 0)
        >= chaos.rejected_before.get("not_msgpack", 0) + 1
    )
    assert chaos.rejected_after.get("schema_version", 0) == (
        chaos.rejected_before.get("schema_version", 0) + 1
    )
    # Schema-valid fragments that do not fit the run: refused by the replay, counted by reason,
    # and the learner (restarted right after, sampling that replay) never saw them.
    assert chaos.misfit_results == [InsertResult.REJECTED] * 2
    for reason in ("spec_action", "spec_obs"):
        assert chaos.rejected_after.get(reason, 0) == chaos.rejected_before.get(reason, 0) + 1
    assert sum(chaos.rejected_after.values()) == sum(chaos.rejected_before.values()) + 5
    # Learner: restarted from a checkpoint at or below the version it had, continued above
    # every published version, and the actors synced to it.
    assert summary.learner_restarts == 1
    assert min(chaos.synced_versions.values()) > chaos.version_before_learner_kill

    events = EventAccumulator(summary.run_dir, size_guidance={"scalars": 0})
    events.Reload()

    def last(tag: str) -> float:
        return events.Scalars(tag)[-1].value

    assert last(tags.ACTORS_RESTARTS) >= 2
    assert last(tags.REPLAY_RESTARTS) == 1
    assert last(tags.REPLAY_LOST) == summary.lost_fragments
    assert last(tags.LEARNER_RESTARTS) == 1
    assert last(tags.REPLAY_REJECTED) >= 3
    assert last(tags.ACTORS_ENV_ERRORS) > 0, "the faulty env raised and was recovered from"
    assert last(tags.ACTORS_INVALID) > 0, "NaN-reward fragments were refused at the actor"
    assert max(e.value for e in events.Scalars(tags.ACTORS_COUNT)) == 2
    # The curves continue: x (env steps) strictly increasing, the learner version never back.
    for tag in events.Tags()["scalars"]:
        steps = [e.step for e in events.Scalars(tag)]
        assert steps == sorted(set(steps)), f"{tag}: duplicated or backwards steps"
    versions = [e.value for e in events.Scalars(tags.LEARNER_VERSION)]
    assert np.all(np.diff(versions) >= 0), "learner/version went backwards"
    returns = [e.value for e in events.Scalars(tags.EPISODE_RETURN)]
    assert all(math.isfinite(r) for r in returns)
