"""actors/rollout.py: fragments from a scripted env with known returns, weight syncs, max_lag,
run/stop, env-error recovery. Plain objects, no Ray."""

from __future__ import annotations

import dataclasses
import itertools
import math
import threading
import time

import numpy as np
import pytest
import scripted_env
import torch

from actors.config import MAX_NUM_ENVS, ActorConfig
from actors.envs import EnvConfig, env_seeds, policy_spec, probe_spaces
from actors.ports import LocalWeights, MemorySink
from actors.rollout import MAX_CONSECUTIVE_ENV_ERRORS, RolloutActor
from learner.policy import PolicySpec, load_numpy_state_dict, make_policy, state_dict_to_numpy
from replay.codec import decode
from replay.fields import FieldError

_HOOKS = ("failures_left", "reset_failures_left", "nan_rewards_left")


@pytest.fixture(autouse=True)
def _no_scripted_failures():
    for hook in _HOOKS:
        setattr(scripted_env.ScriptedEnv, hook, 0)
    yield
    for hook in _HOOKS:
        setattr(scripted_env.ScriptedEnv, hook, 0)


def _spec(env_config: EnvConfig) -> PolicySpec:
    return policy_spec(*probe_spaces(env_config), hidden_sizes=(16,))


def _weights(spec: PolicySpec, head_bias: list[float] | None = None) -> dict[str, np.ndarray]:
    """Fresh weights; with `head_bias` the policy output is that constant (logits or mean)."""
    policy = make_policy(spec)
    if head_bias is not None:
        with torch.no_grad():
            policy.policy_head.weight.zero_()
            policy.policy_head.bias.copy_(torch.tensor(head_bias))
    return state_dict_to_numpy(policy)


def _actor(
    env_id: str,
    *,
    num_envs: int = 1,
    unroll_length: int = 3,
    env_kwargs: dict | None = None,
    actor_id: int = 0,
    sink=None,
    weights=None,
    **actor_kwargs,
) -> tuple[RolloutActor, MemorySink]:
    env_config = EnvConfig(id=env_id, kwargs=env_kwargs or {})
    actor_config = ActorConfig(num_envs=num_envs, unroll_length=unroll_length, **actor_kwargs)
    sink = MemorySink() if sink is None else sink
    spec = _spec(env_config)
    weights = LocalWeights(_weights(spec)) if weights is None else weights
    actor = RolloutActor(actor_id, env_config, actor_config, spec, sink=sink, weights=weights)
    return actor, sink


def _decoded(sink: MemorySink) -> list:
    return [decode(item) for item in sink.items]  # decode validates against the schema


# -- fragments: autoreset, truncation, final observations, episode statistics -----------------


@pytest.mark.parametrize(
    ("env_id", "end_field"),
    [(scripted_env.CALLABLE_ID, "terminated"), (scripted_env.TRUNCATED_ID, "truncated")],
)
def test_episode_ends_across_fragment_boundaries_literal(env_id, end_field):
    """Episodes of 3 steps (reward k at step k), fragments of 3 steps: the 4-step cycle (3 real
    steps + 1 autoreset step) drifts across fragment boundaries."""
    actor, sink = _actor(env_id, num_envs=1, unroll_length=3)
    fragments = [actor.collect() for _ in range(3)]
    other_field = "truncated" if end_field == "terminated" else "terminated"
    f, t = False, True
    expected = [
        # obs k (T+1 rows)   rewards     ends        autoreset    returns  lengths
        ([0, 1, 2, 3], [1, 2, 3], [f, f, t], [f, f, f], [6.0], [3]),
        ([3, 0, 1, 2], [0, 1, 2], [f, f, f], [t, f, f], [], []),
        ([2, 3, 0, 1], [3, 0, 1], [t, f, f], [f, t, f], [6.0], [3]),
    ]
    for frag, decoded, (k, rewards, ends, autoreset, returns, lengths) in zip(
        fragments, _decoded(sink), expected, strict=True
    ):
        # obs[t + 1] at an ending step is the real final observation (k = 3), which is what a
        # truncated episode bootstraps from; the autoreset step brings the new episode's k = 0.
        assert frag.obs[:, 0, 0].tolist() == k
        assert frag.rewards[:, 0].tolist() == rewards
        assert getattr(frag, end_field)[:, 0].tolist() == ends
        assert not getattr(frag, other_field).any()
        assert frag.autoreset[:, 0].tolist() == autoreset
        assert frag.episode_returns.tolist() == returns
        assert frag.episode_lengths.tolist() == lengths
        np.testing.assert_array_equal(decoded.obs, frag.obs)
        np.testing.assert_array_equal(decoded.autoreset, frag.autoreset)
    stats = actor.stats()
    assert stats.episode_returns == [6.0, 6.0] and stats.episode_lengths == [3, 3]
    assert stats.env_steps == 9 and stats.fragments == 3


def test_many_envs_of_different_lengths_match_a_per_step_reference():
    # Seeds 0, 1, 2 give episode lengths 3, 4, 5 (length + seed % 3).
    n, t_len, count = 3, 5, 7
    actor, sink = _actor(
        scripted_env.CALLABLE_ID,
        num_envs=n,
        unroll_length=t_len,
        env_kwargs={"length": 3, "vary_length": True},
    )
    fragments = [actor.collect() for _ in range(count)]
    ref = scripted_env.reference_stream([3, 4, 5], t_len * count)
    k = np.concatenate([fragments[0].obs[:1, :, 0]] + [f.obs[1:, :, 0] for f in fragments])
    np.testing.assert_array_equal(k, ref["k"])
    for frag, start in zip(fragments, range(0, t_len * count, t_len), strict=True):
        np.testing.assert_array_equal(frag.rewards, ref["rewards"][start : start + t_len])
        np.testing.assert_array_equal(frag.terminated, ref["ended"][start : start + t_len])
        np.testing.assert_array_equal(frag.autoreset, ref["autoreset"][start : start + t_len])
        assert not frag.truncated.any()
    # The last row of a fragment is the first row of the next one.
    for prev, nxt in itertools.pairwise(fragments):
        np.testing.assert_array_equal(prev.obs[-1], nxt.obs[0])
    # Episodes in the order they ended: L (L + 1) / 2 for the env's length L.
    _, ends_n = np.nonzero(ref["ended"])
    lengths = [[3, 4, 5][i] for i in ends_n]
    returns = [length * (length + 1) / 2 for length in lengths]
    assert np.concatenate([f.episode_returns for f in fragments]).tolist() == returns
    assert np.concatenate([f.episode_lengths for f in fragments]).tolist() == lengths
    stats = actor.stats()
    assert stats.episode_returns == returns and stats.episode_lengths == lengths
    assert actor.stats().episode_returns == []  # drained
    assert len(_decoded(sink)) == count


def test_fragments_carry_ids_actor_and_behaviour_log_probs():
    actor, sink = _actor("CartPole-v1", num_envs=4, unroll_length=8, actor_id=3)
    fragments = [actor.collect() for _ in range(3)]
    ids = [f.fragment_id for f in fragments]
    nonce = ids[0].split("-")[1]
    assert ids == [f"3-{nonce}-{i}" for i in range(3)]
    other, _ = _actor("CartPole-v1", num_envs=4, unroll_length=8, actor_id=3)
    assert other.collect().fragment_id.split("-")[1] != nonce  # a restarted actor: new ids
    for frag in _decoded(sink):
        assert frag.actor_id == 3 and frag.policy_version == 0
        assert frag.actions.dtype == np.int64 and frag.actions.shape == (8, 4)
        assert frag.obs.shape == (9, 4, 4) and frag.obs.dtype == np.float32
        # A fresh policy is near uniform over CartPole's two actions.
        assert np.allclose(frag.behaviour_logp, math.log(0.5), atol=0.05)


def test_same_seed_and_weights_replay_the_same_fragments():
    weights = _weights(_spec(EnvConfig()))

    def first_fragment(actor_id: int):
        actor, _ = _actor(
            "CartPole-v1",
            num_envs=4,
            unroll_length=16,
            actor_id=actor_id,
            weights=LocalWeights(weights),
        )
        return actor.collect()

    a, b, c = first_fragment(0), first_fragment(0), first_fragment(1)
    for name in ("obs", "actions", "rewards", "behaviour_logp"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert not np.array_equal(a.obs, c.obs)


def test_continuous_actions_are_stored_unclipped_and_clipped_for_the_env():
    env_kwargs = {"length": None, "continuous": True}
    spec = _spec(EnvConfig(id=scripted_env.CALLABLE_ID, kwargs=env_kwargs))
    weights = _weights(spec)
    weights["log_std"] = np.full_like(weights["log_std"], math.log(5.0))  # wide: many outside
    actor, _ = _actor(
        scripted_env.CALLABLE_ID,
        num_envs=4,
        unroll_length=8,
        env_kwargs=env_kwargs,
        weights=LocalWeights(weights),
    )
    frag = actor.collect()
    assert frag.actions.shape == (8, 4, 1) and frag.actions.dtype == np.float32
    assert (np.abs(frag.actions) > 1).any()  # the Gaussian sample, not clipped
    # Column 2 of the scripted obs is the action the env received: the clipped one.
    np.testing.assert_array_equal(frag.obs[1:, :, 2], np.clip(frag.actions[..., 0], -1, 1))
    # The stored log-prob is the learner's log pi of the stored (unclipped) action.
    learner_view = make_policy(spec)
    load_numpy_state_dict(learner_view, weights)
    with torch.no_grad():
        logp = learner_view.evaluate(torch.as_tensor(frag.obs), torch.as_tensor(frag.actions)).logp
    np.testing.assert_allclose(frag.behaviour_logp, logp.numpy(), rtol=1e-5, atol=1e-5)


def test_pong_fragment_has_uint8_frames_each_stored_once():
    pytest.importorskip("ale_py")
    actor, sink = _actor("ALE/Pong-v5", num_envs=2, unroll_length=4)
    frag = actor.collect()
    # 4 + 4 frames per env column, not 4 + 1 stacks of 4 (tests/test_frames.py: the stacks).
    assert frag.obs.shape == (8, 2, 84, 84) and frag.obs.dtype == np.uint8
    assert frag.frame_stack == 4 and frag.stacked_obs().shape == (5, 2, 4, 84, 84)
    assert _decoded(sink)[0].obs.dtype == np.uint8
    actor.close()


# -- weights: sync_every, max_lag --------------------------------------------------------------


class CountingWeights(LocalWeights):
    def __init__(self, weights=None):
        super().__init__(weights)
        self.fetches = 0

    def fetch(self, have_version):
        self.fetches += 1
        return super().fetch(have_version)


def test_sync_every_sets_how_stale_the_acting_weights_get():
    spec = _spec(EnvConfig())
    source = CountingWeights(_weights(spec))
    actor, _ = _actor("CartPole-v1", num_envs=2, unroll_length=4, weights=source, sync_every=3)
    versions = []
    for _ in range(7):
        versions.append(actor.collect().policy_version)
        source.publish(_weights(spec))  # the learner moves on after every fragment
    assert versions == [0, 0, 0, 3, 3, 3, 6]
    stats = actor.stats()
    assert stats.weight_syncs == 3 and stats.policy_version == 6
    assert source.fetches == 3  # one call per sync: nothing is asked between syncs


def test_synced_weights_really_drive_the_actor():
    spec = _spec(EnvConfig())
    source = LocalWeights()  # nothing published yet: the actor acts with its own init
    actor, _ = _actor("CartPole-v1", num_envs=8, unroll_length=16, weights=source)
    assert actor.policy_version == -1
    before = actor.collect()
    assert before.policy_version == 0 and set(np.unique(before.actions)) == {0, 1}
    source.publish(_weights(spec, head_bias=[-20.0, 20.0]))  # always push right
    after = actor.collect()
    assert after.policy_version == 0 and actor.policy_version == 0
    assert (after.actions == 1).all()
    assert (after.behaviour_logp > -1e-6).all()


def test_max_lag_forces_a_sync_before_acting():
    spec = _spec(EnvConfig())
    source = LocalWeights(_weights(spec))
    actor, _ = _actor(
        "CartPole-v1", num_envs=2, unroll_length=4, weights=source, sync_every=100, max_lag=1
    )
    source.publish(_weights(spec))  # version 1: lag 1 is allowed
    assert actor.collect().policy_version == 0
    source.publish(_weights(spec))  # version 2: lag 2 is not
    assert actor.collect().policy_version == 2
    stats = actor.stats()
    assert stats.max_lag_waits == 1 and stats.weight_syncs == 2


def test_max_lag_costs_one_call_per_fragment_and_never_waits():
    """Between syncs, max_lag asks once per fragment; weights move only when over the bound."""
    spec = _spec(EnvConfig())
    source = CountingWeights(_weights(spec))
    actor, _ = _actor(
        "CartPole-v1", num_envs=2, unroll_length=4, weights=source, sync_every=100, max_lag=2
    )
    versions = []
    for _ in range(6):
        versions.append(actor.collect().policy_version)
        source.publish(_weights(spec))
    assert versions == [0, 0, 0, 3, 3, 3]  # v3 was 3 > max_lag ahead of v0: loaded at once
    assert source.fetches == 1 + 6  # the first sync, then one call before each fragment
    stats = actor.stats()
    assert stats.weight_syncs == 2 and stats.max_lag_waits == 1


class StopAfterSink(MemorySink):
    def __init__(self, stop: threading.Event, count: int):
        super().__init__()
        self.stop, self.count = stop, count

    def put(self, data: bytes) -> None:
        super().put(data)
        if len(self.items) == self.count:
            self.stop.set()


def test_run_sends_every_collected_fragment_then_flushes():
    stop = threading.Event()
    sink = StopAfterSink(stop, 3)
    actor, _ = _actor("CartPole-v1", num_envs=2, unroll_length=4, sink=sink)
    actor.run(stop)
    assert len(sink.items) == 3 and sink.flushes == 1
    assert actor.stats().fragments == 3
    assert [f.fragment_id.rsplit("-", 1)[1] for f in _decoded(sink)] == ["0", "1", "2"]


def test_run_collects_up_to_its_step_limit_and_waits_for_more():
    actor, sink = _actor("CartPole-v1", num_envs=2, unroll_length=4)  # 8 steps per fragment
    actor.set_step_limit(20)  # 20 is not a whole number of fragments: the third one crosses it
    stop = threading.Event()
    thread = threading.Thread(target=actor.run, args=(stop,), name="test-rollout")
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while actor.stats().env_steps < 24 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert actor.stats().env_steps == 24, "it stops at the fragment that reaches the limit"
        actor.set_step_limit(40)
        while actor.stats().env_steps < 40 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        assert actor.stats().env_steps == 40
    finally:
        stop.set()
        thread.join(timeout=30)
    assert not thread.is_alive() and len(sink.items) == 5


def test_stats_split_the_actors_time_into_inference_and_envs():
    slow = {"step_delay_s": 0.01}  # the scripted env sleeps this long per step
    actor, _ = _actor(scripted_env.CALLABLE_ID, num_envs=2, unroll_length=4, env_kwargs=slow)
    for _ in range(3):
        actor.collect()
    stats = actor.stats()
    assert stats.env_s >= 3 * 4 * 0.01, "a sleep lasts at least its time"
    assert 0 < stats.inference_s < stats.env_s


# -- failures --------------------------------------------------------------------------------


def test_env_error_rebuilds_the_env_and_drops_broken_episodes():
    env_config = EnvConfig(id=scripted_env.CALLABLE_ID)
    actor, sink = _actor(scripted_env.CALLABLE_ID, num_envs=2, unroll_length=5)
    first = actor.collect()
    # 3 steps, an autoreset step, then 1 step of an episode that the failure will cut short.
    assert first.obs[-1, :, 0].tolist() == [1, 1]
    scripted_env.ScriptedEnv.failures_left = 1
    second = actor.collect()
    # A fresh env with new seeds: row 0 is a reset observation, not an autoreset step.
    assert second.obs[0, :, 0].tolist() == [0, 0]
    assert second.obs[0, :, 1].tolist() == env_seeds(env_config, 0, num_envs=2, generation=1)
    assert not second.autoreset[0].any()
    assert second.rewards[:, 0].tolist() == [1, 2, 3, 0, 1]
    stats = actor.stats()
    assert stats.env_errors == 1 and stats.fragments == 2
    # Only whole episodes: the one cut short (return 1 so far) is not reported.
    assert stats.episode_returns == [6.0] * 4 and stats.episode_lengths == [3] * 4
    assert len(_decoded(sink)) == 2


def test_reset_failures_at_start_and_during_a_rebuild_are_recovered():
    env_config = EnvConfig(id=scripted_env.CALLABLE_ID)
    scripted_env.ScriptedEnv.reset_failures_left = 1
    actor, sink = _actor(scripted_env.CALLABLE_ID, num_envs=2, unroll_length=4)
    assert actor.stats().env_errors == 1
    first = actor.collect()
    assert first.obs[0, :, 1].tolist() == env_seeds(env_config, 0, num_envs=2, generation=1)
    # A step fails, then the rebuilt env's first reset fails too: two errors, one fragment.
    scripted_env.ScriptedEnv.failures_left = 1
    scripted_env.ScriptedEnv.reset_failures_left = 1
    second = actor.collect()
    assert second.obs[0, :, 1].tolist() == env_seeds(env_config, 0, num_envs=2, generation=3)
    assert second.obs[0, :, 0].tolist() == [0, 0] and not second.autoreset[0].any()
    assert actor.stats().env_errors == 3
    assert len(_decoded(sink)) == 2


def test_a_fragment_the_codec_refuses_is_dropped_counted_and_the_env_rebuilt():
    actor, sink = _actor(scripted_env.CALLABLE_ID, num_envs=2, unroll_length=4)
    scripted_env.ScriptedEnv.nan_rewards_left = 1
    actor.collect()
    assert sink.items == []
    stats = actor.stats()
    assert stats.invalid_fragments == 1 and stats.fragments == 0
    assert stats.episode_returns == []  # the NaN-poisoned episode is not reported
    frag = actor.collect()
    assert frag.obs[0, :, 0].tolist() == [0, 0]  # a fresh env, no NaN return carried over
    assert frag.rewards[:, 0].tolist() == [1, 2, 3, 0]
    assert actor.stats().episode_returns == [6.0, 6.0]
    assert [f.fragment_id for f in _decoded(sink)] == [frag.fragment_id]


def test_an_env_that_keeps_failing_raises():
    actor, sink = _actor(scripted_env.CALLABLE_ID, num_envs=2, unroll_length=5)
    scripted_env.ScriptedEnv.failures_left = 1000
    with pytest.raises(RuntimeError, match="environment errors in a row"):
        actor.collect()
    assert actor.stats().env_errors == MAX_CONSECUTIVE_ENV_ERRORS
    assert sink.items == []


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"num_envs": 0}, "num_envs"),
        ({"unroll_length": 0}, "unroll_length"),
        ({"sync_every": 0}, "sync_every"),
        ({"max_lag": -1}, "max_lag"),
        ({"max_lag": 1.5}, "max_lag"),
        ({"num_envs": MAX_NUM_ENVS + 1}, "num_envs"),
        ({"torch_threads": 0}, "torch_threads"),
    ],
)
def test_actor_config_rejects_bad_values_naming_the_field(changes, field):
    with pytest.raises(FieldError, match=f"^{field}") as info:
        ActorConfig(**changes)
    assert info.value.field == field
    assert all(f.metadata.get("doc") for f in dataclasses.fields(ActorConfig))


def test_actor_num_envs_sets_the_vector_env_and_a_mismatched_spec_is_refused():
    env_config = EnvConfig()
    spec = _spec(env_config)
    kwargs = {"sink": MemorySink(), "weights": LocalWeights()}
    actor = RolloutActor(0, env_config, ActorConfig(num_envs=8, unroll_length=2), spec, **kwargs)
    assert actor.collect().obs.shape == (3, 8, 4)
    pendulum = EnvConfig(id="Pendulum-v1")
    with pytest.raises(ValueError, match="observations have shape"):
        RolloutActor(0, pendulum, ActorConfig(num_envs=4), spec, **kwargs)
