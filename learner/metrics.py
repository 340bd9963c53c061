"""What one learner step measured (`StepMetrics`), and the TensorBoard tags it is keyed by.

The tags are defined here once: `StepMetrics.scalars()` and `histograms()` use them, and
`deploy/metrics.py` imports them (next to the driver's own tags) for its writer and for the
list of tags every run must write.

Staleness of a batch column, in learner versions (see the README, "Staleness"):

    policy_lag = version at the step - policy_version          (what the importance weights see)
               = acting_lag + data_age
    acting_lag = insert_version - policy_version   (how old the actor's weights were by the time
                                                    its fragment reached the replay service)
    data_age   = version at the step - insert_version   (how long it then waited in replay)

`insert_version` is the learner version the replay service stamped on the fragment when it
arrived (`replay.service`); columns without one (batches that never went through a replay
service) have no acting lag or data age.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

LOSS_POLICY = "loss/policy"
LOSS_VALUE = "loss/value"  # value_coef * the value loss: the term as it enters loss/total
LOSS_ENTROPY = "loss/entropy"  # -entropy_coef * the entropy: the term as it enters loss/total
LOSS_TOTAL = "loss/total"
POLICY_ENTROPY = "policy/entropy"  # mean entropy of pi over real steps (nats)
GRAD_NORM = "learner/grad_norm"
LR = "learner/lr"
STEP_MS = "learner/step_ms"  # the gradient step, device sync included, publish excluded
PUBLISH_MS = "learner/publish_ms"  # publishing weights, per step (0 on steps that do not)
WAIT_MS = "learner/wait_ms"  # waiting for the prefetch thread's next batch
RHO_MEAN = "importance/rho_mean"
RHO_CLIPPED = "importance/rho_clipped_frac"
ESS = "importance/ess"
LAG_MEAN = "staleness/policy_lag_mean"
LAG_MAX = "staleness/policy_lag_max"
ACTING_LAG_MEAN = "staleness/acting_lag_mean"
ACTING_LAG_MAX = "staleness/acting_lag_max"
DATA_AGE_MEAN = "staleness/data_age_mean"
DATA_AGE_MAX = "staleness/data_age_max"
LAG_HIST = "staleness/policy_lag"  # histogram
ACTING_LAG_HIST = "staleness/acting_lag"  # histogram
DATA_AGE_HIST = "staleness/data_age"  # histogram
LOG_RHO_HIST = "importance/log_rho"  # histogram

#: Scalars reduced by their maximum (not their mean) over the steps of an interval.
MAX_TAGS = frozenset({LAG_MAX, ACTING_LAG_MAX, DATA_AGE_MAX})

#: Most values kept per histogram array in `StepMetrics` (a uniform subsample).
HISTOGRAM_MAX = 4096


def subsample(values: np.ndarray) -> np.ndarray:
    """`values` (1-D), or `HISTOGRAM_MAX` of them evenly spaced when there are more."""
    if values.size <= HISTOGRAM_MAX:
        return values
    return values[np.linspace(0, values.size - 1, HISTOGRAM_MAX).astype(np.int64)]


@dataclasses.dataclass(frozen=True)
class Staleness:
    """Per-column lags of one batch (int64 arrays; see the module docstring)."""

    policy_lag: np.ndarray  # [B]
    acting_lag: np.ndarray  # [B'] the columns with an insert version (B' <= B)
    data_age: np.ndarray  # [B']

    @classmethod
    def of(
        cls, version: int, policy_version: np.ndarray, insert_version: np.ndarray | None
    ) -> Staleness:
        policy_version = np.asarray(policy_version, np.int64)
        lag = version - policy_version
        if insert_version is None:
            empty = np.zeros(0, np.int64)
            return cls(lag, empty, empty)
        insert_version = np.asarray(insert_version, np.int64)
        known = insert_version >= 0
        return cls(
            lag,
            (insert_version - policy_version)[known],
            (version - insert_version)[known],
        )


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


def _max(values: np.ndarray) -> float:
    return float(values.max()) if values.size else math.nan


@dataclasses.dataclass(frozen=True)
class StepMetrics:
    """What one `Learner.step` measured. Scalars are Python floats (NaN when skipped or not
    measured); the times are milliseconds of wall time."""

    version: int  # learner version after the step
    loss: float  # the total loss that was differentiated
    policy_loss: float
    value_loss: float  # unweighted (0.5 * squared error)
    entropy: float  # mean entropy of pi over real steps
    value_term: float  # value_coef * value_loss
    entropy_term: float  # -entropy_coef * entropy
    grad_norm: float  # global norm before clipping
    lr: float
    rho_mean: float  # mean importance ratio pi/mu over real steps
    rho_clipped_frac: float  # fraction of real steps with rho > rho_clip
    ess: float  # (sum rho)^2 / (n * sum rho^2): 1 on-policy, -> 1/n when one weight dominates
    staleness: Staleness
    log_rho: np.ndarray  # float32, log rho of real steps (subsampled to <= 4096)
    samples: int  # real (non-autoreset) steps in the batch
    skipped: bool  # a network output, the loss or the gradient was non-finite: no update
    step_ms: float = math.nan
    publish_ms: float = math.nan
    wait_ms: float = math.nan  # set by `Learner.run` (a direct `step()` waits for nothing)

    @property
    def lag(self) -> np.ndarray:
        """[B] int64 policy lag per column."""
        return self.staleness.policy_lag

    @property
    def lag_mean(self) -> float:
        return _mean(self.staleness.policy_lag)

    @property
    def lag_max(self) -> int:
        return int(self.staleness.policy_lag.max())

    def scalars(self) -> dict[str, float]:
        """Scalar metrics keyed by their TensorBoard tag."""
        st = self.staleness
        return {
            LOSS_POLICY: self.policy_loss,
            LOSS_VALUE: self.value_term,
            LOSS_ENTROPY: self.entropy_term,
            LOSS_TOTAL: self.loss,
            POLICY_ENTROPY: self.entropy,
            GRAD_NORM: self.grad_norm,
            LR: self.lr,
            STEP_MS: self.step_ms,
            PUBLISH_MS: self.publish_ms,
            WAIT_MS: self.wait_ms,
            RHO_MEAN: self.rho_mean,
            RHO_CLIPPED: self.rho_clipped_frac,
            ESS: self.ess,
            LAG_MEAN: self.lag_mean,
            LAG_MAX: float(self.lag_max),
            ACTING_LAG_MEAN: _mean(st.acting_lag),
            ACTING_LAG_MAX: _max(st.acting_lag),
            DATA_AGE_MEAN: _mean(st.data_age),
            DATA_AGE_MAX: _max(st.data_age),
        }

    def histograms(self) -> dict[str, np.ndarray]:
        """Array metrics keyed by their TensorBoard tag."""
        st = self.staleness
        return {
            LAG_HIST: st.policy_lag,
            ACTING_LAG_HIST: st.acting_lag,
            DATA_AGE_HIST: st.data_age,
            LOG_RHO_HIST: self.log_rho,
        }
