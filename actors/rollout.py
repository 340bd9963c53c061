"""The rollout actor: steps `num_envs` environments with a stale copy of the policy.

`RolloutActor` is plain Python (Ray is applied in `deploy/`). Each `collect()` plays
`unroll_length` steps of all envs with batched CPU inference, writes them into a `Fragment`
(time-major, see `replay.trajectory`; stacked Atari frames stored once each, `replay.frames`),
encodes it with `replay.codec.encode` and hands the bytes to a `FragmentSink`. Weights come
from a `WeightSource` and change only between fragments, so every fragment is acted by exactly
one policy version, which it carries.

Autoreset bookkeeping across fragments: the last observation of a fragment is row 0 of the next
one, and the "previous step ended an episode" flags carry over, so `autoreset[0]` is right. A
recurrent policy's core state carries over too, zeroed where an episode starts (the step after
an autoreset step, and after an env reset); each fragment stores the state entering its step 0.
Episode returns and lengths count only real steps (an autoreset step is not part of any
episode).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid

import numpy as np
import torch
from gymnasium import spaces

from actors.config import ActorConfig, ActorStats
from actors.envs import EnvConfig, env_seeds, make_vec_env, seeded_reset, stored_frame_stack
from actors.ports import FragmentSink, WeightSource
from learner.policy import PolicySpec, load_numpy_state_dict, make_policy
from replay import frames
from replay.codec import encode
from replay.trajectory import Fragment, InvalidFragment

log = logging.getLogger(__name__)

#: After this many env failures in a row without one completed fragment the actor gives up
#: (raises), and whoever supervises it decides what next.
MAX_CONSECUTIVE_ENV_ERRORS = 5
#: Seconds between an actor's first checks for the learner's first weights: doubling from the
#: first to the second (`RolloutActor.run`).
_FIRST_WEIGHTS_POLL_S = (0.002, 0.1)
#: Seconds between checks for a higher step limit while `run` waits at its limit.
_LIMIT_POLL_S = 0.01


class _EnvFailure(Exception):
    pass


class RolloutActor:
    """Collects fragments from `actor_config.num_envs` envs with a stale copy of the policy.

    `step_limit` is the first `set_step_limit`. Not thread-safe except `stats()` and
    `set_step_limit()`, which may be called from another thread while `run()` collects.
    """

    def __init__(
        self,
        actor_id: int,
        env_config: EnvConfig,
        actor_config: ActorConfig,
        spec: PolicySpec,
        *,
        sink: FragmentSink,
        weights: WeightSource,
        step_limit: int | None = None,
    ) -> None:
        # Long only because it names every piece of the actor's state in one place.
        torch.set_num_threads(actor_config.torch_threads)
        # Action sampling draws from torch's global generator: seed it like the envs, so an
        # actor with the same weights replays the same fragments.
        torch.manual_seed(env_seeds(env_config, actor_id, num_envs=actor_config.num_envs)[0])
        self.actor_id = actor_id
        self._env_config = env_config
        self._config = actor_config
        self._spec = spec
        self._sink = sink
        self._weights = weights
        self._policy = make_policy(spec)
        self._policy.requires_grad_(False)
        self._obs_dtype = np.dtype(spec.obs_dtype)
        self._frame_stack = stored_frame_stack(env_config, spec)  # frames stored once each
        if spec.action_kind == "discrete":
            self._action_shape: tuple[int, ...] = ()
            self._action_dtype = np.dtype(np.int64)
        else:
            self._action_shape = (spec.action_dim,)
            self._action_dtype = np.dtype(np.float32)
        n = actor_config.num_envs
        self._nonce = uuid.uuid4().hex[:8]
        self._version = -1
        self._since_sync = 0
        #: When `run` began stepping (`time.time()`); None before.
        self.stepping_since: float | None = None
        self._lock = threading.Lock()  # guards the counters below, read by stats()
        self._env_steps = 0
        self._step_limit: int | None = step_limit
        self._fragments = 0
        self._weight_syncs = 0
        self._max_lag_waits = 0
        self._env_errors = 0
        self._invalid_fragments = 0
        self._times = {"inference_s": 0.0, "env_s": 0.0}
        self._new_returns: list[float] = []
        self._new_lengths: list[int] = []
        # State carried from one fragment to the next.
        self._obs = np.zeros((n, *spec.obs_shape), self._obs_dtype)
        #: The recurrent core's state entering the next step, already zeroed where that step
        #: starts an episode; `[2, n, 0]` for a feed-forward policy.
        self._core_state = np.zeros((2, n, spec.core_size), np.float32)
        self._prev_done = np.zeros(n, bool)
        self._ep_return = np.zeros(n, np.float64)
        self._ep_length = np.zeros(n, np.int64)
        self._generation = 0
        self._env = make_vec_env(env_config, num_envs=n, actor_id=actor_id)
        self._check_spaces()
        #: Set when the env failed (or produced data the codec refused): rebuild before stepping.
        self._needs_rebuild = False
        try:
            self._reset_env()
        except Exception as err:
            self._env_failed(err)
        self._sync()

    # -- public API ------------------------------------------------------------------------------

    @property
    def policy_version(self) -> int:
        return self._version

    def collect(self) -> Fragment:
        """Play one fragment, send it to the sink, and return it.

        An env that raises is rebuilt and the fragment restarted (`env_errors`); a fragment the
        codec refuses (a NaN reward, say) is returned but not sent (`invalid_fragments`)."""
        self._before_fragment()
        failures = 0
        while True:
            try:
                if self._needs_rebuild:
                    self._rebuild_env()
                fragment, returns, lengths, times = self._unroll()
                break
            except _EnvFailure as err:
                failures += 1
                self._env_failed(err.__cause__)
                if failures >= MAX_CONSECUTIVE_ENV_ERRORS:
                    raise RuntimeError(
                        f"actor {self.actor_id}: {failures} environment errors in a row"
                    ) from err.__cause__
        try:
            data = encode(fragment)
        except InvalidFragment as err:
            self._drop_invalid(err)
            return fragment
        self._sink.put(data)
        self._since_sync += 1
        with self._lock:
            self._env_steps += fragment.rewards.size
            self._fragments += 1
            for key, seconds in times.items():
                self._times[key] += seconds
            self._new_returns.extend(returns)
            self._new_lengths.extend(lengths)
        return fragment

    def _drop_invalid(self, err: InvalidFragment) -> None:
        """Bad data from the env (a NaN reward, say) never reaches the learner and does not end
        the actor: the fragment and the episodes that ended in it are dropped and counted, and
        the env is rebuilt so no non-finite running return carries into the next fragment."""
        log.warning("actor %d: dropping a fragment the codec refused: %s", self.actor_id, err)
        self._since_sync += 1
        self._needs_rebuild = True
        with self._lock:
            self._invalid_fragments += 1

    def set_step_limit(self, limit: int | None) -> None:
        """Collect in `run` only while `env_steps` is below `limit` (None: no limit); a fragment
        under way is finished. The job's driver hands out its env-step budget this way
        (`deploy.budget`). Thread-safe."""
        with self._lock:
            self._step_limit = limit

    def _at_limit(self) -> bool:
        with self._lock:
            return self._step_limit is not None and self._env_steps >= self._step_limit

    def run(self, stop: threading.Event) -> None:
        """Collect until `stop` is set, then flush the sink (every collected fragment is sent).
        At the step limit it waits, for a higher limit or for `stop`.

        An actor that holds no published weights yet (started before the learner's first
        publish) first waits for them, so that every fragment it sends was acted by the version
        it carries; `stepping_since` is when it then began stepping (`time.time()`).
        """
        try:
            delay = _FIRST_WEIGHTS_POLL_S[0]
            while self._version < 0 and not self._sync() and not stop.wait(delay):
                delay = min(delay * 2, _FIRST_WEIGHTS_POLL_S[1])
            self.stepping_since = time.time()
            while not stop.is_set():
                if self._at_limit():
                    stop.wait(_LIMIT_POLL_S)
                    continue
                self.collect()
        finally:
            self._sink.flush()

    def stats(self) -> ActorStats:
        """Counters, and the episodes finished since the last call (drained). Thread-safe."""
        with self._lock:
            returns, self._new_returns = self._new_returns, []
            lengths, self._new_lengths = self._new_lengths, []
            return ActorStats(
                actor_id=self.actor_id,
                env_steps=self._env_steps,
                fragments=self._fragments,
                policy_version=self._version,
                episode_returns=returns,
                episode_lengths=lengths,
                weight_syncs=self._weight_syncs,
                max_lag_waits=self._max_lag_waits,
                env_errors=self._env_errors,
                invalid_fragments=self._invalid_fragments,
                **self._times,
            )

    def close(self) -> None:
        self._env.close()

    # -- stepping --------------------------------------------------------------------------------

    def _unroll(self) -> tuple[Fragment, list[float], list[int], dict[str, float]]:
        """Play one fragment: the fragment, the episodes that ended in it (returns, lengths),
        and the seconds spent in inference and in the envs.

        One function on purpose: the per-step loop is the actor's hot path, and keeping its
        bookkeeping inline (locals, no calls per step) is what keeps it near the raw env rate."""
        t_len, n = self._config.unroll_length, self._config.num_envs
        obs = np.empty((t_len + 1, n, *self._spec.obs_shape), self._obs_dtype)
        actions = np.empty((t_len, n, *self._action_shape), self._action_dtype)
        rewards = np.empty((t_len, n), np.float32)
        terminated = np.empty((t_len, n), bool)
        truncated = np.empty((t_len, n), bool)
        autoreset = np.empty((t_len, n), bool)
        logp = np.empty((t_len, n), np.float32)
        returns: list[float] = []
        lengths: list[int] = []
        obs[0] = self._obs
        prev_done, done, live = self._prev_done, np.empty(n, bool), np.empty(n, bool)
        ep_return, ep_length = self._ep_return, self._ep_length
        act, env, clock = self._policy.act, self._env, time.perf_counter
        inference_s = env_s = 0.0
        core_state = state = self._core_state
        recurrent = self._spec.core_size > 0
        for t in range(t_len):
            start = clock()
            if recurrent:
                out = act(obs[t], state)
                state = out.core_state
                # After an autoreset step the next observation is a new episode's first: the
                # step that acts on it starts from a zero state (replay.trajectory).
                if prev_done.any():
                    state[:, prev_done] = 0.0
            else:
                out = act(obs[t])
            actions[t] = out.actions
            logp[t] = out.logp
            autoreset[t] = prev_done
            stepped = clock()
            try:
                next_obs, reward, term, trunc, _ = env.step(out.actions)
            except Exception as err:
                raise _EnvFailure() from err
            done_at = clock()
            inference_s += stepped - start
            env_s += done_at - stepped
            obs[t + 1] = next_obs
            rewards[t] = reward
            terminated[t] = term
            truncated[t] = trunc
            # An autoreset step (previous step ended) belongs to no episode.
            np.logical_not(prev_done, out=live)
            np.add(ep_return, rewards[t], out=ep_return, where=live)
            ep_length += live
            np.logical_or(terminated[t], truncated[t], out=done)
            if done.any():
                ended = np.flatnonzero(done)
                returns.extend(ep_return[ended].tolist())
                lengths.extend(ep_length[ended].tolist())
                ep_return[ended] = 0.0
                ep_length[ended] = 0
            prev_done, done = done, prev_done
        self._obs[...] = obs[t_len]
        self._prev_done[...] = prev_done
        self._core_state = state
        fragment = Fragment(
            **frames.fragment_obs(obs, self._frame_stack),
            actions=actions,
            rewards=rewards,
            terminated=terminated,
            truncated=truncated,
            autoreset=autoreset,
            behaviour_logp=logp,
            core_state=core_state,
            policy_version=max(self._version, 0),
            actor_id=self.actor_id,
            fragment_id=f"{self.actor_id}-{self._nonce}-{self._fragments}",
            episode_returns=np.asarray(returns, np.float32),
            episode_lengths=np.asarray(lengths, np.int32),
        )
        return fragment, returns, lengths, {"inference_s": inference_s, "env_s": env_s}

    def _reset_env(self) -> None:
        seeds = env_seeds(
            self._env_config,
            self.actor_id,
            num_envs=self._config.num_envs,
            generation=self._generation,
        )
        obs, _ = seeded_reset(self._env, seeds)
        self._obs[...] = obs
        self._prev_done[...] = False
        # A new array, not zeroed in place: the last fragment may still hold the old one.
        self._core_state = np.zeros_like(self._core_state)
        self._ep_return[...] = 0.0
        self._ep_length[...] = 0

    def _env_failed(self, err: BaseException | None) -> None:
        self._needs_rebuild = True
        with self._lock:
            self._env_errors += 1
        log.warning(
            "actor %d: environment error, rebuilding the vector env and dropping the fragment "
            "and episodes in progress: %r",
            self.actor_id,
            err,
        )

    def _rebuild_env(self) -> None:
        """Replace a broken vector env by a fresh one with new (reproducible) seeds; the
        episodes in progress are dropped. Raises `_EnvFailure` if the new env fails too."""
        try:
            self._env.close()
        except Exception:  # a broken env may fail to close too; it is discarded either way
            log.debug("actor %d: closing the broken env failed", self.actor_id, exc_info=True)
        self._generation += 1
        try:
            self._env = make_vec_env(
                self._env_config, num_envs=self._config.num_envs, actor_id=self.actor_id
            )
            self._reset_env()
        except Exception as err:
            raise _EnvFailure() from err
        self._needs_rebuild = False

    def _check_spaces(self) -> None:
        obs_space, act_space = self._env.single_observation_space, self._env.single_action_space
        spec = self._spec
        if tuple(obs_space.shape or ()) != spec.obs_shape:
            raise ValueError(
                f"env {self._env_config.id} observations have shape {obs_space.shape}, the "
                f"policy spec expects {spec.obs_shape}"
            )
        if isinstance(act_space, spaces.Discrete):
            ok = spec.action_kind == "discrete" and int(act_space.n) == spec.action_dim
        else:
            ok = spec.action_kind == "continuous" and act_space.shape == (spec.action_dim,)
        if not ok:
            raise ValueError(
                f"env {self._env_config.id} has actions {act_space}, the policy spec expects "
                f"{spec.action_kind} with action_dim={spec.action_dim}"
            )

    # -- weights ---------------------------------------------------------------------------------

    def _before_fragment(self) -> None:
        """Every `sync_every` fragments a sync; between them, with `max_lag`, a sync that only
        loads weights more than `max_lag` versions ahead. Each is one `fetch` call."""
        if self._since_sync >= self._config.sync_every:
            self._sync()
        elif self._config.max_lag is not None and self._sync(beyond=self._config.max_lag):
            with self._lock:
                self._max_lag_waits += 1

    def _sync(self, beyond: int = 0) -> bool:
        """Load the newest weights if they are more than `beyond` versions newer than the
        acting ones (one `fetch`); True when it did. The newest weights put the actor at lag 0,
        so it never waits for weights."""
        got = self._weights.fetch(self._version + beyond)
        if beyond == 0 or got is not None:
            self._since_sync = 0
        if got is None:
            return False
        version, weights = got
        load_numpy_state_dict(self._policy, weights)
        with self._lock:
            self._version = version
            self._weight_syncs += 1
        return True
