"""Eight real rollout actors on the embedded Ray, feeding two replay shards whose rate limiter
holds them back: the learner keeps stepping and every fragment is accounted for.

Worth its 8 rollout processes (each imports torch; starting them is nearly all of the test's
time): with `run.actor_max_inflight` 11 each actor has up to 12 inserts in flight, 48 per shard
(4 actors each), three times the 16 threads of a shard's insert pool. Before issue 11 the replay
actor had one pool for every call, and this many held-back inserts left the learner's sample
and the driver's stats no thread: the 60 s call timeouts failed the run. What matters is how
many inserts a shard holds back at once, not how many processes send them (32 actors with 3 in
flight each would put the same 48 on a shard). The driver asks `ASKS` actors per poll instead
of `deploy.job.ASKS_PER_POLL` (16), so its polls take turns over the actors as they do in a
fleet larger than 16. Nothing smaller reproduces that path: the
backpressure test (tests/test_backpressure.py) does it for one replay actor, this one for the
whole job (sinks resending held-back inserts, the learner sampling two shards, the driver's
one-wait polls that ask a few actors each, and the all-at-once stop that flushes every actor).
"""

from __future__ import annotations

from deploy import job as job_module
from deploy.config import load_config
from deploy.job import Job, train

ACTORS = 8
#: Inserts in flight per actor beyond the one it waits on: (11 + 1) x 4 actors = 48 per shard.
MAX_INFLIGHT = 11
#: Actors the driver asks for stats per poll: fewer than ACTORS, so the asks take turns.
ASKS = 3
#: Learner steps the run goes to (each samples 4 fragments; at 8 samples per insert the
#: learner can take about as many steps as the actors insert fragments times 2).
LEARNER_STEPS = 60


def test_8_actors_two_shards_rate_limited_nothing_stalls_nothing_lost(
    local_ray, tmp_path, monkeypatch
):
    monkeypatch.setattr(job_module, "ASKS_PER_POLL", ASKS)
    config = load_config(
        None,  # the CartPole recipe: 8 samples per insert, tolerance 64, 32 fragments held
        [
            f"run.num_actors={ACTORS}",
            "run.actor_cpus=0.05",
            f"run.actor_max_inflight={MAX_INFLIGHT}",
            "run.log_every=0.25",  # how often until_steps looks
            "run.target_return=none",
            "run.max_env_steps=100000000",  # not the stop rule: the learner's steps are
            "actors.num_envs=2",
            "actors.unroll_length=8",
            "replay.num_shards=2",
        ],
        extra={"run.logdir": str(tmp_path), "run.name": "many"},
    )
    seen: list[Job] = []
    versions: list[int] = []

    def until_steps(job: Job) -> bool:
        seen[:] = [job]
        versions.append(job.version)
        return job.version >= LEARNER_STEPS and job.fleet.size == ACTORS and not job.fleet.pending

    summary = train(config, on_poll=until_steps)
    job = seen[0]

    # The learner got its steps: no call timed out, the run ended by its own rule.
    assert summary.ok, summary.stop_reason
    assert summary.stop_reason == "stopped by on_poll", summary.line()
    assert versions == sorted(versions) and versions[-1] >= LEARNER_STEPS
    # The rate limiter held inserts back, and the actors waited instead of failing.
    shards = job.final_shard_stats  # taken at the stop, after every actor's last insert
    total = job.fleet.total()
    held_back = sum(s["insert_timeouts"] for s in shards)
    assert held_back > 0, "the rate limiter never held an insert back: nothing was tested"
    assert total.held_back == held_back, "every held-back insert was sent again"
    assert total.backpressure_s > 0
    # Every fragment is accounted for: each one an actor had acknowledged is in a shard's
    # count, each shard took its own actors' fragments, none was refused.
    assert total.inserted == sum(s["inserted"] for s in shards)
    assert all(s["inserted"] > 0 for s in shards)
    assert all(s["rejected"] == {} for s in shards)
    assert summary.lost_fragments == 0 and summary.actor_restarts == 0
    assert job.poll_ms > 0
