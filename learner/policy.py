"""Actor-critic networks: one definition used by the rollout actors (`act`) and the learner
(`evaluate`).

`PolicySpec` is the plain description of a network (observation layout, action space, torso);
it travels inside checkpoints and Ray calls as a dict (`to_dict`/`from_dict`). `make_policy(spec)`
builds the `ActorCritic`:

- torso: an MLP with tanh for vector observations; for images (3-D observations, `uint8` scaled
  by 1/255 inside the network) the IMPALA paper's shallow CNN or its deep ResNet CNN
  (Espeholt et al. 2018, fig. 3);
- core (optional, `core = "lstm"`): an LSTM of `core_size` units between the torso and the
  heads, shared by the policy and the value (`learner.core`); its state travels with the data
  (`act` takes and returns it, `evaluate` unrolls it from a fragment's stored state);
- heads: categorical logits for `Discrete` actions, a diagonal Gaussian with a learned,
  state-independent, clamped log standard deviation for `Box` actions; a scalar value head;
  with `q_head` (the `stgs` estimator's critic, `Discrete` actions only) an action-value head
  `Q(s, .)` on the critic's features, in the dueling form `Q(s, a) = V(s) + A(s, a) -
  mean_a' A(s, a')` (Wang et al. 2016) with the advantage layer initialised near 0.

Weights cross process boundaries as `dict[str, np.ndarray]` (`state_dict_to_numpy`,
`load_numpy_state_dict`), so actors need neither CUDA nor pickled torch tensors.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.distributions import Categorical, Normal

from learner.core import LSTMCore, episode_starts
from learner.spec import PolicySpec

#: Bounds on the Gaussian head's log standard deviation: below -5 the log-density of the
#: behaviour policy explodes (importance weights overflow), above 2 the policy is noise.
LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0
#: Width of the fully connected layer after the IMPALA CNNs (as in the paper).
CNN_FEATURES = 256


class ActOutput(NamedTuple):
    """What a rollout actor gets for N observations."""

    actions: np.ndarray  # [N] int64 (discrete) or [N, action_dim] float32 (continuous)
    logp: np.ndarray  # [N] float32: log mu(action | obs) of the acting policy
    core_state: np.ndarray | None = None  # [2, N, core_size] float32 after the step; None: no core


class Evaluation(NamedTuple):
    """The learner's view of a [T+1, B] batch under the current parameters."""

    logp: torch.Tensor  # [T, B] log pi(actions | obs[:T])
    entropy: torch.Tensor  # [T, B] entropy of pi(. | obs[:T])
    values: torch.Tensor  # [T+1, B] V(obs); row T is the bootstrap value
    policy_out: torch.Tensor  # [T, B, action_dim] logits (discrete) or Gaussian mean
    q_values: torch.Tensor | None = None  # [T, B, action_dim] Q(obs[:T], .), with a q_head


def _layer(layer: nn.Module, gain: float) -> nn.Module:
    # Orthogonal init with scaled gains (sqrt 2 for hidden layers, 0.01 for the policy
    # output so the initial policy is near uniform, 1 for the value) as in CleanRL/baselines.
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


def _mlp(in_dim: int, hidden_sizes: tuple[int, ...]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for size in hidden_sizes:
        layers += [_layer(nn.Linear(in_dim, size), math.sqrt(2)), nn.Tanh()]
        in_dim = size
    return nn.Sequential(*layers)


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv0 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv1(torch.relu(self.conv0(torch.relu(x))))


class _ImpalaCNN(nn.Module):
    """Images `[N, C, H, W]` float in [0, 1] -> features `[N, 256]`."""

    def __init__(self, in_shape: tuple[int, int, int], deep: bool):
        super().__init__()
        c = in_shape[0]
        if deep:
            # Three sections of conv 3x3 -> max-pool 3x3/2 -> two residual blocks.
            layers: list[nn.Module] = []
            for out in (16, 32, 32):
                layers += [
                    nn.Conv2d(c, out, 3, padding=1),
                    nn.MaxPool2d(3, stride=2, padding=1),
                    _ResidualBlock(out),
                    _ResidualBlock(out),
                ]
                c = out
            layers.append(nn.ReLU())
        else:
            layers = [nn.Conv2d(c, 16, 8, stride=4), nn.ReLU(), nn.Conv2d(16, 32, 4, stride=2)]
            layers.append(nn.ReLU())
        self.convs = nn.Sequential(*layers)
        with torch.no_grad():
            flat = int(self.convs(torch.zeros(1, *in_shape)).numel())
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(flat, CNN_FEATURES), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.convs(x))


class ActorCritic(nn.Module):
    """Policy and value function for one `PolicySpec`; build it with `make_policy(spec)`."""

    def __init__(self, spec: PolicySpec):
        super().__init__()
        self.spec = spec
        shape = spec.obs_shape
        self._image = spec.network != "mlp"
        self._channels_last = self._image and shape[-1] < shape[0]
        self._obs_numel = math.prod(shape)
        if self._image:
            chw = (shape[2], shape[0], shape[1]) if self._channels_last else shape
            make_torso = lambda: _ImpalaCNN(chw, deep=spec.network == "impala_deep")  # noqa: E731
            features = CNN_FEATURES
        else:
            make_torso = lambda: _mlp(self._obs_numel, spec.hidden_sizes)  # noqa: E731
            features = spec.hidden_sizes[-1]
        self.torso = make_torso()
        # The critic's own torso, or None when the actor's torso is shared.
        self.value_torso = None if spec.uses_shared_torso else make_torso()
        self.core = LSTMCore(features, spec.core_size) if spec.core == "lstm" else None
        if self.core is not None:
            features = spec.core_size
        out = spec.action_dim
        self.policy_head = _layer(nn.Linear(features, out), 0.01)
        self.value_head = _layer(nn.Linear(features, 1), 1.0)
        # The advantage part of the dueling Q head. Its near-zero start makes Q = V at first, so
        # the policy is not pushed by the random action preferences of an untrained layer.
        self.q_head = _layer(nn.Linear(features, out), 0.01) if spec.q_head else None
        if spec.action_kind == "continuous":
            self.log_std = nn.Parameter(torch.zeros(out))
        else:
            self.register_parameter("log_std", None)
        # A bounded Box keeps the Gaussian's mean inside its bounds (tanh onto [low, high]).
        # Unsquashed, the mean drifts past a bound where every sample clips to the same action,
        # the advantages carry no signal about the mean, and it never comes back.
        self._squash = spec.action_kind == "continuous" and spec.action_low is not None
        if self._squash:
            low = torch.tensor(spec.action_low, dtype=torch.float32)
            high = torch.tensor(spec.action_high, dtype=torch.float32)
            finite = torch.isfinite(low) & torch.isfinite(high)
            self._squash = bool(finite.all())
            self.register_buffer("_center", torch.where(finite, (high + low) / 2, 0.0), False)
            self.register_buffer("_half_range", torch.where(finite, (high - low) / 2, 1.0), False)

    # -- shared forward ------------------------------------------------------------------------

    def _prepare(self, obs: torch.Tensor) -> torch.Tensor:
        """`[N, *obs_shape]` (any dtype) -> float32 network input on the module's device."""
        x = obs.to(self.policy_head.weight.device, non_blocking=True)
        x = x.float() * (1.0 / 255.0) if x.dtype == torch.uint8 else x.float()
        if self._image:
            return x.permute(0, 3, 1, 2) if self._channels_last else x
        return x.reshape(x.shape[0], self._obs_numel)

    def _features(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`obs [N, *obs_shape]` -> the actor's and the critic's features (the same tensor
        when the torso is shared)."""
        x = self._prepare(obs)
        hidden = self.torso(x)
        return hidden, hidden if self.value_torso is None else self.value_torso(x)

    def forward(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`obs [N, *obs_shape]` -> `(policy_out [N, action_dim], values [N])`; `policy_out`
        is the categorical logits or the Gaussian mean. Feed-forward networks only: a recurrent
        one needs its state (`act`, `evaluate`)."""
        if self.core is not None:
            raise ValueError("a recurrent network needs its core state: use act or evaluate")
        hidden, value_hidden = self._features(obs)
        return self.policy_head(hidden), self.value_head(value_hidden).squeeze(-1)

    def distribution(self, policy_out: torch.Tensor) -> Categorical | Normal:
        """The action distribution for the output of `forward` (Normal is per dimension)."""
        # No argument validation: it costs a device sync per call, and a diverged network must
        # reach the learner's non-finite check (a skipped step) rather than raise here.
        if self.spec.action_kind == "discrete":
            return Categorical(logits=policy_out, validate_args=False)
        if self._squash:
            policy_out = self._center + self._half_range * torch.tanh(policy_out)
        log_std = self.log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)
        return Normal(policy_out, log_std.exp().expand_as(policy_out), validate_args=False)

    def _logp_entropy(
        self, dist: Categorical | Normal, actions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(dist, Categorical):
            return dist.log_prob(actions.long()), dist.entropy()
        return dist.log_prob(actions.float()).sum(-1), dist.entropy().sum(-1)

    # -- the two entry points ------------------------------------------------------------------

    def act(
        self,
        obs: np.ndarray,
        core_state: np.ndarray | None = None,
        *,
        deterministic: bool = False,
    ) -> ActOutput:
        """Sample actions for `obs [N, *obs_shape]` (float32 or uint8).

        Returns int64 `[N]` actions for discrete spaces, float32 `[N, action_dim]` for
        continuous ones: the *unclipped* Gaussian sample (the env wrapper clips to the bounds;
        the log-prob must be of the action the distribution produced). `deterministic` takes
        the mode (argmax / mean), for evaluation; `logp` is then still log pi of that action.

        A recurrent network needs `core_state [2, N, core_size]` float32, the state entering
        this step (zeroed by the caller where an episode starts), and returns the state after
        it in `ActOutput.core_state`; a feed-forward one ignores `core_state`.
        """
        # The hot call of every rollout actor: only the policy torso and head run (the critic's
        # torso and the entropy are the learner's business), and the categorical sample is a
        # Gumbel-max over the logits, without building a distribution object.
        next_state = None
        with torch.inference_mode():
            hidden = self.torso(self._prepare(torch.as_tensor(obs)))
            if self.core is not None:
                if core_state is None:
                    raise ValueError("a recurrent network acts with core_state [2, N, core_size]")
                state = torch.as_tensor(core_state, device=hidden.device)
                hidden, state = self.core.step(hidden, state)
                next_state = state.cpu().numpy()
            policy_out = self.policy_head(hidden)
            if self.spec.action_kind == "discrete":
                log_probs = torch.log_softmax(policy_out, -1)
                if deterministic:
                    actions = policy_out.argmax(-1)
                else:
                    gumbel = -torch.empty_like(log_probs).exponential_().log()
                    actions = (log_probs + gumbel).argmax(-1)
                logp = log_probs.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
                actions_np = actions.cpu().numpy().astype(np.int64, copy=False)
            else:
                dist = self.distribution(policy_out)
                actions = dist.mean if deterministic else dist.sample()
                logp = dist.log_prob(actions).sum(-1)
                actions_np = actions.cpu().numpy().astype(np.float32, copy=False)
        logp_np = logp.cpu().numpy().astype(np.float32, copy=False)
        return ActOutput(actions_np, logp_np, next_state)

    def evaluate(
        self,
        obs: torch.Tensor,
        actions: torch.Tensor,
        *,
        core_state: torch.Tensor | None = None,
        autoreset: torch.Tensor | None = None,
    ) -> Evaluation:
        """Log-probs, entropies, values, policy outputs and (with a q_head) action values of a
        time-major batch, with gradients.

        `obs [T+1, B, *obs_shape]`, `actions [T, B]` (int) or `[T, B, action_dim]` (float).
        All T+1 rows go through the torso in one forward pass; the policy output and action
        values of row T (the bootstrap observation) are dropped. A recurrent network also needs
        the batch's `core_state [2, B, core_size]` (the state entering row 0) and `autoreset
        [T, B]`: its core is unrolled over the T+1 rows from that state, zeroed where an
        episode starts (`learner.core.episode_starts`), as the actors stepped it.
        """
        t1, b = obs.shape[:2]
        t = actions.shape[0]
        if t1 != t + 1 or actions.shape[1] != b:
            raise ValueError(
                f"evaluate needs obs [T+1, B, ...] and actions [T, B, ...], got obs "
                f"{tuple(obs.shape)} and actions {tuple(actions.shape)}"
            )
        hidden, value_hidden = self._features(obs.reshape(t1 * b, *obs.shape[2:]))
        if self.core is not None:
            if core_state is None or autoreset is None:
                raise ValueError("a recurrent network evaluates with core_state and autoreset")
            starts = episode_starts(autoreset.to(hidden.device))
            state = core_state.to(hidden.device)
            hidden, _ = self.core.unroll(hidden.reshape(t1, b, -1), state, starts)
            hidden = value_hidden = hidden.reshape(t1 * b, -1)
        policy_out = self.policy_head(hidden).reshape(t1, b, -1)[:t]
        values = self.value_head(value_hidden).reshape(t1, b)
        q_values = None
        if self.q_head is not None:
            # Dueling: only the advantages depend on the action, and V is shared with the value
            # head, so Q's regression starts from (and keeps improving) the learned values.
            advantages = self.q_head(value_hidden.reshape(t1, b, -1)[:t])
            q_values = values[:t, :, None] + advantages - advantages.mean(-1, keepdim=True)
        dist = self.distribution(policy_out)
        logp, entropy = self._logp_entropy(dist, actions.to(policy_out.device))
        return Evaluation(logp, entropy, values, policy_out, q_values)


def make_policy(spec: PolicySpec) -> ActorCritic:
    """Build a freshly initialised `ActorCritic` for `spec` (on the CPU)."""
    return ActorCritic(spec)


def state_dict_to_numpy(module: nn.Module) -> dict[str, np.ndarray]:
    """The module's state dict as CPU numpy copies (independent of later training steps)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in module.state_dict().items()}


def load_numpy_state_dict(module: nn.Module, weights: dict[str, np.ndarray]) -> None:
    """Copy numpy `weights` into `module` in place.

    Raises `ValueError` listing the missing keys, unexpected keys and shape mismatches, before
    touching any parameter (a failed load leaves the module unchanged).
    """
    own = module.state_dict()
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    shapes = [
        f"{k}: expected {tuple(own[k].shape)}, got {tuple(np.shape(weights[k]))}"
        for k in own
        if k in weights and tuple(own[k].shape) != tuple(np.shape(weights[k]))
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected}")
        if shapes:
            parts.append("shape mismatches [" + "; ".join(shapes) + "]")
        raise ValueError("weights do not fit this network: " + ", ".join(parts))
    with torch.no_grad():
        for key, tensor in own.items():
            # Arrays from Ray's object store are read-only views of shared memory; torch
            # warns on wrapping those, and a copy is made by `copy_` anyway.
            array = np.asarray(weights[key])
            if not array.flags.writeable:
                array = array.copy()
            tensor.copy_(torch.from_numpy(array))
