"""What a job trains and stores, from its config alone: its network and its fragments' layout.

The driver, the in-process run and the benchmarks derive both here, from the env's spaces (one
env is built and closed to read them); nothing here imports torch.
"""

from __future__ import annotations

import dataclasses

from actors.envs import policy_spec, probe_spaces, stored_frame_stack
from deploy.config import ConfigError, JobConfig
from learner.spec import PolicySpec
from replay.spec import FragmentSpec


def job_policy_spec(config: JobConfig) -> PolicySpec:
    """The network a job with `config` trains: its shape from the env's spaces, with the
    action-value head when the learner's estimator needs one (`stgs`).

    Raises `ConfigError` on `learner.estimator` for an estimator that needs a Q head on an env
    with continuous actions. A Ray job (`deploy.job.Job`) builds its network here too.
    """
    policy = config.policy
    spec = policy_spec(
        *probe_spaces(config.env),
        network=None if policy.network == "auto" else policy.network,
        hidden_sizes=policy.hidden_sizes,
        core=policy.core,
        core_size=policy.core_size if policy.core != "none" else 0,
    )
    if not config.learner.needs_q_head:
        return spec
    if spec.action_kind != "discrete":
        raise ConfigError(
            "learner.estimator",
            f"{config.learner.estimator} needs discrete actions (its critic Q(s, .) has one "
            f"output per action); {config.env.id} has continuous ones",
        )
    return dataclasses.replace(spec, q_head=True)


def job_fragment_spec(config: JobConfig, spec: PolicySpec) -> FragmentSpec:
    """The layout of every fragment a job with `config` and network `spec` produces: the replay
    service refuses the rest."""
    return FragmentSpec(
        obs_shape=tuple(spec.obs_shape),
        obs_dtype=spec.obs_dtype,
        action_kind=spec.action_kind,
        action_dim=spec.action_dim,
        unroll_length=config.actors.unroll_length,
        num_envs=config.actors.num_envs,
        frame_stack=stored_frame_stack(config.env, spec),
        core_size=spec.core_size,
    )
