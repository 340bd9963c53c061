"""Time-major `[T, B]` columns: the input checks and the linear-recurrence kernels that the
estimators in `learner/estimators.py` share.

The checks raise `ValueError` naming the offending argument. The kernels are unchecked: they run
once the inputs are known to be good. `Segments` holds the episode-segment indicators of a
batch (see the conventions in `learner/estimators.py`) and the three segment-wise scans built
on `scan`.
"""

from __future__ import annotations

import functools
import math

import torch

#: The floating dtypes every estimator accepts.
FLOAT_DTYPES = (torch.float32, torch.float64)


def check_tensors(
    steps: dict[str, torch.Tensor | None], columns: dict[str, torch.Tensor]
) -> tuple[int, int]:
    """Check that `steps` are `[T, B]`, `columns` are `[B]`, all one float dtype and device.

    Entries of `steps` that are None are skipped. Returns `(T, B)`.
    """
    present = {name: x for name, x in steps.items() if x is not None}
    ref_name, ref = next(iter(present.items()))
    for name, x in {**present, **columns}.items():
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32 or float64, got {x.dtype}")
        if x.dtype != ref.dtype:
            raise ValueError(f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}")
        if x.device != ref.device:
            raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}")
    for name, x in present.items():
        if x.dim() != 2:
            raise ValueError(f"{name} must have rank 2, [T, B], got shape {tuple(x.shape)}")
        if x.shape != ref.shape:
            raise ValueError(
                f"{name} has shape {tuple(x.shape)} but {ref_name} has shape "
                f"{tuple(ref.shape)}; all [T, B] inputs must match"
            )
    T, B = ref.shape
    if T == 0 or B == 0:
        raise ValueError(f"{ref_name} is empty, shape {tuple(ref.shape)}; need T >= 1, B >= 1")
    for name, x in columns.items():
        if x.shape != (B,):
            raise ValueError(f"{name} must have shape [B] = ({B},), got {tuple(x.shape)}")
    return T, B


def check_values(
    tensors: dict[str, torch.Tensor | None], discounts: torch.Tensor | None = None
) -> None:
    """Raise if any tensor holds NaN/inf, or if `discounts` (when given) leave [0, 1].

    `x * 0` is 0 where x is finite and NaN where it is NaN or +-inf, and a sum of zeros is
    exactly 0, so one cheap reduction per input finds any non-finite value (on CPU it is ~10x
    faster than `isfinite(x).all()`). All reductions are read back with a single host sync.
    """
    names = [name for name, x in tensors.items() if x is not None]
    stats = [tensors[name].mul(0).sum() for name in names]
    if discounts is not None:
        stats.extend(discounts.aminmax())
    found = torch.stack(stats).tolist()
    for name, value in zip(names, found, strict=False):
        if value != 0:
            raise ValueError(f"{name} contains NaN or inf")
    if discounts is not None and not (found[-2] >= 0 and found[-1] <= 1):
        raise ValueError(f"discounts must lie in [0, 1], found [{found[-2]}, {found[-1]}]")


def check_clip(name: str, value: float | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a positive number or None, got {value!r}")
    if not (value > 0 and math.isfinite(value)):
        raise ValueError(f"{name} must be a positive finite number or None, got {value!r}")


# --------------------------------------------------------------------------------------------
# Kernels: unchecked, used once the inputs are known to be good.


#: From this many steps on, CUDA solves recurrences with the log-depth scan: a loop over T costs
#: T kernel launches, the log-depth scan ~4 * log2(T).
_LOG_DEPTH_MIN_T = 16


def scan(x: torch.Tensor, y: torch.Tensor, init: torch.Tensor, *, reverse: bool) -> torch.Tensor:
    """Solve the linear recurrence `a_t = x_t + y_t * a_{t-1}` (or `a_{t+1}` when `reverse`).

    `x, y` are `[T, B]`, `init [B]` is `a_{-1}` (or `a_T`); returns `a [T, B]`. On CPU a loop
    over T (`scan_loop`), on CUDA a log-depth scan (`scan_log_depth`) once T is long enough
    for kernel launches to dominate.
    """
    if x.is_cuda and x.shape[0] >= _LOG_DEPTH_MIN_T:
        return scan_log_depth(x, y, init, reverse=reverse)
    return scan_loop(x, y, init, reverse=reverse)


def scan_loop(x: torch.Tensor, y: torch.Tensor, init: torch.Tensor, *, reverse: bool):
    """`scan` as a loop over T, each step one fused multiply-add over B written straight into
    the output. It performs the recurrence itself, and at T ~ 100 it beats the log-depth scan on
    CPU (that one makes ~log2(T) passes over all T * B elements)."""
    out = torch.empty_like(x)
    # unbind: all row views in one call, cheaper than indexing x[t] three times per step.
    rows = list(zip(x.unbind(0), y.unbind(0), out.unbind(0), strict=True))
    acc = init
    for x_t, y_t, out_t in reversed(rows) if reverse else rows:
        acc = torch.addcmul(x_t, y_t, acc, out=out_t)
    return out


def scan_log_depth(x: torch.Tensor, y: torch.Tensor, init: torch.Tensor, *, reverse: bool):
    """`scan` in ceil(log2(T)) vectorised steps (Hillis-Steele).

    After the step with offset k, `x_t` holds the recurrence's sum over the 2k steps ending at t
    (or all of them, from `init`, when fewer) and `y_t` the product of their `y`: combining a
    window with the one before it is `x_t += y_t * x_{t-k}`, `y_t *= y_{t-k}`.
    """
    if reverse:
        x, y = x.flip(0), y.flip(0)
    x = torch.cat([torch.addcmul(x[:1], y[:1], init), x[1:]])
    k = 1
    while k < x.shape[0]:
        x = torch.cat([x[:k], torch.addcmul(x[k:], y[k:], x[:-k])])
        if 2 * k < x.shape[0]:  # the last step's window products are never used
            y = torch.cat([y[:k], y[k:] * y[:-k]])
        k *= 2
    return x.flip(0) if reverse else x


class Segments:
    """Episode-segment indicators of a `[T, B]` batch, as 0/1 floats of the batch's dtype.

    `continues` is 1 where the segment carries on to step t + 1, `carried` 1 where it carries
    on from step t - 1; `ends = 1 - continues` and `starts = 1 - carried`. Each is computed on
    first use, since most estimators need only some of them.
    """

    def __init__(self, discounts: torch.Tensor):
        self._discounts = discounts

    @functools.cached_property
    def continues(self) -> torch.Tensor:
        continues = self._discounts.sign()  # discounts are in [0, 1]: 1 unless the episode ends
        continues[-1] = 0
        return continues

    @functools.cached_property
    def carried(self) -> torch.Tensor:
        return torch.cat([torch.zeros_like(self.continues[:1]), self.continues[:-1]])

    @functools.cached_property
    def starts(self) -> torch.Tensor:
        return 1 - self.carried

    @functools.cached_property
    def ends(self) -> torch.Tensor:
        return 1 - self.continues

    def fill_from_start(self, x: torch.Tensor) -> torch.Tensor:
        """`x` at the first step of each step's segment."""
        return scan(x * self.starts, self.carried, torch.zeros_like(x[0]), reverse=False)

    def fill_from_end(self, x: torch.Tensor) -> torch.Tensor:
        """`x` at the last step of each step's segment."""
        return scan(x * self.ends, self.continues, torch.zeros_like(x[0]), reverse=True)

    def running_product(self, x: torch.Tensor) -> torch.Tensor:
        """`prod_{k = s}^{t} x_k`, s the first step of t's segment."""
        return scan(x * self.starts, x * self.carried, torch.zeros_like(x[0]), reverse=False)
