"""The trajectory schema, defined once.

A `Fragment` is `T` consecutive steps of `N` environments stepped in lockstep by one rollout
actor, time-major. `FIELDS` below is the single table of the per-step arrays: the codec, the
validation, the service's byte accounting and the tests all derive from it.

Autoreset. Gymnasium 1.x vector environments reset *on the step after* an episode ends
("next-step" autoreset): the step that follows a `terminated` or `truncated` step ignores the
action, returns reward 0 and the first observation of the new episode. That step is not a real
transition, so it is stored with `autoreset[t, n] = True` and every loss masks it out. Because of
this, `obs[t + 1]` at a step that ends an episode is the episode's real final observation, which
is exactly what a truncated (time-limited) episode must bootstrap from.

Layout, for one env column n and a fragment of T steps::

    obs[t]             the observation the policy acted on at step t       (t = 0 .. T)
                       (stacked image observations: each frame once, see below)
    actions[t]         the action taken at step t
    rewards[t]         the reward for that action
    terminated[t]      the episode reached a terminal state at step t: do not bootstrap
    truncated[t]       the episode was cut by a time limit at step t: bootstrap from obs[t + 1]
    autoreset[t]       step t only reset the env (always True right after a terminated or
                       truncated step); its action, reward and log-prob carry no meaning
    behaviour_logp[t]  log mu(actions[t] | obs[t]) under the policy that acted
    core_state         [2, N, S]: the recurrent core's (h, c) entering step 0, S = core_size;
                       S = 0 (an empty array) for a feed-forward policy

Frame stacks. With `frame_stack` = K > 1 (Atari: the last K frames, newest last, as one
`[K, H, W]` observation), `obs` holds each frame once: `[T + K, N, H, W]` instead of
`[T + 1, N, K, H, W]`, and `stack_resets [R, 2]` / `stack_heads [R, K-1, H, W]` hold the stacks
that do not continue the row before (after an episode reset); `replay.frames` says how, and
`stacked_obs()` rebuilds the observations the actor acted on. With K = 1 `obs` is
`[T + 1, N, *obs_shape]` and both are empty. Schema version 2 introduced this and
`core_state`; version 1 messages are refused by name.

Recurrent core resets. The core state entering step t is zero where step t is the first real
step of an episode: where step t - 1 was an autoreset step (`autoreset[t - 1]`), and after the
env was (re)built and reset. An autoreset step itself still carries the ending episode's state:
it acts on `obs[t]`, that episode's real final observation, whose value a truncated step
bootstraps from. `core_state` is stored after its reset, so the learner needs no flag for row 0
and resets row t >= 1 exactly where `autoreset[t - 1]`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np

from replay import frames

SCHEMA_VERSION = 2
#: Largest `policy_version` and `actor_id`: both become int64 columns of a `Batch`.
MAX_INT64 = 2**63 - 1
#: What each schema version changed; `version_mismatch` quotes it when refusing another version.
SCHEMA_CHANGES: dict[int, str] = {
    1: "the first versioned schema",
    2: "stores stacked frames once per fragment and adds core_state, the recurrent core's "
    "state at a fragment's first step",
}


def version_mismatch(version: object) -> str:
    """The message that refuses fragments of schema `version` (anything but `SCHEMA_VERSION`)."""
    if type(version) is int and 1 <= version < SCHEMA_VERSION:
        return (
            f"schema_version {version} is older than this build's {SCHEMA_VERSION} (version "
            f"{SCHEMA_VERSION} {SCHEMA_CHANGES[SCHEMA_VERSION]}): fragments written by an older "
            "offpg cannot be read; actors and replay must run the same offpg"
        )
    return f"unknown schema_version {version!r}: this build reads version {SCHEMA_VERSION}"


class InvalidFragment(ValueError):
    """A fragment (or its encoded bytes) breaks the schema; the message says exactly how."""

    def __init__(self, message: str, reason: str = "invalid"):
        super().__init__(message)
        #: A short machine-readable reason, used as the key of the `rejected` counters.
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """One per-step array of a fragment."""

    name: str
    #: numpy dtype names this field may have; the first is the canonical one.
    dtypes: tuple[str, ...]
    #: "T" for one row per step, "T+K" for one per step plus the bootstrap observation, with
    #: K = `frame_stack` (1 unless frames are stored once, see the module doc); "2" for a
    #: per-fragment pair of rows (the core state's h and c).
    rows: Literal["T", "T+K", "2"]
    #: True when the field has trailing per-step dimensions (observation or action shape).
    trailing: bool
    doc: str

    def num_rows(self, t: int, k: int = 1) -> int:
        """The length of the field's first axis in a fragment of `t` steps and frame stack `k`."""
        return {"T": t, "T+K": t + k, "2": 2}[self.rows]


FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec("obs", ("float32", "uint8"), "T+K", True, "observations; the last row bootstraps"),
    FieldSpec("actions", ("int64", "float32"), "T", True, "int64 index or float32 vector"),
    FieldSpec("rewards", ("float32",), "T", False, "reward of each step"),
    FieldSpec("terminated", ("bool",), "T", False, "episode ended in a terminal state"),
    FieldSpec("truncated", ("bool",), "T", False, "episode was cut by a time limit"),
    FieldSpec("autoreset", ("bool",), "T", False, "step only reset the env: masked out"),
    FieldSpec("behaviour_logp", ("float32",), "T", False, "log mu(a|s) of the acting policy"),
    FieldSpec("core_state", ("float32",), "2", True, "(h, c) entering step 0; [2, N, 0] if none"),
)
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in FIELDS)
#: Per-fragment metadata: name -> python type (arrays of finished episodes are separate).
META_FIELDS: dict[str, type] = {
    "policy_version": int,
    "actor_id": int,
    "fragment_id": str,
    "frame_stack": int,
}
#: Episodes that ended inside the fragment: 1-D arrays of equal length K.
EPISODE_FIELDS: dict[str, str] = {"episode_returns": "float32", "episode_lengths": "int32"}
#: The stacks of a frame-stacked `obs` that do not continue the row before (`replay.frames`).
STACK_FIELDS: tuple[str, ...] = ("stack_resets", "stack_heads")
#: Upper bound on `frame_stack`.
MAX_FRAME_STACK = 64


class _TimeMajor:
    """T and N of a time-major container, read off its `[T, N]` rewards."""

    rewards: np.ndarray

    @property
    def num_steps(self) -> int:
        """T, the number of steps (rows of `rewards`)."""
        return int(self.rewards.shape[0])

    @property
    def num_envs(self) -> int:
        """N, the number of environment columns."""
        return int(self.rewards.shape[1])


@dataclasses.dataclass(frozen=True, eq=False)
class Fragment(_TimeMajor):
    """`T` steps of `N` environments from one actor; see the module docstring for the layout."""

    obs: np.ndarray  # [T+1, N, *obs_shape] float32 | uint8; [T+K, N, H, W] when K > 1
    actions: np.ndarray  # [T, N, *action_shape] int64 | float32
    rewards: np.ndarray  # [T, N] float32
    terminated: np.ndarray  # [T, N] bool
    truncated: np.ndarray  # [T, N] bool
    autoreset: np.ndarray  # [T, N] bool
    behaviour_logp: np.ndarray  # [T, N] float32
    core_state: np.ndarray  # [2, N, core_size] float32 (core_size 0: feed-forward)
    policy_version: int
    actor_id: int
    fragment_id: str
    episode_returns: np.ndarray  # [E] float32
    episode_lengths: np.ndarray  # [E] int32
    frame_stack: int = 1  # K: frames per observation stored once each (1: obs as acted on)
    stack_resets: np.ndarray | None = None  # [R, 2] int32 (t, n); None: none (empty array)
    stack_heads: np.ndarray | None = None  # [R, K-1, H, W] like obs; None: none
    #: The learner version when the fragment reached the replay service, stamped there (not
    #: part of the encoded message); -1 before. `learner.metrics` splits the policy lag with it.
    insert_version: int = -1

    def __post_init__(self) -> None:
        _fill_stack_fields(self)

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (what the replay service's byte capacity counts)."""
        names = (*FIELD_NAMES, *EPISODE_FIELDS, *STACK_FIELDS)
        return sum(getattr(self, f).nbytes for f in names)

    def stacked_obs(self) -> np.ndarray:
        """The observations as acted on, `[T+1, N, *obs_shape]` (a new array when K > 1)."""
        return _stacked_obs(self)

    def arrays(self) -> dict[str, np.ndarray]:
        """The per-step arrays by field name, in `FIELDS` order."""
        return {name: getattr(self, name) for name in FIELD_NAMES}


def validate(fragment: Fragment) -> Fragment:
    """Check a fragment against the schema and return it; raise `InvalidFragment` otherwise.

    Checks, each with a message naming the field: dtypes, ranks and shapes against `FIELDS`
    (including `obs` having `T + frame_stack` rows and every field agreeing on T and N), the
    frame-stack fields (`_validate_stacks`), finite rewards and log-probs,
    `behaviour_logp <= 0`, autoreset steps exactly after episode ends, and metadata types.
    """
    _check_arrays(fragment)
    _check_values(fragment)
    _check_metadata(fragment)
    return fragment


def _check_arrays(fragment: Fragment) -> None:
    """Dtypes, ranks and shapes against `FIELDS`, every field agreeing on T and N (`obs` on
    T + frame_stack), and the frame-stack fields."""
    rewards = fragment.rewards
    if not isinstance(rewards, np.ndarray) or rewards.ndim != 2:
        raise InvalidFragment(
            f"rewards must be a 2-D [T, N] array, got {_describe(rewards)}", "shape"
        )
    t, n = rewards.shape
    if t < 1 or n < 1:
        raise InvalidFragment(f"rewards has shape {rewards.shape}: T and N must be >= 1", "shape")
    k = fragment.frame_stack
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_FRAME_STACK:
        raise InvalidFragment(
            f"frame_stack must be an int in [1, {MAX_FRAME_STACK}], got {k!r}", "invalid"
        )
    for spec in FIELDS:
        value = getattr(fragment, spec.name)
        if not isinstance(value, np.ndarray):
            raise InvalidFragment(f"{spec.name} must be a numpy array, got {_describe(value)}")
        if value.dtype.name not in spec.dtypes:
            raise InvalidFragment(
                f"{spec.name} has dtype {value.dtype.name}, allowed: {', '.join(spec.dtypes)}",
                "dtype",
            )
        rows = spec.num_rows(t, k)
        label = "T+1" if spec.rows == "T+K" and k == 1 else spec.rows
        if value.ndim < 2 or value.shape[:2] != (rows, n):
            first = str(rows) if spec.rows == "2" else f"{label}={rows}"
            raise InvalidFragment(
                f"{spec.name} has shape {value.shape}, expected [{first}, N={n}, ...] "
                f"to agree with rewards {rewards.shape}",
                "shape",
            )
        if not spec.trailing and value.ndim != 2:
            raise InvalidFragment(
                f"{spec.name} has shape {value.shape}, expected [{label}, N] = ({rows}, {n})",
                "shape",
            )
    if fragment.core_state.ndim != 3:
        raise InvalidFragment(
            f"core_state has shape {fragment.core_state.shape}, expected [2, N={n}, core_size]",
            "shape",
        )
    if fragment.actions.dtype == np.int64 and fragment.actions.ndim != 2:
        raise InvalidFragment(
            f"actions are int64 (discrete) so must be [T, N], got {fragment.actions.shape}",
            "shape",
        )
    _validate_stacks(fragment, t, n, k)


def _check_values(fragment: Fragment) -> None:
    """Finite rewards, log-probs and float arrays; discrete log-probs <= 0; autoreset steps."""
    for name in ("rewards", "behaviour_logp"):
        value = getattr(fragment, name)
        if not np.isfinite(value).all():
            bad = np.argwhere(~np.isfinite(value))[0].tolist()
            raise InvalidFragment(f"{name} has a NaN or inf at [t, n] = {bad}", "non_finite")
    if fragment.obs.dtype == np.float32 and not (
        np.isfinite(fragment.obs).all() and np.isfinite(fragment.stack_heads).all()
    ):
        raise InvalidFragment("obs has a NaN or inf", "non_finite")
    if fragment.actions.dtype == np.float32 and not np.isfinite(fragment.actions).all():
        raise InvalidFragment("actions has a NaN or inf", "non_finite")
    if not np.isfinite(fragment.core_state).all():
        raise InvalidFragment("core_state has a NaN or inf", "non_finite")
    # A probability is at most 1, so a discrete log-prob is <= 0. A continuous action's
    # log-*density* can legitimately exceed 0 (a narrow Gaussian), so float actions are exempt.
    if fragment.actions.dtype == np.int64 and (fragment.behaviour_logp > 0).any():
        bad = np.argwhere(fragment.behaviour_logp > 0)[0].tolist()
        raise InvalidFragment(
            f"behaviour_logp is > 0 at [t, n] = {bad}: the log-probability of a discrete "
            "action cannot exceed 0",
            "logp_positive",
        )
    ended = fragment.terminated | fragment.truncated
    if (ended & fragment.autoreset).any():
        raise InvalidFragment("a step is both an episode end and an autoreset step", "autoreset")
    if (fragment.autoreset[1:] != ended[:-1]).any():
        bad = np.argwhere(fragment.autoreset[1:] != ended[:-1])[0].tolist()
        raise InvalidFragment(
            f"autoreset must be True exactly on the step after an episode ends; "
            f"wrong at [t, n] = [{bad[0] + 1}, {bad[1]}]",
            "autoreset",
        )


def _check_metadata(fragment: Fragment) -> None:
    """Metadata types and ranges, and the per-episode arrays."""
    for name, kind in META_FIELDS.items():
        value = getattr(fragment, name)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise InvalidFragment(f"{name} must be {kind.__name__}, got {_describe(value)}")
    for name in ("policy_version", "actor_id"):
        value = getattr(fragment, name)
        if not 0 <= value <= MAX_INT64:
            raise InvalidFragment(f"{name} is {value}, must lie in [0, 2**63 - 1]", "metadata")
    if not fragment.fragment_id:
        raise InvalidFragment("fragment_id is empty")
    lengths = []
    for name, dtype in EPISODE_FIELDS.items():
        value = getattr(fragment, name)
        if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype.name != dtype:
            raise InvalidFragment(f"{name} must be a 1-D {dtype} array, got {_describe(value)}")
        lengths.append(len(value))
    if lengths[0] != lengths[1]:
        raise InvalidFragment(
            f"episode_returns has {lengths[0]} entries but episode_lengths has {lengths[1]}"
        )
    if not np.isfinite(fragment.episode_returns).all():
        raise InvalidFragment("episode_returns has a NaN or inf", "non_finite")


def _validate_stacks(fragment: Fragment, t: int, n: int, k: int) -> None:
    problem = frames.check(
        fragment.obs, k, t, n, fragment.stack_resets, fragment.stack_heads, _describe
    )
    if problem is not None:
        raise InvalidFragment(*problem)


def _fill_stack_fields(container: Fragment | Batch) -> None:
    """Empty `stack_resets` and `stack_heads` where they were left None (frozen dataclass)."""
    if container.stack_resets is None:
        object.__setattr__(container, "stack_resets", np.zeros((0, 2), np.int32))
    if container.stack_heads is None:
        obs, k = container.obs, container.frame_stack
        valid = isinstance(obs, np.ndarray) and obs.ndim >= 2 and isinstance(k, int)
        shape = (0, max(k - 1, 0), *obs.shape[2:]) if valid else (0, 0)
        dtype = obs.dtype if valid else np.uint8
        object.__setattr__(container, "stack_heads", np.zeros(shape, dtype))


def _stacked_obs(container: Fragment | Batch) -> np.ndarray:
    if container.frame_stack == 1:
        return container.obs
    return frames.unpack(
        container.obs, container.frame_stack, container.stack_resets, container.stack_heads
    )


def _describe(value: object) -> str:
    if isinstance(value, np.ndarray):
        return f"array{value.shape} of {value.dtype.name}"
    return type(value).__name__


@dataclasses.dataclass(frozen=True, eq=False)
class Batch(_TimeMajor):
    """B fragments concatenated along the env axis: still time-major, `[T, sum N, ...]`.

    Per-column metadata lets the learner measure the policy lag of every column, and split it
    into acting lag and data age (`learner.metrics`) where the insert version is known.
    """

    obs: np.ndarray  # [T+1, N, *obs_shape]; [T+K, N, H, W] when K > 1 (see Fragment)
    actions: np.ndarray  # [T, N, *action_shape]
    rewards: np.ndarray  # [T, N]
    terminated: np.ndarray  # [T, N]
    truncated: np.ndarray  # [T, N]
    autoreset: np.ndarray  # [T, N]
    behaviour_logp: np.ndarray  # [T, N]
    core_state: np.ndarray  # [2, N, core_size]
    policy_version: np.ndarray  # [N] int64: version that produced each column
    actor_id: np.ndarray  # [N] int64
    fragment_ids: tuple[str, ...]  # one per fragment, in column order
    frame_stack: int = 1
    #: [R, 2] (t, column), in time order within each column; None: none.
    stack_resets: np.ndarray | None = None
    stack_heads: np.ndarray | None = None  # [R, K-1, H, W]; None: none
    insert_version: np.ndarray | None = None  # [N] int64, -1 where unknown; None: all unknown

    def __post_init__(self) -> None:
        _fill_stack_fields(self)

    @classmethod
    def stack(cls, fragments: Sequence[Fragment]) -> Batch:
        """Concatenate fragments that share T, frame_stack, observation and action layout."""
        if not fragments:
            raise ValueError("cannot stack an empty list of fragments")
        first = fragments[0]
        for frag in fragments[1:]:
            if frag.frame_stack != first.frame_stack:
                raise ValueError(
                    f"cannot stack fragment {frag.fragment_id}: frame_stack {frag.frame_stack}, "
                    f"the batch has {first.frame_stack}"
                )
            for name in FIELD_NAMES:
                a, b = getattr(first, name), getattr(frag, name)
                if a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:] or a.dtype != b.dtype:
                    raise ValueError(
                        f"cannot stack fragment {frag.fragment_id}: {name} is "
                        f"{b.shape} {b.dtype.name}, the batch has {a.shape} {a.dtype.name}"
                    )
        arrays = {
            name: np.concatenate([getattr(f, name) for f in fragments], axis=1)
            for name in FIELD_NAMES
        }
        counts = [f.num_envs for f in fragments]
        offsets = np.cumsum([0, *counts[:-1]])
        resets = [
            f.stack_resets + np.array([0, o], np.int32)
            for f, o in zip(fragments, offsets, strict=True)
        ]
        return cls(
            **arrays,
            policy_version=np.repeat([f.policy_version for f in fragments], counts).astype(
                np.int64
            ),
            actor_id=np.repeat([f.actor_id for f in fragments], counts).astype(np.int64),
            fragment_ids=tuple(f.fragment_id for f in fragments),
            frame_stack=first.frame_stack,
            stack_resets=np.concatenate(resets),
            stack_heads=np.concatenate([f.stack_heads for f in fragments]),
            insert_version=np.repeat([f.insert_version for f in fragments], counts).astype(
                np.int64
            ),
        )

    @property
    def nbytes(self) -> int:
        return sum(getattr(self, f).nbytes for f in (*FIELD_NAMES, *STACK_FIELDS))

    def stacked_obs(self) -> np.ndarray:
        """The observations as acted on, `[T+1, N, *obs_shape]` (a new array when K > 1)."""
        return _stacked_obs(self)
