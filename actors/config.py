"""What a rollout actor is told (`ActorConfig`, one per job) and what it reports (`ActorStats`)."""

from __future__ import annotations

import dataclasses

from replay.fields import check, setting

#: Upper bounds of an actor's sizes: envs stepped together, steps per fragment.
MAX_NUM_ENVS = 4096
MAX_UNROLL_LENGTH = 4096


@dataclasses.dataclass(frozen=True)
class ActorConfig:
    """How each rollout actor collects; one per job, shared by all actors. Where an actor runs
    and how its fragments travel are the deployment's business (`deploy.config.RunConfig`)."""

    num_envs: int = setting(
        128,
        "environments per actor, stepped in lockstep with one batched policy call",
        ge=1,
        le=MAX_NUM_ENVS,
    )
    unroll_length: int = setting(
        32, "T: steps per fragment (a fragment is T x num_envs steps)", ge=1, le=MAX_UNROLL_LENGTH
    )
    sync_every: int = setting(
        1,
        "fragments between weight syncs: the staleness knob (1 = fetch before every fragment)",
        ge=1,
        le=1_000_000,
    )
    max_lag: int | None = setting(
        None,
        "refuse to act with weights more than this many versions behind the source: between "
        "syncs, ask before every fragment and load the newest weights when they are further "
        "ahead; None = no bound",
        ge=0,
        le=10**12,
    )
    torch_threads: int = setting(
        1, "torch intra-op threads for the actor's inference", ge=1, le=1024
    )

    def __post_init__(self) -> None:
        check(self)


@dataclasses.dataclass
class ActorStats:
    """Counters since the actor started; the episode lists only since the last `stats()`."""

    actor_id: int
    env_steps: int  # vector-env steps x num_envs, autoreset steps included
    fragments: int
    policy_version: int  # the version acting now (-1: own initial weights, never synced)
    episode_returns: list[float]
    episode_lengths: list[int]
    weight_syncs: int  # times new weights were loaded
    max_lag_waits: int  # times the actor was over max_lag and had to fetch before acting
    env_errors: int  # env exceptions recovered from by rebuilding the vector env
    invalid_fragments: int = 0  # fragments the codec refused (e.g. NaN rewards): dropped
    # Where the time went, seconds summed over the fragments sent: the policy's batched
    # inference and stepping the envs. (Time blocked handing fragments over is the sink's to
    # say: deploy's RaySink reports it as `backpressure_s`.)
    inference_s: float = 0.0
    env_s: float = 0.0
