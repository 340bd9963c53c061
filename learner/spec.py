"""What a policy network looks like, without torch: `PolicySpec` and the names it accepts.

The driver, the replay and the config check read specs and never build a network; keeping the
spec here lets them run without importing torch (`learner.policy` builds the network from it).
"""

from __future__ import annotations

import dataclasses
from typing import Any

NETWORKS = ("mlp", "impala_shallow", "impala_deep")
ACTION_KINDS = ("discrete", "continuous")
OBS_DTYPES = ("float32", "uint8")
#: The valid values of `PolicySpec.core` (`learner.core`).
CORES = ("none", "lstm")


def check_core(core: str, core_size: int, shared_torso: bool | None) -> None:
    """Raise `ValueError` unless a `PolicySpec`'s core fields fit together."""
    if core not in CORES:
        raise ValueError(f"core must be one of {CORES}, got {core!r}")
    if core == "none" and core_size != 0:
        raise ValueError(f"core_size is {core_size} but core is 'none': it must be 0")
    if core != "none" and core_size < 1:
        raise ValueError(f"core {core!r} needs core_size >= 1, got {core_size}")
    if core != "none" and shared_torso is False:
        raise ValueError(
            "shared_torso is False but the recurrent core is shared by the policy and the value "
            "heads: leave shared_torso unset (None) or True"
        )


@dataclasses.dataclass(frozen=True)
class PolicySpec:
    """What a policy network looks like; enough to rebuild it anywhere.

    Image observations are 3-D. They may be channels-first `(C, H, W)` (Gymnasium's
    `FrameStackObservation` over grey frames gives `(4, 84, 84)`) or channels-last `(H, W, C)`
    (`(84, 84, 4)`): the network treats the shape as channels-last when its last dimension is
    smaller than its first, channels-first otherwise.
    """

    obs_shape: tuple[int, ...]
    obs_dtype: str  # "float32" | "uint8"
    action_kind: str  # "discrete" | "continuous"
    action_dim: int  # number of discrete actions, or the length of the action vector
    action_low: tuple[float, ...] | None = None
    action_high: tuple[float, ...] | None = None
    network: str = "mlp"  # one of NETWORKS
    hidden_sizes: tuple[int, ...] = (64, 64)
    #: None: separate actor and critic torsos for the MLP (better on small control tasks, as in
    #: CleanRL's PPO), one shared torso for the CNNs (the expensive part is computed once).
    shared_torso: bool | None = None
    #: An action-value head `Q(s, .)`, one output per discrete action, on the critic's features;
    #: only the learner's `stgs` estimator needs it (actors never evaluate it).
    q_head: bool = False
    #: "none" (feed-forward) or "lstm": a recurrent core of `core_size` units after the torso.
    core: str = "none"
    #: Units of the recurrent core: >= 1 with a core, 0 without one.
    core_size: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "obs_shape", tuple(int(d) for d in self.obs_shape))
        object.__setattr__(self, "hidden_sizes", tuple(int(h) for h in self.hidden_sizes))
        for name in ("action_low", "action_high"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(float(v) for v in value))
        if not self.obs_shape or any(d < 1 for d in self.obs_shape):
            raise ValueError(f"obs_shape must be non-empty positive dims, got {self.obs_shape}")
        if self.obs_dtype not in OBS_DTYPES:
            raise ValueError(f"obs_dtype must be one of {OBS_DTYPES}, got {self.obs_dtype!r}")
        if self.action_kind not in ACTION_KINDS:
            raise ValueError(f"action_kind must be one of {ACTION_KINDS}, got {self.action_kind!r}")
        if self.action_dim < 1:
            raise ValueError(f"action_dim must be >= 1, got {self.action_dim}")
        if self.network not in NETWORKS:
            raise ValueError(f"network must be one of {NETWORKS}, got {self.network!r}")
        if self.network != "mlp" and len(self.obs_shape) != 3:
            raise ValueError(
                f"network {self.network!r} needs 3-D image observations, got {self.obs_shape}"
            )
        if self.network == "mlp" and not self.hidden_sizes:
            raise ValueError("hidden_sizes must list at least one layer for the mlp network")
        if any(h < 1 for h in self.hidden_sizes):
            raise ValueError(f"hidden_sizes must be positive, got {self.hidden_sizes}")
        if self.q_head and self.action_kind != "discrete":
            raise ValueError(
                "q_head needs discrete actions (Q(s, .) has one output per action), got "
                f"action_kind {self.action_kind!r}"
            )
        check_core(self.core, self.core_size, self.shared_torso)
        for name in ("action_low", "action_high"):
            value = getattr(self, name)
            if value is not None and len(value) != self.action_dim:
                raise ValueError(
                    f"{name} has {len(value)} entries, expected action_dim={self.action_dim}"
                )

    def to_dict(self) -> dict[str, Any]:
        """Plain Python containers only (lists, not tuples), safe for `torch.load(weights_only)`
        and any serialiser."""
        out = dataclasses.asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PolicySpec:
        """Inverse of `to_dict`; unknown keys are an error (they mean a different version)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown PolicySpec keys: {sorted(unknown)}")
        kwargs = dict(data)
        for key in ("obs_shape", "hidden_sizes", "action_low", "action_high"):
            if kwargs.get(key) is not None:
                kwargs[key] = tuple(kwargs[key])
        return cls(**kwargs)

    @property
    def uses_shared_torso(self) -> bool:
        if self.core != "none":
            return True
        return self.network != "mlp" if self.shared_torso is None else self.shared_torso
