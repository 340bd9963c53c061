"""deploy/inprocess.py: the job's classes wired in one process, no Ray. Fragments flow from the
actors through the replay service to the learner, its weights flow back to the actors, the rate
limiter paces the two sides, and a run is deterministic for a seed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from actors.config import ActorConfig
from actors.envs import EnvConfig
from deploy.config import JobConfig, RunConfig, load_config
from deploy.inprocess import InProcessRun
from learner.learner import LearnerConfig
from replay.service import ReplayConfig

torch.set_num_threads(1)


def _config(replay: ReplayConfig | None = None, *, actors: int = 2, batch_size: int = 2, seed=3):
    return JobConfig(
        run=RunConfig(num_actors=actors),
        env=EnvConfig(id="CartPole-v1", seed=seed),
        actors=ActorConfig(num_envs=4, unroll_length=8),
        # A large step size, so that acting one version behind shows in the importance ratios.
        learner=LearnerConfig(lr=0.05, batch_size=batch_size, device="cpu"),
        replay=replay or ReplayConfig.fifo_queue(capacity_fragments=64),
    )


def _run(config: JobConfig, max_env_steps: int, **kwargs):
    run = InProcessRun(config, **kwargs)
    steps = []
    try:
        result = run.run(max_env_steps, on_step=steps.append)
        return run, result, steps
    finally:
        run.close()


def test_fragments_flow_the_learner_steps_and_its_weights_reach_the_actors():
    run, result, steps = _run(_config(), 400)
    # 2 actors x 4 envs x 8 steps = 64 env steps a round; 7 rounds pass 400.
    assert (result.env_steps, result.fragments) == (448, 14)
    assert result.learner_steps == len(steps) == 7 and result.version == 7
    stats = run.replay.stats()
    assert (stats["inserted"], stats["sampled"], stats["size_fragments"]) == (14, 14, 0)
    assert stats["rejected"] == {}
    # Each round the actors act with the newest weights, and the learner steps on their
    # fragments at once: no lag, and the importance ratio pi/mu is 1 to float precision, which
    # holds only if the actors' weights are the learner's (lr 0.05 moves them every step).
    assert [m.version for m in steps] == list(range(1, 8))
    assert all(m.lag_max == 0 for m in steps)
    assert all(abs(m.rho_mean - 1.0) < 1e-4 for m in steps), [m.rho_mean for m in steps]
    assert [a.policy_version for a in run.actors] == [6, 6]  # synced before the last round
    assert run.store.version() == 7


def test_policy_lag_makes_the_actors_act_that_many_versions_behind():
    run, _, steps = _run(_config(), 400, policy_lag=2)
    assert [m.lag_max for m in steps] == [0, 1, 2, 2, 2, 2, 2]
    assert all(m.lag_mean == m.lag_max for m in steps)  # every column equally stale
    assert max(abs(m.rho_mean - 1.0) for m in steps[1:]) > 1e-3  # acted by other weights
    assert [a.policy_version for a in run.actors] == [4, 4]


def test_same_seed_same_run_other_seed_other_run():
    def losses(seed):
        _, result, steps = _run(_config(seed=seed), 300)
        return [m.loss for m in steps], result.curve

    assert losses(5) == losses(5)
    assert losses(5)[0] != losses(6)[0]


def test_rate_limiter_paces_learner_and_actors():
    # Two samples per inserted fragment within a tolerance of 3, so the credit
    # 2 * inserted - sampled stays in [2 - 3, 2 + 3]. Three actors insert faster than that allows
    # (the third fragment of the first round is held back until the learner has sampled).
    replay = ReplayConfig.uniform_replay(16, samples_per_insert=2.0, tolerance=3.0)
    run = InProcessRun(_config(replay, actors=3))
    try:
        for _ in range(20):
            run.step()
            stats = run.replay.stats()
            assert -1.0 <= 2.0 * stats["inserted"] - stats["sampled"] <= 5.0, stats
    finally:
        run.close()
    assert stats["inserted"] == 60  # every fragment went in, none was lost
    assert stats["sampled"] == 2 * run.learner_steps >= 2 * 60 - 5
    assert stats["insert_waits"] == 0  # held back in the sink, never waiting inside the service


def test_unbounded_replay_needs_a_cap_and_a_cap_is_kept():
    replay = ReplayConfig.uniform_replay(64)
    with pytest.raises(ValueError, match="learner_steps_per_round"):
        InProcessRun(_config(replay))
    _, result, steps = _run(_config(replay), 640, learner_steps_per_round=3)
    assert result.learner_steps == len(steps) == 3 * 10


def test_a_fragment_held_back_while_no_batch_can_be_served_is_an_error():
    # spi 4, tolerance 8: inserts are held back after 3 fragments, but a batch needs 8. In a Ray
    # job the waiting sampler lets the inserts go; one thread cannot wait, so it says so.
    replay = ReplayConfig.uniform_replay(64, samples_per_insert=4.0, tolerance=8.0)
    run = InProcessRun(_config(replay, batch_size=8))
    try:
        with pytest.raises(RuntimeError, match=r"raise replay\.tolerance"):
            for _ in range(5):
                run.step()
    finally:
        run.close()


@pytest.mark.slow
def test_cartpole_with_forced_lag_is_solved_by_vtrace():
    """`sync_every` makes actors act on weights ~20 learner versions old; V-trace copes."""
    config = load_config(
        Path(__file__).parent.parent / "deploy" / "configs" / "cartpole_stale.toml", []
    )
    lags = []
    run = InProcessRun(config)
    try:
        result = run.run(6_000_000, 475.0, on_step=lambda m: lags.append(m.lag_mean))
    finally:
        run.close()
    assert np.median(lags) >= 10, f"the forced lag was not forced: {lags[:50]}"
    assert result.solved_at is not None, result
