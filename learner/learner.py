"""The learner: batches in, importance-corrected gradient steps, weights and checkpoints out.

`Learner` consumes an iterator of `replay.trajectory.Batch` and owns no transport: tests feed it
a list, `deploy/` feeds it the replay service's batches and passes a `publish` callable that
puts the weights into the `WeightStore`. `run` overlaps the host-side work (numpy to tensors,
pinned memory, the host-to-device copy) with the gradient step through one named prefetch
thread. The loss itself is `learner.loss`: `Learner.step` evaluates the network, takes the
gradient step, and owns the device, the optimiser, the policy on non-finite steps, publishing
and checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from learner import checkpoint
from learner.loss import Q_ESTIMATORS, SURROGATES, importance_stats, loss_terms
from learner.metrics import Staleness, StepMetrics, subsample
from learner.policy import ActorCritic, PolicySpec, make_policy, state_dict_to_numpy
from learner.prefetch import DEVICE_FIELDS, Prefetcher, TensorBatch, to_tensors
from replay.fields import FieldError, check, setting
from replay.trajectory import Batch

log = logging.getLogger(__name__)


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
        choices=tuple(SURROGATES),
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
    batch_size: int = setting(8, "fragments per batch", ge=1, le=4096)
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


class Learner:
    """Importance-corrected actor-critic learner for one `PolicySpec`.

    `version` counts successful gradient steps (0 = the initial weights) and is what the
    published weights and checkpoints carry. `counters` is a dict of numbers saved with every
    checkpoint and restored by `restore_latest`; the caller may add its own (for example
    `env_steps`) from the thread that runs the learner. The learner keeps `learner_samples`
    (real steps trained on) and `skipped_steps` there.

    Call `publish_weights()` once before actors start (and after `restore_latest()`), so they
    begin from the learner's weights.
    """

    def __init__(
        self,
        spec: PolicySpec,
        config: LearnerConfig,
        *,
        checkpoint_dir: str | None = None,
        publish: Callable[[int, dict[str, np.ndarray]], None] | None = None,
    ):
        if config.needs_q_head and not spec.q_head:
            raise ValueError(
                f"estimator {config.estimator!r} trains an action-value head: build the network "
                "with PolicySpec(..., q_head=True) (discrete actions only)"
            )
        self.spec = spec
        self.config = config
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        if config.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device is cuda but torch sees no CUDA device")
        use_cuda = config.device == "cuda" or (
            config.device == "auto" and torch.cuda.is_available()
        )
        self.device = torch.device("cuda" if use_cuda else "cpu")
        if use_cuda:
            # Batch shapes are fixed for a run, so cuDNN autotunes each convolution once and
            # reuses the choice.
            torch.backends.cudnn.benchmark = True
        self.model: ActorCritic = make_policy(spec).to(self.device)
        params = self.model.parameters()
        if config.optimizer == "adam":
            # The fused kernel (CPU and CUDA) updates every parameter in one call: on the CartPole
            # network a fifth of the per-parameter loop's CPU time (benchmarks/README.md).
            self.optimizer = torch.optim.Adam(params, lr=config.lr, eps=config.adam_eps, fused=True)
        else:
            self.optimizer = torch.optim.RMSprop(params, lr=config.lr, eps=config.adam_eps)
        self.checkpoint_dir = checkpoint_dir
        self._publish = publish
        self.version = 0
        self.counters: dict[str, int | float] = {"learner_samples": 0, "skipped_steps": 0}
        self._consecutive_nan = 0
        self._last_checkpoint = time.monotonic()

    # -- one step ------------------------------------------------------------------------------

    def current_lr(self) -> float:
        if self.config.lr_schedule == "linear":
            return self.config.lr * max(0.0, 1.0 - self.version / self.config.lr_decay_steps)
        return self.config.lr

    def step(self, batch: Batch | TensorBatch) -> StepMetrics:
        """One gradient step on `batch`; the loss is `learner.loss.loss_terms`.

        A non-finite network output, loss or gradient norm skips the update (no weights
        published, no checkpoint written, `version` unchanged); `max_nan_steps` consecutive
        skips raise `RuntimeError`. The metrics time the step (`step_ms`, the read-back of its
        scalars syncs the device) apart from publishing the new weights (`publish_ms`).
        """
        start = time.perf_counter()
        batch = self._on_device(batch)
        cfg = self.config
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr

        ev = self.model.evaluate(
            batch.obs, batch.actions, core_state=batch.core_state, autoreset=batch.autoreset
        )
        terms, inp = loss_terms(ev, batch, cfg)
        self.optimizer.zero_grad(set_to_none=True)
        terms.total.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        # The estimators saw finite stand-ins for the network's outputs (see `loss_terms`).
        ok = (
            torch.isfinite(ev.values).all()
            & torch.isfinite(ev.logp).all()
            & torch.isfinite(terms.total)
            & torch.isfinite(grad_norm)
        )
        importance = importance_stats(inp, cfg.rho_clip)
        scalars = {
            "ok": ok.float(),
            "loss": terms.total.detach(),
            "policy_loss": terms.policy.detach(),
            "value_loss": terms.value.detach(),
            "entropy": terms.entropy.detach(),
            "value_term": cfg.value_coef * terms.value.detach(),
            "entropy_term": -cfg.entropy_coef * terms.entropy.detach(),
            "grad_norm": grad_norm.detach().float(),
            "rho_mean": importance.rho_mean,
            "rho_clipped_frac": importance.rho_clipped_frac,
            "ess": importance.ess,
            "samples": inp.mask.sum(),
        }
        # One read-back (one device sync) for all the scalars.
        stats = dict(zip(scalars, torch.stack(list(scalars.values())).tolist(), strict=True))
        log_rho = importance.log_rho.cpu().numpy()[inp.mask.cpu().numpy() > 0]
        skipped = stats.pop("ok") == 0.0
        samples = int(stats.pop("samples"))
        staleness = Staleness.of(self.version, batch.policy_version, batch.insert_version)
        publish_s = self._apply(skipped, samples)
        return StepMetrics(
            version=self.version,
            lr=lr,
            staleness=staleness,
            log_rho=subsample(log_rho),
            samples=samples,
            skipped=skipped,
            step_ms=(time.perf_counter() - start - publish_s) * 1e3,
            publish_ms=publish_s * 1e3,
            **stats,
        )

    def _on_device(self, batch: Batch | TensorBatch) -> TensorBatch:
        if isinstance(batch, Batch):
            batch = to_tensors(batch, self.device, self._copy_stream())
        if self.device.type == "cuda":
            # The tensors were allocated on the copy stream; tell the caching allocator they
            # are used on this one too, so their memory is not reused before the step is done.
            for tensor in batch[: len(DEVICE_FIELDS)]:
                tensor.record_stream(torch.cuda.current_stream(self.device))
        return batch

    def _apply(self, skipped: bool, samples: int) -> float:
        """Take the optimiser step, publish and checkpoint on their cadence; or, for a skipped
        step, drop the gradient and count it towards `max_nan_steps`. Returns the seconds spent
        publishing."""
        cfg = self.config
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
            self._consecutive_nan += 1
            self.counters["skipped_steps"] += 1
            if self._consecutive_nan >= cfg.max_nan_steps:
                raise RuntimeError(
                    f"{self._consecutive_nan} consecutive learner steps had a non-finite loss "
                    f"or gradient (max_nan_steps={cfg.max_nan_steps}); the policy has diverged "
                    f"at version {self.version}: lower lr or max_grad_norm, or restore a "
                    "checkpoint"
                )
            log.warning("non-finite loss or gradient at version %d: step skipped", self.version)
            return 0.0
        self.optimizer.step()
        self._consecutive_nan = 0
        self.version += 1
        self.counters["learner_samples"] += samples
        publish_s = 0.0
        if self.version % cfg.publish_every == 0:
            start = time.perf_counter()
            self.publish_weights()
            publish_s = time.perf_counter() - start
        if self.checkpoint_dir is not None and (
            time.monotonic() - self._last_checkpoint >= cfg.checkpoint_every
        ):
            self.save_checkpoint()
        return publish_s

    def publish_weights(self) -> None:
        """Hand `(version, numpy weights)` to the `publish` callable, if there is one."""
        if self._publish is not None:
            self._publish(self.version, state_dict_to_numpy(self.model))

    def _copy_stream(self) -> Any:
        if self.device.type != "cuda":
            return None
        if getattr(self, "_stream", None) is None:
            self._stream = torch.cuda.Stream(self.device)
        return self._stream

    # -- the loop ------------------------------------------------------------------------------

    def run(
        self,
        batches: Iterable[Batch],
        *,
        max_steps: int | None = None,
        stop: threading.Event | None = None,
        on_step: Callable[[StepMetrics], None] | None = None,
    ) -> int:
        """Step on `batches` until they run out, `max_steps` steps (skipped ones included) were
        taken, or `stop` is set; returns the number of steps taken.

        A thread named `offpg-learner-prefetch` pulls from the iterator and converts up to
        `prefetch` batches ahead into device tensors. It is stopped and joined before `run`
        returns, also when the step or `on_step` raises; an exception raised by the iterator is
        re-raised here. `on_step` runs after every step, in this thread, with the step's metrics
        and the time this thread waited for its batch (`wait_ms`).
        """
        prefetcher = Prefetcher(
            iter(batches),
            self.config.prefetch,
            lambda b: to_tensors(b, self.device, self._copy_stream()),
        )
        steps = 0
        try:
            while max_steps is None or steps < max_steps:
                waited = time.perf_counter()
                batch = prefetcher.get(stop)
                if batch is None:
                    break
                waited = time.perf_counter() - waited
                metrics = dataclasses.replace(self.step(batch), wait_ms=waited * 1e3)
                steps += 1
                if on_step is not None:
                    on_step(metrics)
        finally:
            prefetcher.close()
        return steps

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self) -> str:
        """Write a checkpoint of the current version atomically and prune to the newest
        `keep_checkpoints`; returns its path.

        Holds model, optimiser, version, counters, config and spec as tensors and plain
        containers (`torch.load(weights_only=True)` reads it; see `learner.checkpoint`).
        """
        if self.checkpoint_dir is None:
            raise ValueError("this learner has no checkpoint_dir")
        state = {
            "version": self.version,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "counters": dict(self.counters),
            "config": self.config.to_dict(),
            "spec": self.spec.to_dict(),
        }
        path = checkpoint.write_checkpoint(
            self.checkpoint_dir, self.version, state, self.config.keep_checkpoints
        )
        self._last_checkpoint = time.monotonic()
        return path

    def checkpoints(self) -> list[str]:
        """Paths of this learner's checkpoints, oldest first."""
        return checkpoint.list_checkpoints(self.checkpoint_dir)

    def restore_latest(self) -> int | None:
        """Load the newest readable checkpoint; returns its version, or None when there is none.

        A newest file that cannot be read (truncated, corrupt) is logged and skipped for the one
        before it. A checkpoint of a different network (its `PolicySpec` or tensor shapes differ
        from this learner's) raises `ValueError` listing the differences: resuming must not
        silently start from scratch or from the wrong network. The config in the file is not
        applied: the learner keeps the one it was built with (a resumed run may change `lr`).
        """
        for path, state in checkpoint.readable_checkpoints(self.checkpoint_dir, self.device):
            differences = checkpoint.network_differences(
                self.spec.to_dict(), self.model.state_dict(), _spec_with_defaults(state)
            )
            if differences:
                raise ValueError(
                    f"checkpoint {path} is of a different network: " + "; ".join(differences)
                )
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.version = int(state["version"])
            self.counters.update(state["counters"])
            self._consecutive_nan = 0
            return self.version
        return None


def _spec_with_defaults(state: dict[str, Any]) -> dict[str, Any]:
    """`state` with its saved spec completed by the defaults of fields added since it was
    written (`q_head`), so a checkpoint of the same network compares equal; a spec this version
    cannot read is left as it is, to be reported field by field."""
    try:
        spec = PolicySpec.from_dict(state.get("spec", {})).to_dict()
    except (TypeError, ValueError):
        return state
    return {**state, "spec": spec}
