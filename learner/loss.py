"""The learner's loss: pure functions from a batch and the network's evaluation to loss terms.

The loss, per batch of `[T, B]` steps (`mask` = not an autoreset step, `n = mask.sum()`):

    policy  = -(surrogate * mask).sum() / n
    value   = 0.5 * ((vs - V(s_t))**2 * mask).sum() / n
    entropy = (H(pi(. | s_t)) * mask).sum() / n
    loss    = policy + value_coef * value - entropy_coef * entropy

with `vs` the V-trace value targets for every estimator. The per-step `surrogate` is the
estimator's: `w * log pi(a_t | s_t)` with `w` the V-trace policy-gradient advantages
(`vtrace`, the default) or `pg_weights(...)` of another estimator with the learned value as
baseline. With `policy_clip = e` (APPO's trust region) it is instead the clipped surrogate
`min(r A, clip(r, 1-e, 1+e) A)`, `r = pi/mu` carrying the gradient and
`A = r_t + discounts_t vs_{t+1} - V(s_t)`: at `r = 1` its gradient is V-trace's, and a sample
whose ratio already left the region in the advantage's direction adds nothing. With
`normalize_advantages` the weights (`w` or `A`) are standardised over the batch's real steps
first.

With `estimator = "stgs"` (straight-through Gumbel-softmax; discrete actions and a network with
`PolicySpec.q_head`) the surrogate is the pathwise `Q(s_t, a_st)`, `a_st =
straight_through_gumbel(logits_t, tau=stgs_temperature)` a fresh sample per step (one-hot
forward, the relaxed sample's gradient backward) and `Q(s, .)` detached, so the policy term's
gradient reaches only the policy's logits and the layers below them. `Q` is trained off-policy
like `V`, towards `r_t + discounts_t vs_{t+1}` with the V-trace targets, and `value` above
becomes the critic's loss `0.5 * ((vs - V(s_t))**2 + (r_t + discounts_t vs_{t+1} -
Q(s_t, a_t))**2)` over real steps.

Normalising by the number of real steps `n` (instead of the estimators' documented
`(1/B) sum_t`, i.e. by B) keeps the step size independent of the unroll length T and of how
many autoreset steps a batch happens to hold; it is the estimators' estimate divided by the
mean number of real steps per column.

Adding an estimator is one function: `(ev, inp, vt, config) -> surrogate [T, B]` (the per-step
objective that the policy term maximises, carrying the gradient; `vt` are the batch's V-trace
targets), registered in `SURROGATES` under its name and named in `learner.config.ESTIMATORS`
(what `LearnerConfig.estimator` accepts; the two are checked to agree at import).
`Learner.step` does not change.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch

from learner.config import ESTIMATORS, PG_ESTIMATORS
from learner.estimators import VTraceReturns, pg_weights, vtrace
from learner.gumbel import straight_through_gumbel
from learner.policy import Evaluation
from learner.prefetch import TensorBatch

if TYPE_CHECKING:
    from learner.config import LearnerConfig


class LossInputs(NamedTuple):
    """The estimators' view of a batch: everything `[T, B]` (bootstrap `[B]`), float32."""

    rewards: torch.Tensor
    discounts: torch.Tensor
    values: torch.Tensor  # V(obs[t]) for t < T, detached
    bootstrap_value: torch.Tensor  # [B] V(obs[T]), detached
    behaviour_logp: torch.Tensor
    target_logp: torch.Tensor  # detached
    mask: torch.Tensor  # float 1 for real steps, 0 for autoreset steps


class LossTerms(NamedTuple):
    """The scalar terms of one batch's loss; `total` is the one that is differentiated."""

    policy: torch.Tensor
    value: torch.Tensor
    entropy: torch.Tensor  # mean entropy of pi over real steps (the bonus is entropy_coef * this)
    total: torch.Tensor


class ImportanceStats(NamedTuple):
    """How far the acting policy `mu` is from `pi`, over a batch's real steps (scalar tensors)."""

    rho_mean: torch.Tensor  # mean importance ratio pi/mu
    rho_clipped_frac: torch.Tensor  # fraction of steps with rho > rho_clip
    ess: torch.Tensor  # (sum rho)^2 / (n * sum rho^2): 1 on-policy, -> 1/n when one dominates
    log_rho: torch.Tensor  # [T, B] log pi/mu of every step (0 at autoreset steps)


#: `(evaluation, inputs, V-trace targets, config) -> surrogate [T, B]`, see the module docstring.
Surrogate = Callable[[Evaluation, LossInputs, VTraceReturns, "LearnerConfig"], torch.Tensor]


def loss_inputs(
    batch: TensorBatch,
    target_logp: torch.Tensor,
    values: torch.Tensor,
    gamma: float,
    reward_scale: float = 1.0,
    reward_clip: float | None = None,
) -> LossInputs:
    """THE layout boundary between the trajectory schema and the estimators.

    Input: the schema's rows (`obs[t]` acted on at step t, `obs[T]` the bootstrap observation;
    `terminated/truncated[t]` end the episode at step t; `autoreset[t]` marks the env-reset step
    after an end) and the network's `target_logp [T, B]` and `values [T+1, B]` (`values[t] =
    V(obs[t])`). What shifts: the value of the *next* row, `values[t + 1]`, is folded into step
    t's reward where step t was truncated, and `values[T]` becomes the bootstrap; nothing else
    moves, every `[T, B]` output stays aligned with step t.

    - `done = terminated | truncated`, `discounts = gamma * (1 - done)`: no return, trace or
      importance product crosses an episode end.
    - Truncated steps bootstrap from their real final observation `obs[t + 1]` (Gymnasium's
      next-step autoreset puts it there): `rewards[t] += gamma * V(obs[t + 1])`, detached.
      A step both terminated and truncated (a terminal state on the time limit's last step)
      is terminal: no bootstrap.
    - Autoreset steps are not transitions: mask 0 in every loss, reward 0, log-rho 0 (rho = 1,
      so they neither weigh nor cut an importance product), and discount 1 rather than gamma,
      so the return of the episode that starts after them is not scaled by an extra gamma
      (the segment estimators' `R` starts at the autoreset step).
    """
    values = values.detach().float()
    target_logp = target_logp.detach().float()
    real = ~batch.autoreset
    done = batch.terminated | batch.truncated
    discounts = torch.where(batch.autoreset, 1.0, gamma * (~done).float())
    rewards = batch.rewards.float() * reward_scale
    if reward_clip is not None:
        rewards = rewards.clamp(-reward_clip, reward_clip)
    rewards = torch.where(real, rewards, 0.0)
    bootstrap_here = batch.truncated & ~batch.terminated
    rewards = rewards + torch.where(bootstrap_here, gamma * values[1:], 0.0)
    behaviour_logp = torch.where(real, batch.behaviour_logp.float(), target_logp)
    return LossInputs(
        rewards, discounts, values[:-1], values[-1], behaviour_logp, target_logp, real.float()
    )


# -- the estimators' surrogates ------------------------------------------------------------------


def normalised(weights: torch.Tensor, mask: torch.Tensor, config: LearnerConfig) -> torch.Tensor:
    """`weights` standardised by their masked mean and std over the batch when the config's
    `normalize_advantages` is on (PPO's scale-free policy step: it matters for continuous
    control, whose returns vary over orders of size); unchanged otherwise."""
    if not config.normalize_advantages:
        return weights
    n = mask.sum().clamp(min=1.0)
    mean = (weights * mask).sum() / n
    std = (((weights - mean) ** 2 * mask).sum() / n).sqrt()
    return (weights - mean) / (std + 1e-8)


def vtrace_surrogate(
    ev: Evaluation, inp: LossInputs, vt: VTraceReturns, config: LearnerConfig
) -> torch.Tensor:
    """IMPALA's policy gradient: the V-trace advantages times `log pi`."""
    return normalised(vt.pg_advantages, inp.mask, config) * ev.logp


def clipped_surrogate(
    ev: Evaluation, inp: LossInputs, vt: VTraceReturns, config: LearnerConfig
) -> torch.Tensor:
    """APPO's clipped surrogate over the V-trace advantage before its rho factor: the ratio
    enters through the surrogate instead, unclipped inside the trust region and flat outside."""
    vs_next = torch.cat([vt.vs[1:], inp.bootstrap_value[None]])
    advantages = normalised(inp.rewards + inp.discounts * vs_next - inp.values, inp.mask, config)
    ratio = (ev.logp - inp.behaviour_logp).exp()
    clipped = ratio.clamp(1.0 - config.policy_clip, 1.0 + config.policy_clip)
    return torch.minimum(ratio * advantages, clipped * advantages)


def _pg_weights_surrogate(
    estimator: str, ev: Evaluation, inp: LossInputs, vt: VTraceReturns, config: LearnerConfig
) -> torch.Tensor:
    """`pg_weights(estimator=...)` with the learned value as baseline, times `log pi`."""
    weights = pg_weights(
        inp.rewards,
        inp.discounts,
        inp.bootstrap_value,
        estimator=estimator,
        baseline=inp.values,
        target_logp=inp.target_logp,
        behaviour_logp=inp.behaviour_logp,
        rho_clip=config.rho_clip,
    )
    return normalised(weights, inp.mask, config) * ev.logp


def stgs_surrogate(
    ev: Evaluation, inp: LossInputs, vt: VTraceReturns, config: LearnerConfig
) -> torch.Tensor:
    """`Q(s_t, a_st)` per step, `a_st` a straight-through Gumbel-softmax sample of `pi(. | s_t)`
    at `stgs_temperature`. `Q(s, .)` is detached: the gradient of this term reaches the
    policy's logits (and the layers below them) only, never Q's head or the critic's torso."""
    sample = straight_through_gumbel(torch.nan_to_num(ev.policy_out), tau=config.stgs_temperature)
    return (ev.q_values.detach() * sample).sum(-1)


#: The valid values of `LearnerConfig.estimator`, each with its surrogate.
SURROGATES: dict[str, Surrogate] = {
    "vtrace": vtrace_surrogate,
    **{name: functools.partial(_pg_weights_surrogate, name) for name in PG_ESTIMATORS},
    "stgs": stgs_surrogate,
}
if tuple(SURROGATES) != ESTIMATORS:  # learner.config names them for the torch-free config check
    raise ImportError(f"learner.config.ESTIMATORS {ESTIMATORS} != SURROGATES {tuple(SURROGATES)}")


def surrogate_for(config: LearnerConfig) -> Surrogate:
    """The config's surrogate: the clipped one when `policy_clip` is set (`LearnerConfig`
    allows it with `vtrace` only), else the estimator's."""
    if config.policy_clip is not None:
        return clipped_surrogate
    return SURROGATES[config.estimator]


# -- the loss ------------------------------------------------------------------------------------


def q_regression(
    ev: Evaluation, actions: torch.Tensor, inp: LossInputs, vt: VTraceReturns
) -> torch.Tensor:
    """`0.5 * (r_t + discounts_t vs_{t+1} - Q(s_t, a_t))**2` summed over real steps (the caller
    divides by their number), `vs_T = bootstrap_value`: the action-value head regressed
    off-policy towards the V-trace targets. Autoreset steps (discount 1, reward 0) are masked."""
    vs_next = torch.cat([vt.vs[1:], inp.bootstrap_value[None]])
    target = inp.rewards + inp.discounts * vs_next
    q_taken = ev.q_values.gather(-1, actions.long().unsqueeze(-1)).squeeze(-1)
    return 0.5 * ((target - q_taken) ** 2 * inp.mask).sum()


def loss_terms(
    ev: Evaluation, batch: TensorBatch, config: LearnerConfig
) -> tuple[LossTerms, LossInputs]:
    """The loss of `batch` under the network's evaluation `ev` (see the module docstring), and
    the inputs the estimators saw.

    The estimators reject non-finite inputs with `ValueError`; a diverged network is instead a
    skipped step, so they see finite stand-ins for its outputs (`nan_to_num`) and the caller
    checks `ev` itself along with the loss and the gradient.
    """
    inp = loss_inputs(
        batch,
        torch.nan_to_num(ev.logp),
        torch.nan_to_num(ev.values),
        config.gamma,
        config.reward_scale,
        config.reward_clip,
    )
    vt = vtrace(
        inp.behaviour_logp,
        inp.target_logp,
        inp.rewards,
        inp.values,
        inp.bootstrap_value,
        inp.discounts,
        rho_clip=config.rho_clip,
        c_clip=config.c_clip,
        pg_rho_clip=config.pg_rho_clip,
        lambda_=config.vtrace_lambda,
    )
    surrogate = surrogate_for(config)(ev, inp, vt, config)
    mask = inp.mask
    n = mask.sum().clamp(min=1.0)
    policy = -(surrogate * mask).sum() / n
    value = 0.5 * ((vt.vs - ev.values[:-1]) ** 2 * mask).sum() / n
    if ev.q_values is not None:
        value = value + q_regression(ev, batch.actions, inp, vt) / n
    entropy = (ev.entropy * mask).sum() / n
    total = policy + config.value_coef * value - config.entropy_coef * entropy
    return LossTerms(policy, value, entropy, total), inp


def importance_stats(inp: LossInputs, rho_clip: float | None) -> ImportanceStats:
    """Importance statistics over real steps, as masked sums: no data-dependent shapes, so no
    device syncs until the caller reads them back."""
    mask = inp.mask
    n = mask.sum().clamp(min=1.0)
    log_rho = inp.target_logp - inp.behaviour_logp
    rho = log_rho.exp() * mask
    clip = math.inf if rho_clip is None else rho_clip
    return ImportanceStats(
        rho_mean=rho.sum() / n,
        rho_clipped_frac=((rho > clip).float() * mask).sum() / n,
        ess=rho.sum() ** 2 / (n * (rho**2).sum()).clamp(min=1e-30),
        log_rho=log_rho,
    )
