"""Host-side batch preparation for the learner: numpy `Batch` -> device tensors, ahead of time.

`Prefetcher` runs one named thread that pulls batches from the learner's iterator, converts them
(`to_tensors`: pinned memory and non-blocking copies on CUDA; stacked frames, which a batch
holds once each, are rebuilt into the observations the actors acted on, on the device:
`stack_frames`) and keeps at most `depth` of them in a bounded queue, so the host work overlaps
the gradient step. The thread is stopped and
joined by `close()`; an exception in the iterator is re-raised by `get()` in the consumer.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import torch

from replay.frames import head_positions
from replay.trajectory import Batch

log = logging.getLogger(__name__)

#: Seconds between checks of the stop flags while the queue is full or empty.
_POLL_S = 0.1
#: Seconds to wait for the thread to finish on `close()`.
_JOIN_TIMEOUT_S = 10.0
THREAD_NAME = "offpg-learner-prefetch"


class TensorBatch(NamedTuple):
    """A `Batch` as tensors on the learner's device (same layout, same dtypes)."""

    obs: torch.Tensor  # [T+1, B, *obs_shape] float32 | uint8
    actions: torch.Tensor  # [T, B] int64 | [T, B, d] float32
    rewards: torch.Tensor  # [T, B] float32
    terminated: torch.Tensor  # [T, B] bool
    truncated: torch.Tensor  # [T, B] bool
    autoreset: torch.Tensor  # [T, B] bool
    behaviour_logp: torch.Tensor  # [T, B] float32
    core_state: torch.Tensor  # [2, B, core_size] float32 (core_size 0: feed-forward)
    policy_version: np.ndarray  # [B] int64, kept on the host (only used for metrics)
    insert_version: np.ndarray | None = None  # [B] int64 or None, host, metrics only


#: The `TensorBatch` fields that live on the device (the rest stay on the host).
DEVICE_FIELDS: tuple[str, ...] = TensorBatch._fields[:-2]


def to_tensors(batch: Batch, device: torch.device, stream: Any = None) -> TensorBatch:
    """Move a `Batch` to `device`, observations stacked (`stack_frames`). On CUDA the arrays go
    through pinned memory and are copied with `non_blocking=True` on `stream` (the prefetch
    thread's own stream), which is synchronised before returning so that the tensors are
    complete when handed over."""
    arrays = [getattr(batch, name) for name in DEVICE_FIELDS]
    host = (np.asarray(batch.policy_version, np.int64), batch.insert_version)
    stacked = batch.frame_stack > 1
    if stacked:
        arrays.append(batch.stack_heads)
    if device.type != "cuda":
        # Arrays decoded by Ray are read-only; torch only wraps writable memory.
        tensors = [torch.from_numpy(a if a.flags.writeable else a.copy()) for a in arrays]
        if stacked:
            heads = tensors.pop()
            tensors[0] = stack_frames(tensors[0], batch.frame_stack, batch.stack_resets, heads)
        return TensorBatch(*tensors, *host)
    # On a side stream the copies overlap the step running on the default stream; without one
    # (a direct `step(batch)`) they are ordered on the current stream and need no sync.
    with torch.cuda.stream(stream):
        tensors = [_to_cuda(a, device) for a in arrays]
        if stacked:
            heads = tensors.pop()
            tensors[0] = stack_frames(tensors[0], batch.frame_stack, batch.stack_resets, heads)
    if stream is not None:
        stream.synchronize()
    return TensorBatch(*tensors, *host)


def stack_frames(
    frames: torch.Tensor, frame_stack: int, resets: np.ndarray, heads: torch.Tensor
) -> torch.Tensor:
    """`frames [T+K, B, *frame_shape]` -> the stacked observations `[T+1, B, K, *frame_shape]`
    on the frames' device: `replay.frames.unpack` in torch (one copy, one scatter of heads)."""
    obs = frames.unfold(0, frame_stack, 1).movedim(-1, 2).contiguous()
    rows, cols, places, sources = head_positions(resets, frame_stack, obs.shape[0])
    if len(rows):
        offsets = places + rows - np.asarray(resets, np.int64)[sources, 0]
        index = [torch.as_tensor(a, device=obs.device) for a in (rows, cols, places)]
        src = [torch.as_tensor(a, device=obs.device) for a in (sources, offsets)]
        obs[index[0], index[1], index[2]] = heads[src[0], src[1]]
    return obs


def _to_cuda(array: np.ndarray, device: torch.device) -> torch.Tensor:
    host = torch.from_numpy(np.ascontiguousarray(array))
    if host.numel() == 0:  # a feed-forward core_state, no stack_heads: nothing to copy
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


_END = object()


class _Failure(NamedTuple):
    error: BaseException


class Prefetcher:
    """A named producer thread filling a bounded queue with converted batches."""

    def __init__(self, source: Iterator[Any], depth: int, convert: Callable[[Any], Any]):
        self._source = source
        self._convert = convert
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name=THREAD_NAME, daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for batch in self._source:
                if self._stop.is_set() or not self._put(self._convert(batch)):
                    return
            self._put(_END)
        except BaseException as exc:  # handed to the consumer, re-raised there
            self._put(_Failure(exc))

    def get(self, stop: threading.Event | None) -> Any:
        """The next converted batch, or None when the source is exhausted or `stop` is set."""
        while stop is None or not stop.is_set():
            try:
                item = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    return None
                continue
            if item is _END:
                return None
            if isinstance(item, _Failure):
                raise item.error
            return item
        return None

    def close(self) -> None:
        """Stop the producer and join it. A producer blocked inside the source's `next()`
        cannot be interrupted; it is abandoned (daemon) after a timeout, with a warning."""
        self._stop.set()
        while True:  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=_JOIN_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning(
                "prefetch thread still blocked in the batch iterator after %.0f s",
                _JOIN_TIMEOUT_S,
            )
