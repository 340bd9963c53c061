"""actors/envs.py: config validation, env construction, autoreset mode, seeds, action clipping."""

from __future__ import annotations

import dataclasses
import pickle
import sys

import gymnasium as gym
import numpy as np
import pytest
import scripted_env
from gymnasium.vector import AutoresetMode

from actors.envs import (
    SEED_STRIDE,
    ClipActions,
    EnvConfig,
    check_env_id,
    env_seeds,
    make_vec_env,
    policy_spec,
    probe_spaces,
    seeded_reset,
)
from replay.fields import FieldError


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"id": ""}, "id"),
        ({"seed": -1}, "seed"),
        ({"seed": True}, "seed"),
        ({"seed": 2**40}, "seed"),
        ({"frame_stack": 0}, "frame_stack"),
        ({"atari_noop_max": -1}, "atari_noop_max"),
        ({"atari_terminal_on_life_loss": "yes"}, "atari_terminal_on_life_loss"),
        ({"kwargs": [("a", 1)]}, "kwargs"),
        ({"kwargs": {"num_envs": 3}}, "kwargs"),
    ],
)
def test_env_config_rejects_bad_values_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=f"^{field}"):
        EnvConfig(**changes)


def test_env_config_is_documented_hashable_and_picklable():
    config = EnvConfig(kwargs={"length": 4})
    assert all(f.metadata.get("doc") for f in dataclasses.fields(EnvConfig))
    assert hash(config) == hash(EnvConfig(kwargs={"length": 4}))
    assert pickle.loads(pickle.dumps(config)) == config
    assert dataclasses.asdict(config)["kwargs"] == {"length": 4}
    with pytest.raises(TypeError, match="read-only"):
        config.kwargs["length"] = 5  # type: ignore[index]


def test_check_env_id_explains_unknown_ids():
    check_env_id("CartPole-v1")
    check_env_id(scripted_env.CALLABLE_ID)
    with pytest.raises(ValueError, match=r"^id: unknown environment 'NoSuchEnv-v0'"):
        check_env_id("NoSuchEnv-v0")
    with pytest.raises(ValueError, match=r"^id: cannot import module 'no_such_module'"):
        check_env_id("no_such_module:make")
    with pytest.raises(ValueError, match=r"^id: 'scripted_env' has no callable named 'nope'"):
        check_env_id("scripted_env:nope")
    with pytest.raises(FieldError, match=r"^id: '\.x' is not a module name") as info:
        check_env_id(".x:f")  # import_module('.x') would raise TypeError
    assert info.value.field == "id"


def test_check_env_id_names_the_atari_extra_when_ale_py_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "ale_py", None)  # makes `import ale_py` fail
    with pytest.raises(ValueError, match=r"^id: .*atari extra"):
        check_env_id("ALE/Pong-v5")


def test_native_vector_env_is_used_when_the_id_has_one():
    env = make_vec_env(EnvConfig(), num_envs=3, actor_id=0)
    assert type(env).__name__ == "CartPoleVectorEnv"
    assert env.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    obs, _ = seeded_reset(env, env_seeds(EnvConfig(), 0, num_envs=3))
    assert obs.shape == (3, 4) and obs.dtype == np.float32
    env.close()


def test_other_ids_use_a_next_step_sync_vector_env():
    for env_id in ("Acrobot-v1", scripted_env.CALLABLE_ID, scripted_env.TRUNCATED_ID):
        env = make_vec_env(EnvConfig(id=env_id), num_envs=2, actor_id=0)
        assert isinstance(env.unwrapped, gym.vector.SyncVectorEnv), env_id
        assert env.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
        env.close()


def test_a_vector_env_without_next_step_autoreset_is_refused():
    env_id = "offpg-test/SameStepVector-v0"
    if env_id not in gym.registry:
        gym.register(
            env_id,
            entry_point=scripted_env.ScriptedEnv,
            vector_entry_point=lambda num_envs, **kwargs: gym.vector.SyncVectorEnv(
                [scripted_env.ScriptedEnv] * num_envs, autoreset_mode=AutoresetMode.SAME_STEP
            ),
        )
    with pytest.raises(RuntimeError, match="next-step autoreset"):
        make_vec_env(EnvConfig(id=env_id), num_envs=2, actor_id=0)


def test_user_callable_env_gets_kwargs():
    config = EnvConfig(id=scripted_env.CALLABLE_ID, kwargs={"length": 2})
    env = make_vec_env(config, num_envs=2, actor_id=0)
    seeded_reset(env, env_seeds(config, 0, num_envs=2))
    _, _, terminated, _, _ = env.step(np.zeros(2, np.int64))
    assert not terminated.any()
    _, _, terminated, _, _ = env.step(np.zeros(2, np.int64))
    assert terminated.all()


def test_seeds_are_distinct_per_actor_and_env_and_reach_every_env():
    config = EnvConfig(id=scripted_env.CALLABLE_ID, seed=7)
    seeds = [env_seeds(config, actor, num_envs=4) for actor in range(3)]
    assert seeds[1] == [7 + SEED_STRIDE + i for i in range(4)]
    flat = [s for actor in seeds for s in actor]
    assert len(set(flat)) == len(flat)
    assert set(env_seeds(config, 1, num_envs=4, generation=1)).isdisjoint(seeds[1])
    env = make_vec_env(config, num_envs=4, actor_id=1)
    obs, _ = seeded_reset(env, seeds[1])
    assert obs[:, 1].tolist() == seeds[1]  # column 1 of the scripted obs is the reset seed


def _first_obs(env_id: str, actor_id: int) -> np.ndarray:
    config = EnvConfig(id=env_id, seed=3)
    env = make_vec_env(config, num_envs=4, actor_id=actor_id)
    obs, _ = seeded_reset(env, env_seeds(config, actor_id, num_envs=4))
    for _ in range(5):
        obs, *_ = env.step(np.ones(4, np.int64))
    env.close()
    return obs


@pytest.mark.parametrize("env_id", ["CartPole-v1", "Acrobot-v1"])
def test_seeding_is_reproducible_and_differs_between_actors_and_envs(env_id):
    a0, a0_again, a1 = _first_obs(env_id, 0), _first_obs(env_id, 0), _first_obs(env_id, 1)
    np.testing.assert_array_equal(a0, a0_again)
    assert not np.allclose(a0, a1)
    assert len({row.tobytes() for row in a0}) == 4  # the envs of one actor differ too


def test_clip_actions_clips_what_the_env_sees_but_not_the_callers_array():
    config = EnvConfig(id=scripted_env.CALLABLE_ID, kwargs={"continuous": True})
    env = make_vec_env(config, num_envs=3, actor_id=0)
    assert isinstance(env, ClipActions)
    seeded_reset(env, env_seeds(config, 0, num_envs=3))
    actions = np.array([[5.0], [-3.0], [0.25]], np.float32)
    obs, *_ = env.step(actions)
    assert obs[:, 2].tolist() == [1.0, -1.0, 0.25]  # column 2: the action the env received
    assert actions[:, 0].tolist() == [5.0, -3.0, 0.25]


def test_probe_spaces():
    obs_space, act_space = probe_spaces(EnvConfig(id="Pendulum-v1"))
    assert obs_space.shape == (3,) and act_space.shape == (1,)
    obs_space, act_space = probe_spaces(EnvConfig())
    assert obs_space.shape == (4,) and act_space.n == 2


def test_policy_spec_discrete_and_box():
    spec = policy_spec(*probe_spaces(EnvConfig(id="CartPole-v1")))
    assert spec.obs_shape == (4,) and spec.obs_dtype == "float32"
    assert spec.action_kind == "discrete" and spec.action_dim == 2
    assert spec.network == "mlp" and spec.action_low is None

    spec = policy_spec(*probe_spaces(EnvConfig(id="Pendulum-v1")))
    assert spec.action_kind == "continuous" and spec.action_dim == 1
    assert spec.action_low == (-2.0,) and spec.action_high == (2.0,)

    image = gym.spaces.Box(0, 255, (84, 84, 4), np.uint8)
    spec = policy_spec(image, gym.spaces.Discrete(6))
    assert spec.network == "impala_shallow" and spec.obs_dtype == "uint8"


def test_atari_pong_gets_standard_preprocessing():
    pytest.importorskip("ale_py")
    config = EnvConfig(id="ALE/Pong-v5")
    env = make_vec_env(config, num_envs=2, actor_id=0)
    assert env.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    assert env.single_observation_space.shape == (4, 84, 84)
    obs, _ = seeded_reset(env, env_seeds(config, 0, num_envs=2))
    assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
    obs, rewards, terminated, truncated, _ = env.step(np.zeros(2, np.int64))
    assert obs.shape == (2, 4, 84, 84) and obs.dtype == np.uint8
    assert rewards.shape == terminated.shape == truncated.shape == (2,)
    assert env.single_action_space.n == 6
    env.close()
