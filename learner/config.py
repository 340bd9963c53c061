"""The learner's hyperparameters, without torch: the config check and the driver read them.

`ESTIMATORS` names every policy-gradient estimator `LearnerConfig.estimator` accepts;
`learner.loss.SURROGATES` maps each to its surrogate (and checks at import that the two agree).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from replay.fields import FieldError, check, setting

#: The valid values of `pg_weights(..., estimator=...)` (`learner.estimators`).
PG_ESTIMATORS: tuple[str, ...] = (
    "reinforce",
    "reward_to_go",
    "trajectory_is",
    "per_decision_is",
    "reduced_is",
    "first_order_is",
)
#: The valid values of `LearnerConfig.estimator`.
ESTIMATORS: tuple[str, ...] = ("vtrace", *PG_ESTIMATORS, "stgs")
#: Estimators whose surrogate reads the network's action-value head (`PolicySpec.q_head`).
Q_ESTIMATORS = frozenset({"stgs"})


@dataclasses.dataclass(frozen=True)
class LearnerConfig:
    """Hyperparameters of the learner; each field's `doc` metadata is its CLI help."""

    lr: float = setting(6e-4, "learning rate (initial value when lr_schedule is linear)", gt=0)
    optimizer: str = setting("adam", "the optimiser", choices=("adam", "rmsprop"))
    adam_eps: float = setting(1e-5, "epsilon added to the optimiser's denominator", gt=0)
    lr_schedule: str = setting(
        "constant",
        "constant, or linear decay to 0 over lr_decay_steps",
        choices=("constant", "linear"),
    )
    lr_decay_steps: int = setting(
        0, "learner steps of the linear decay (required for linear)", ge=0, le=10**12
    )
    gamma: float = setting(0.99, "discount factor", ge=0, le=1)
    reward_scale: float = setting(
        1.0, "rewards are multiplied by this before the loss (values learn the scaled return)", gt=0
    )
    normalize_advantages: bool = setting(
        False, "standardise the policy-gradient weights over each batch (mean 0, std 1)"
    )
    reward_clip: float | None = setting(
        None, "rewards are clipped to [-reward_clip, reward_clip] after scaling (Atari: 1)", gt=0
    )
    estimator: str = setting(
        "vtrace",
        "policy gradient: V-trace, a pg_weights estimator, or stgs (the straight-through "
        "Gumbel-softmax gradient through a learned Q(s, .); discrete actions only)",
        choices=ESTIMATORS,
    )
    stgs_temperature: float = setting(
        1.0,
        "stgs: the temperature tau of the relaxed sample whose gradient stands in for the "
        "one-hot action's (lower: closer to the sampled action, sparser gradients)",
        gt=0,
    )
    rho_clip: float | None = setting(
        1.0,
        "V-trace rho-bar (clips the value-target ratios); for the pg_weights estimators the "
        "per-step ratio truncation. None: no clipping",
        gt=0,
    )
    c_clip: float | None = setting(1.0, "V-trace c-bar (trace cutting); None: no clipping", gt=0)
    pg_rho_clip: float | None = setting(
        1.0, "V-trace clip on the policy-gradient ratio; None: no clipping", gt=0
    )
    vtrace_lambda: float = setting(
        1.0,
        "V-trace trace weight lambda (1: the paper's default; lower: less variance)",
        ge=0,
        le=1,
    )
    policy_clip: float | None = setting(
        None,
        "APPO's trust region, vtrace only: the policy term becomes the clipped surrogate "
        "-min(r A, clip(r, 1 - e, 1 + e) A), r = pi/mu, A = the V-trace advantage without its "
        "rho factor, so replaying a fragment cannot push the policy far from the one that "
        "acted; None: IMPALA's policy gradient",
        gt=0,
        lt=1,
    )
    value_coef: float = setting(0.5, "weight of the value loss", ge=0)
    entropy_coef: float = setting(0.01, "weight of the entropy bonus", ge=0)
    max_grad_norm: float = setting(10.0, "clip the global gradient norm to this value", gt=0)
    batch_size: int = setting(
        8, "fragments per batch (per step of all the learners together)", ge=1, le=4096
    )
    num_learners: int = setting(
        1,
        "data-parallel learner processes (one GPU each when the cluster has enough); each "
        "samples batch_size / num_learners fragments and the gradients are averaged",
        ge=1,
        le=256,
    )
    group_timeout_s: float = setting(
        60.0,
        "seconds a learner waits in a collective for the others before it fails",
        gt=0,
        le=3600,
    )
    publish_every: int = setting(
        1, "publish the weights every this many learner steps", ge=1, le=1_000_000
    )
    checkpoint_every: float = setting(
        60.0,
        "seconds between checkpoints (a restarted learner loses at most this much)",
        gt=0,
        le=86_400,
    )
    keep_checkpoints: int = setting(3, "how many of the newest checkpoints to keep", ge=1, le=1000)
    device: str = setting(
        "auto", "auto (CUDA when available), cpu or cuda", choices=("auto", "cpu", "cuda")
    )
    prefetch: int = setting(
        2, "batches decoded and moved to the device ahead of the step", ge=1, le=64
    )
    max_nan_steps: int = setting(
        10, "consecutive non-finite (skipped) steps before the learner gives up", ge=1, le=1_000_000
    )
    torch_threads: int = setting(
        0, "torch intra-op threads; 0 leaves torch's default", ge=0, le=1024
    )

    def __post_init__(self) -> None:
        check(self)
        if self.batch_size % self.num_learners:
            raise FieldError(
                "num_learners",
                f"is {self.num_learners}, which does not divide batch_size {self.batch_size}: "
                "each learner samples batch_size / num_learners fragments",
            )
        if self.lr_schedule == "linear" and self.lr_decay_steps < 1:
            raise FieldError(
                "lr_decay_steps",
                "must be >= 1 when lr_schedule is linear (it is the number of learner steps "
                "over which lr decays to 0)",
            )
        if self.estimator == "stgs" and self.normalize_advantages:
            raise FieldError(
                "normalize_advantages",
                "stgs has no policy-gradient weights to standardise; set "
                "normalize_advantages = false",
            )
        if self.policy_clip is not None and self.estimator != "vtrace":
            raise FieldError(
                "policy_clip",
                "the clipped surrogate is defined on V-trace advantages; set estimator = vtrace "
                f"or policy_clip = none (estimator is {self.estimator!r})",
            )

    @property
    def needs_q_head(self) -> bool:
        """Whether the estimator reads the network's action-value head (`PolicySpec.q_head`)."""
        return self.estimator in Q_ESTIMATORS

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
