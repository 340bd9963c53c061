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
from learner.config import LearnerConfig
from learner.loss import importance_stats, loss_terms
from learner.metrics import Staleness, StepMetrics, subsample
from learner.policy import ActorCritic, PolicySpec, make_policy, state_dict_to_numpy
from learner.prefetch import DEVICE_FIELDS, Prefetcher, TensorBatch, to_tensors
from replay.trajectory import Batch

log = logging.getLogger(__name__)


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
        #: Averages gradients and statistics over data-parallel ranks (`learner.distributed`).
        self.sync: Callable[..., dict[str, torch.Tensor]] | None = None
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
        importance = importance_stats(inp, cfg.rho_clip)
        # The estimators saw finite stand-ins for the network's outputs (see `loss_terms`).
        finite = torch.isfinite(ev.values).all() & torch.isfinite(ev.logp).all()
        scalars = {
            "bad": (~(finite & torch.isfinite(terms.total))).float(),
            "loss": terms.total.detach(),
            "policy_loss": terms.policy.detach(),
            "value_loss": terms.value.detach(),
            "entropy": terms.entropy.detach(),
            "rho_mean": importance.rho_mean,
            "rho_clipped_frac": importance.rho_clipped_frac,
            "ess": importance.ess,
            "samples": inp.mask.sum(),
        }
        if self.sync is not None:  # data-parallel: the whole batch's gradient and statistics
            scalars = self.sync(self.model.parameters(), scalars)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
        scalars["bad"] = scalars["bad"] + (~torch.isfinite(grad_norm)).float()
        scalars["grad_norm"] = grad_norm.detach().float()
        # One read-back (one device sync) for all the scalars.
        stats = dict(zip(scalars, torch.stack(list(scalars.values())).tolist(), strict=True))
        stats["value_term"] = cfg.value_coef * stats["value_loss"]
        stats["entropy_term"] = -cfg.entropy_coef * stats["entropy"]
        log_rho = importance.log_rho.cpu().numpy()[inp.mask.cpu().numpy() > 0]
        skipped = stats.pop("bad") > 0.0
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
                self.spec.to_dict(),
                self.model.state_dict(),
                _spec_with_defaults(state),
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
