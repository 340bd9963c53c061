"""What one learner step measured (`StepMetrics`), and the TensorBoard tags it is keyed by.

The tags are defined here once: `StepMetrics.scalars()` and `histograms()` use them, and
`deploy/metrics.py` imports them (next to the driver's own tags) for its writer and for the
list of tags every run must write.
"""

from __future__ import annotations

import dataclasses

import numpy as np

LOSS_POLICY = "loss/policy"
LOSS_VALUE = "loss/value"
LOSS_ENTROPY = "loss/entropy"
GRAD_NORM = "learner/grad_norm"
LR = "learner/lr"
RHO_MEAN = "importance/rho_mean"
RHO_CLIPPED = "importance/rho_clipped_frac"
ESS = "importance/ess"
LAG_MEAN = "staleness/policy_lag_mean"
LAG_MAX = "staleness/policy_lag_max"
LAG_HIST = "staleness/policy_lag"  # histogram
LOG_RHO_HIST = "importance/log_rho"  # histogram

#: Most values kept per histogram array in `StepMetrics` (a uniform subsample).
HISTOGRAM_MAX = 4096


def subsample(values: np.ndarray) -> np.ndarray:
    """`values` (1-D), or `HISTOGRAM_MAX` of them evenly spaced when there are more."""
    if values.size <= HISTOGRAM_MAX:
        return values
    return values[np.linspace(0, values.size - 1, HISTOGRAM_MAX).astype(np.int64)]


@dataclasses.dataclass(frozen=True)
class StepMetrics:
    """What one `Learner.step` measured. Scalars are Python floats (NaN when skipped)."""

    version: int  # learner version after the step
    loss: float  # the total loss that was differentiated
    policy_loss: float
    value_loss: float
    entropy: float  # mean entropy of pi over real steps (the bonus is entropy_coef * this)
    grad_norm: float  # global norm before clipping
    lr: float
    rho_mean: float  # mean importance ratio pi/mu over real steps
    rho_clipped_frac: float  # fraction of real steps with rho > rho_clip
    ess: float  # (sum rho)^2 / (n * sum rho^2): 1 on-policy, -> 1/n when one weight dominates
    lag_mean: float  # learner version minus the batch's policy_version, per column
    lag_max: int
    lag: np.ndarray  # [B] int64 policy lag per column
    log_rho: np.ndarray  # float32, log rho of real steps (subsampled to <= 4096)
    samples: int  # real (non-autoreset) steps in the batch
    skipped: bool  # a network output, the loss or the gradient was non-finite: no update

    def scalars(self) -> dict[str, float]:
        """Scalar metrics keyed by their TensorBoard tag."""
        return {
            LOSS_POLICY: self.policy_loss,
            LOSS_VALUE: self.value_loss,
            LOSS_ENTROPY: self.entropy,
            GRAD_NORM: self.grad_norm,
            LR: self.lr,
            RHO_MEAN: self.rho_mean,
            RHO_CLIPPED: self.rho_clipped_frac,
            ESS: self.ess,
            LAG_MEAN: self.lag_mean,
            LAG_MAX: float(self.lag_max),
        }

    def histograms(self) -> dict[str, np.ndarray]:
        """Array metrics keyed by their TensorBoard tag."""
        return {LAG_HIST: self.lag, LOG_RHO_HIST: self.log_rho}
