"""Data-parallel learners: one gradient step taken by N processes on N parts of the batch.

Every rank evaluates its own part of the batch and back-propagates its own loss; `GradientSync`
then sums, over the ranks, each rank's gradients and loss statistics weighted by its number of
real steps `n_r` (one all-reduce of one flat bucket) and divides by the total `n`. The losses
of `learner.loss` are masked means over a batch's real steps, so the result is exactly the
gradient one learner would take on the whole batch: `sum_r n_r * grad(L_r) / n = grad(L)`.
Every rank then clips and applies the same optimiser step to the same gradient, so the weights
stay identical without being sent again. The skip of a non-finite step is decided on the
reduced values, so every rank skips the same steps.

`join` forms the process group (gloo on CPU, NCCL on CUDA) with a timeout, so no rank waits in a
collective for longer than that; `GroupBroken` is what a failed collective raises. `align`,
called once after joining, gives every rank rank 0's weights and version (a fresh start
initialises each rank's network differently) and checks that all restored the same checkpoint.
Nothing here knows Ray: `deploy.learners` hands out the rendezvous address and re-forms the
group when a rank dies.
"""

from __future__ import annotations

import datetime
import socket
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist

#: Sums a tensor in place over the ranks of a group.
AllReduce = Callable[[torch.Tensor], None]
#: Overwrites a tensor in place with rank 0's.
Broadcast = Callable[[torch.Tensor], None]


class GroupBroken(RuntimeError):
    """A collective of the learners' process group failed: a rank died or timed out."""


def free_address(host: str) -> str:
    """`tcp://host:port` with a port that was free on this machine a moment ago (rank 0 binds
    it for the group's store right after; no fixed port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return f"tcp://{host}:{port}"


def join(address: str, rank: int, world_size: int, device: torch.device, timeout_s: float) -> None:
    """Join the default process group of `world_size` ranks at `address` (`free_address` of
    rank 0); every collective on it fails after `timeout_s` seconds instead of hanging."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    try:
        dist.init_process_group(
            backend,
            init_method=address,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            **({"device_id": device} if device.type == "cuda" else {}),
        )
    except Exception as exc:  # a rank that never came, an address taken meanwhile
        raise GroupBroken(f"rank {rank} could not join the group at {address}: {exc}") from exc


def group_ops() -> tuple[AllReduce, Broadcast]:
    """The all-reduce (sum) and broadcast (from rank 0) of the default group `join` formed."""
    return (lambda t: dist.all_reduce(t)), (lambda t: dist.broadcast(t, src=0))


def leave() -> None:
    """Leave the default group, if this process is in one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def _collective(op: Callable[[torch.Tensor], None], tensor: torch.Tensor, what: str) -> None:
    try:
        op(tensor)
    except Exception as exc:
        raise GroupBroken(f"{what} failed: {type(exc).__name__}: {exc}") from exc


class GradientSync:
    """Averages the gradients and step statistics of one step over the ranks (see the module
    docstring): `Learner.sync` calls it between the backward pass and the clipping."""

    def __init__(self, all_reduce: AllReduce):
        self._all_reduce = all_reduce

    def __call__(
        self, params: Iterable[torch.nn.Parameter], stats: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Replace each parameter's gradient by the sample-weighted mean over the ranks and
        return `stats` reduced alike: `samples` summed, `bad` (non-finite flags) summed, every
        other entry the sample-weighted mean."""
        grads = [p.grad for p in params if p.grad is not None]
        n = stats["samples"].clamp(min=1.0)
        names = [k for k in stats if k not in ("samples", "bad")]
        extra = torch.stack([*(stats[k] * n for k in names), n, stats["bad"]])
        flat = torch.cat([*(g.reshape(-1) * n for g in grads), extra.to(n.dtype)])
        _collective(self._all_reduce, flat, "the gradient all-reduce")
        total = flat[-2].clone()
        flat[:-1] /= total
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        reduced = dict(zip(names, flat[offset : offset + len(names)], strict=True))
        return {**reduced, "samples": total, "bad": flat[-1]}


def align(model: torch.nn.Module, version: int, restored: int | None, broadcast: Broadcast) -> int:
    """Give this rank rank 0's weights and version; returns the version.

    Raises `GroupBroken` when this rank restored another checkpoint than rank 0 (one was
    written between their reads): its optimiser state would differ, so the group must form
    again."""
    device = next(model.parameters()).device
    header = torch.tensor([version, -1 if restored is None else restored], device=device)
    _collective(broadcast, header, "the version broadcast")
    mine = -1 if restored is None else restored
    if int(header[1]) != mine:
        raise GroupBroken(
            f"restored checkpoint version {restored}, rank 0 restored {int(header[1])}"
        )
    with torch.no_grad():
        tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
        flat = torch.cat([t.reshape(-1) for t in tensors])
        _collective(broadcast, flat, "the weight broadcast")
        offset = 0
        for t in tensors:
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
    return int(header[0])
