"""Vectorised environments for the rollout actors.

`make_vec_env(config, num_envs=N, actor_id=A)` turns an `EnvConfig` into a Gymnasium vector env:

- the id's native vector env when it has one (CartPole's steps all copies in one numpy call,
  far faster than separate copies in a `SyncVectorEnv`; benchmarks/README.md has figures);
- for `ALE/...` ids (the `atari` extra) the standard Atari preprocessing: frame skip 4 with
  max-pooling of the last two frames, 84x84 grey, up to 30 no-ops after reset, no episode end
  on life loss, 4 stacked frames: `uint8 [4, 84, 84]` observations. ale-py's own C++ vector env
  (`AtariVectorEnv`) does all of it without OpenCV; without it (old ale-py) Gymnasium's
  `AtariPreprocessing` + `FrameStackObservation` wrappers in a `SyncVectorEnv` (needs OpenCV).
  Rewards are not clipped here: episode returns are the game's score; clipping for the loss
  is the learner's business;
- `offpg/CartPoleNoVel-v1`, registered here: CartPole without its velocities, a memory task
  (`actors.partial_obs`), with a native vector env like CartPole's;
- any other Gymnasium id, or a user's `package.module:callable` returning a `gymnasium.Env`, in
  a `SyncVectorEnv`.

Every env uses Gymnasium's next-step autoreset (see `replay.trajectory` for why the schema
depends on it), and Box actions are clipped to their bounds by `ClipActions` just before the env
sees them: the actor stores the unclipped sample, whose log-probability it knows.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorActionWrapper, VectorEnv

from actors.partial_obs import CARTPOLE_NOVEL_ID
from learner.spec import OBS_DTYPES, PolicySpec
from replay.fields import FieldError, check, setting

if CARTPOLE_NOVEL_ID not in gym.registry:
    gym.register(
        CARTPOLE_NOVEL_ID,
        entry_point="actors.partial_obs:CartPoleNoVelEnv",
        vector_entry_point="actors.partial_obs:CartPoleNoVelVectorEnv",
        max_episode_steps=500,
        reward_threshold=475.0,
    )

#: Seeds of different actors are this far apart: actor a, env i gets `seed + a * STRIDE + i`.
SEED_STRIDE = 1_000_003


class FrozenKwargs(dict):
    """A read-only, hashable dict: `EnvConfig.kwargs` stays a plain mapping for TOML, JSON and
    `gym.make(**kwargs)`, yet the frozen config can still be hashed and shared."""

    def __hash__(self) -> int:  # type: ignore[override]
        return hash(tuple(sorted((k, _hashable(v)) for k, v in self.items())))

    def _readonly(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError("EnvConfig.kwargs is read-only; use dataclasses.replace(config, ...)")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _readonly  # type: ignore[assignment]
    __ior__ = _readonly  # type: ignore[assignment]

    def __reduce__(self) -> tuple[Any, ...]:
        # dict's default pickling calls __setitem__ on a new instance; rebuild in one go instead.
        return (FrozenKwargs, (dict(self),))


def _hashable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    return value


#: Upper bound of a seed (actor a, env i adds a * SEED_STRIDE + i to it).
MAX_SEED = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class EnvConfig:
    """Which environment the actors play and how each copy of it is built; one per job. How
    many copies an actor steps is the actor's business (`actors.config.ActorConfig.num_envs`)."""

    id: str = setting(
        "CartPole-v1",
        "Gymnasium id (e.g. CartPole-v1, Pendulum-v1, ALE/Pong-v5 with the atari extra) or "
        "'package.module:callable' returning a gymnasium.Env",
        max_len=512,
    )
    seed: int = setting(
        0,
        "base seed; actor a, env i is seeded with seed + a * 1_000_003 + i (reproducible)",
        ge=0,
        le=MAX_SEED,
    )
    kwargs: Mapping[str, Any] = setting(
        FrozenKwargs(), "extra keyword arguments for gym.make (or the user's callable)"
    )
    frame_stack: int = setting(
        4, "frames stacked into one observation for ALE ids; 1 disables", ge=1, le=64
    )
    atari_frame_skip: int = setting(
        4, "ALE: frames each action is repeated (max-pooled)", ge=1, le=64
    )
    atari_screen_size: int = setting(
        84, "ALE: observation height and width after resizing", ge=8, le=1024
    )
    atari_noop_max: int = setting(
        30, "ALE: at most this many no-op actions after each reset", ge=0, le=100_000
    )
    atari_terminal_on_life_loss: bool = setting(
        False, "ALE: end the episode when a life is lost (off: the standard evaluation setting)"
    )
    atari_num_threads: int = setting(
        1,
        "ALE: emulator threads of ale-py's vector env per actor (an actor has about one core)",
        ge=1,
        le=256,
    )

    def __post_init__(self) -> None:
        check(self)
        if not self.id.strip():
            raise FieldError("id", f"must be a non-empty string, got {self.id!r}")
        if not isinstance(self.kwargs, Mapping) or not all(isinstance(k, str) for k in self.kwargs):
            raise FieldError("kwargs", f"must be a mapping with string keys, got {self.kwargs!r}")
        if "num_envs" in self.kwargs:
            raise FieldError("kwargs", "must not contain num_envs (set actors.num_envs)")
        if not isinstance(self.kwargs, FrozenKwargs):
            object.__setattr__(self, "kwargs", FrozenKwargs(self.kwargs))

    @property
    def is_atari(self) -> bool:
        return is_atari_id(self.id)


def is_atari_id(env_id: str) -> bool:
    """True for Arcade Learning Environment ids (`ALE/Pong-v5`)."""
    return env_id.startswith("ALE/")


def _split_callable(env_id: str) -> tuple[str, str] | None:
    """`package.module:callable` -> (module, attribute); None for a Gymnasium id.

    Gymnasium's own `module:EnvName-v0` form (import a module, then use a registered id) has a
    hyphen after the colon, so it is not a Python identifier and stays a Gymnasium id. Raises
    `FieldError` when the part before the colon is not a module name (`.x:f`).
    """
    module, sep, attr = env_id.partition(":")
    if not (sep and attr.isidentifier()):
        return None
    if not all(part.isidentifier() for part in module.split(".")):
        raise FieldError("id", f"{module!r} is not a module name (package.module:callable)")
    return module, attr


def _import_ale() -> None:
    try:
        import ale_py
    except ImportError as err:
        raise FieldError(
            "id", "Atari ids (ALE/...) need the atari extra: pip install 'offpg[atari]' (ale-py)"
        ) from err
    gym.register_envs(ale_py)


def _load_callable(module: str, attr: str) -> Callable[..., gym.Env]:
    try:
        mod = importlib.import_module(module)
    except Exception as err:  # a user's module may fail to import in any way: a config error
        raise FieldError(
            "id", f"cannot import module {module!r} for env callable: {type(err).__name__}: {err}"
        ) from err
    factory = getattr(mod, attr, None)
    if not callable(factory):
        raise FieldError("id", f"{module!r} has no callable named {attr!r}")
    return factory


def check_env_id(env_id: str) -> None:
    """Raise `FieldError` (field "id") unless `env_id` can be built here.

    Cheap enough for config validation before Ray starts: it imports modules and reads the
    registry but builds no environment.
    """
    target = _split_callable(env_id)
    if target is not None:
        _load_callable(*target)
        return
    if is_atari_id(env_id):
        _import_ale()
    try:
        gym.spec(env_id)
    except Exception as err:  # `module:Name-v0` imports the user's module, which may raise anything
        raise FieldError(
            "id",
            f"unknown environment {env_id!r} ({err}); use a Gymnasium id such as "
            "'CartPole-v1' or 'package.module:callable'",
        ) from err


def _has_native_vector_env(env_id: str) -> bool:
    spec = gym.spec(env_id)
    return spec.vector_entry_point is not None and not spec.additional_wrappers


def _single_env_factory(config: EnvConfig) -> Callable[[], gym.Env]:
    """A zero-argument function building one (wrapped) environment."""
    kwargs = dict(config.kwargs)
    target = _split_callable(config.id)
    if target is not None:
        factory = _load_callable(*target)

        def make_user_env() -> gym.Env:
            env = factory(**kwargs)
            if not isinstance(env, gym.Env):
                raise TypeError(
                    f"id: {config.id} returned {type(env).__name__}, expected a gymnasium.Env"
                )
            return env

        return make_user_env
    if config.is_atari:

        def make_atari() -> gym.Env:
            # Frame skipping happens in AtariPreprocessing (with max-pooling of the last two
            # frames), so the emulator itself must not skip.
            env = gym.make(config.id, **{**kwargs, "frameskip": 1})
            env = gym.wrappers.AtariPreprocessing(
                env,
                noop_max=config.atari_noop_max,
                frame_skip=config.atari_frame_skip,
                screen_size=config.atari_screen_size,
                terminal_on_life_loss=config.atari_terminal_on_life_loss,
                grayscale_obs=True,
            )
            if config.frame_stack > 1:
                env = gym.wrappers.FrameStackObservation(env, config.frame_stack)
            return env

        return make_atari
    return lambda: gym.make(config.id, **kwargs)


class ClipActions(VectorActionWrapper):
    """Clip Box actions to the action space's bounds before the env steps.

    The policy's Gaussian sample is unbounded; its log-probability is only known for the
    unclipped value, so that is what the actor stores. The input array is not modified.
    """

    def __init__(self, env: VectorEnv):
        super().__init__(env)
        space = env.single_action_space
        if not isinstance(space, gym.spaces.Box):
            raise TypeError(f"ClipActions needs a Box action space, got {space}")
        self._low = space.low.astype(space.dtype)
        self._high = space.high.astype(space.dtype)

    def actions(self, actions: np.ndarray) -> np.ndarray:
        return np.clip(actions, self._low, self._high).astype(self._low.dtype, copy=False)


def make_vec_env(config: EnvConfig, *, num_envs: int, actor_id: int) -> VectorEnv:
    """Build (not reset) the vector env of `num_envs` envs of one actor; reset it with
    `seeded_reset`.

    Raises `ValueError` for an unknown id or a missing `atari` extra, and `RuntimeError` when
    the result does not use next-step autoreset (the fragment schema relies on it).
    """
    if actor_id < 0:
        raise ValueError(f"actor_id must be >= 0, got {actor_id}")
    check_env_id(config.id)
    if config.is_atari and _has_native_vector_env(config.id):
        env = gym.make_vec(
            config.id,
            num_envs,
            vectorization_mode="vector_entry_point",
            **{
                **dict(config.kwargs),
                "frameskip": config.atari_frame_skip,
                "maxpool": True,
                "img_height": config.atari_screen_size,
                "img_width": config.atari_screen_size,
                "grayscale": True,
                "stack_num": config.frame_stack,
                "noop_max": config.atari_noop_max,
                "episodic_life": config.atari_terminal_on_life_loss,
                "reward_clipping": False,
                "use_fire_reset": False,
                "num_threads": config.atari_num_threads,
                "autoreset_mode": AutoresetMode.NEXT_STEP,
            },
        )
    elif _split_callable(config.id) is None and not config.is_atari:
        if _has_native_vector_env(config.id):
            env = gym.make_vec(
                config.id, num_envs, vectorization_mode="vector_entry_point", **dict(config.kwargs)
            )
        else:
            env = gym.make_vec(
                config.id,
                num_envs,
                vectorization_mode="sync",
                vector_kwargs={"autoreset_mode": AutoresetMode.NEXT_STEP},
                **dict(config.kwargs),
            )
    else:
        factory = _single_env_factory(config)
        env = gym.vector.SyncVectorEnv(
            [factory] * num_envs, autoreset_mode=AutoresetMode.NEXT_STEP, copy=True
        )
    mode = env.metadata.get("autoreset_mode")
    if mode != AutoresetMode.NEXT_STEP and mode != AutoresetMode.NEXT_STEP.value:
        env.close()
        raise RuntimeError(
            f"id: {config.id} gives a vector env with autoreset_mode={mode!r}; offpg needs "
            "next-step autoreset (the step after an episode end only resets the env)"
        )
    if isinstance(env.single_action_space, gym.spaces.Box):
        env = ClipActions(env)
    return env


def env_seeds(config: EnvConfig, actor_id: int, *, num_envs: int, generation: int = 0) -> list[int]:
    """Seeds of the `num_envs` envs of one actor: `seed + actor_id * 1_000_003 + i`.

    `generation` > 0 gives fresh seeds for an env rebuilt after an error (so a deterministic
    crash is not replayed), still reproducible and inside this actor's seed range.
    """
    base = config.seed + actor_id * SEED_STRIDE + generation * num_envs
    return [base + i for i in range(num_envs)]


def seeded_reset(env: VectorEnv, seeds: Iterable[int]) -> tuple[np.ndarray, dict[str, Any]]:
    """Reset `env` with one seed per sub-env.

    `SyncVectorEnv` takes the list, ale-py's Atari vector env an array. Other native vector
    envs (CartPole) have one random generator for all columns and accept only an int, so they
    get the first seed (the columns still differ, drawn from that one generator).
    """
    seeds = list(seeds)
    base = env.unwrapped
    if isinstance(base, gym.vector.SyncVectorEnv | gym.vector.AsyncVectorEnv):
        return env.reset(seed=seeds)
    if type(base).__name__ == "AtariVectorEnv":  # ale-py's takes one seed per env as an array
        return env.reset(seed=np.asarray(seeds, dtype=np.int64))
    return env.reset(seed=seeds[0])


def probe_spaces(config: EnvConfig) -> tuple[gym.Space, gym.Space]:
    """`(single_observation_space, single_action_space)` of the env `config` builds."""
    env = make_vec_env(config, num_envs=1, actor_id=0)
    try:
        return env.single_observation_space, env.single_action_space
    finally:
        env.close()


def stored_frame_stack(config: EnvConfig, spec: PolicySpec) -> int:
    """K when the observations are `config.frame_stack` stacked frames, channels first (`uint8
    [K, H, W]`, as ALE ids give): fragments then carry each frame once (`replay.frames`); else
    1."""
    k = config.frame_stack
    stacked = spec.obs_dtype == "uint8" and len(spec.obs_shape) == 3 and spec.obs_shape[0] == k
    return k if k > 1 and stacked else 1


def policy_spec(
    observation_space: gym.Space,
    action_space: gym.Space,
    *,
    network: str | None = None,
    hidden_sizes: tuple[int, ...] = (64, 64),
    shared_torso: bool | None = None,
    core: str = "none",
    core_size: int = 0,
) -> PolicySpec:
    """The `PolicySpec` for Gymnasium single-env spaces (`Box` observations; `Discrete` or 1-D
    `Box` actions). `network` defaults to `impala_shallow` for 3-D `uint8` observations and
    `mlp` otherwise."""
    if not isinstance(observation_space, gym.spaces.Box):
        raise ValueError(f"observations must be a Box space, got {observation_space}")
    obs_shape = tuple(observation_space.shape)
    obs_dtype = np.dtype(observation_space.dtype).name
    if obs_dtype not in OBS_DTYPES:
        # Actors cast float64 observations (some custom envs) to float32.
        if np.issubdtype(observation_space.dtype, np.floating):
            obs_dtype = "float32"
        else:
            raise ValueError(f"observation dtype {obs_dtype} is not float or uint8")
    if network is None:
        network = "impala_shallow" if len(obs_shape) == 3 and obs_dtype == "uint8" else "mlp"
    common = dict(
        obs_shape=obs_shape,
        obs_dtype=obs_dtype,
        network=network,
        hidden_sizes=tuple(hidden_sizes),
        shared_torso=shared_torso,
        core=core,
        core_size=core_size,
    )
    if isinstance(action_space, gym.spaces.Discrete):
        if int(action_space.start) != 0:
            raise ValueError(f"Discrete actions must start at 0, got {action_space}")
        return PolicySpec(action_kind="discrete", action_dim=int(action_space.n), **common)
    if isinstance(action_space, gym.spaces.Box):
        if len(action_space.shape) != 1:
            raise ValueError(f"Box actions must be 1-D, got shape {action_space.shape}")
        return PolicySpec(
            action_kind="continuous",
            action_dim=int(action_space.shape[0]),
            action_low=tuple(float(v) for v in action_space.low),
            action_high=tuple(float(v) for v in action_space.high),
            **common,
        )
    raise ValueError(f"actions must be Discrete or Box, got {action_space}")
