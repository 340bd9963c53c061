"""What every fragment of one run looks like, beyond the schema (`replay.trajectory`):
`FragmentSpec`, checked by the replay service at insert and at snapshot restore."""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from replay.trajectory import Fragment, InvalidFragment


@dataclasses.dataclass(frozen=True)
class FragmentSpec:
    """What every fragment of one run looks like, beyond the schema.

    The schema admits any observation shape and any action index; a run's learner does not. A
    fragment that is schema-valid but of another shape, dtype or action range would make the
    learner raise (and, sampled from a snapshot, again after `--resume`), so the replay service
    refuses it at insert and at restore (`check`). `None` leaves T or N free.
    """

    obs_shape: tuple[int, ...]
    obs_dtype: str
    action_kind: Literal["discrete", "continuous"]
    #: Number of actions (discrete: valid indices are 0 .. action_dim - 1) or the action
    #: vector's length (continuous).
    action_dim: int
    unroll_length: int | None = None
    num_envs: int | None = None
    #: Frames stored once per fragment (`Fragment.frame_stack`; 1: observations as they are).
    frame_stack: int = 1
    #: Units of the policy's recurrent core: the width of `core_state` (0: feed-forward).
    core_size: int = 0

    def check(self, fragment: Fragment) -> Fragment:
        """Return `fragment` if it fits this spec (it must already be schema-valid); raise
        `InvalidFragment` with a `spec_*` reason naming the first misfit otherwise."""
        t, n = fragment.rewards.shape
        if self.unroll_length is not None and t != self.unroll_length:
            raise InvalidFragment(
                f"T is {t}, this run's fragments have {self.unroll_length}", "spec_shape"
            )
        if self.num_envs is not None and n != self.num_envs:
            raise InvalidFragment(
                f"N is {n}, this run's fragments have {self.num_envs}", "spec_shape"
            )
        if fragment.frame_stack != self.frame_stack:
            raise InvalidFragment(
                f"frame_stack is {fragment.frame_stack}, this run's fragments have "
                f"{self.frame_stack}",
                "spec_obs",
            )
        obs = fragment.obs
        # With frames stored once, a row of obs is one frame of the [K, ...] observation.
        rows = obs.shape[2:] if self.frame_stack == 1 else (self.frame_stack, *obs.shape[2:])
        if rows != tuple(self.obs_shape) or obs.dtype.name != self.obs_dtype:
            raise InvalidFragment(
                f"obs rows are {rows} {obs.dtype.name}, this run's are "
                f"{tuple(self.obs_shape)} {self.obs_dtype}",
                "spec_obs",
            )
        actions = fragment.actions
        if self.action_kind == "discrete":
            if actions.dtype != np.int64:
                raise InvalidFragment(
                    f"actions are {actions.dtype.name}, this run's are discrete (int64)",
                    "spec_action",
                )
            low, high = int(actions.min()), int(actions.max())
            if low < 0 or high >= self.action_dim:
                raise InvalidFragment(
                    f"actions span [{low}, {high}], this run has {self.action_dim} actions "
                    f"(0 .. {self.action_dim - 1})",
                    "spec_action",
                )
        elif actions.dtype != np.float32 or actions.shape[2:] != (self.action_dim,):
            raise InvalidFragment(
                f"actions are {actions.shape[2:]} {actions.dtype.name}, this run's are "
                f"({self.action_dim},) float32",
                "spec_action",
            )
        if fragment.core_state.shape[2] != self.core_size:
            raise InvalidFragment(
                f"core_state has core_size {fragment.core_state.shape[2]}, this run's policy "
                f"has {self.core_size}",
                "spec_core",
            )
        return fragment
