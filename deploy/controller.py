"""A run's named controller: the mailbox between a running job and `offpg scale | status | stop`.

The job driver starts one `Controller` per run as a named Ray actor
(`offpg-controller-<run>` in the `offpg` namespace, owned by the driver, so it ends with the
run). Every poll the driver publishes its status and reads back what the user asked for: the
desired actor count and whether to stop. The command line finds the controller by name from
any process that can join the cluster (`--address HOST:6379`, `ray://HOST:10001`, or the local
cluster) and changes only those two values; the driver applies them on its next poll. The
controller never calls the job, so a stuck command can never stall training.

`Controller` is a plain class; `deploy.topology.start_controller` makes it a Ray actor. The
client helpers at the end are what `deploy.commands` (the `offpg scale | status | stop`
commands) calls it with.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import sys
import threading
import time
from typing import Any

#: Ray namespace of every run's controller, whatever namespace the driver itself runs in.
NAMESPACE = "offpg"
#: Seconds a client waits for a controller call.
CLIENT_TIMEOUT = 30.0
#: The most rollout actors a run may have (`run.num_actors`, `offpg scale --actors`).
MAX_ACTORS = 4096


def controller_name(run: str) -> str:
    return f"offpg-controller-{run}"


@dataclasses.dataclass(frozen=True)
class Orders:
    """What the driver must apply after publishing its status."""

    desired_actors: int
    stop: bool
    stop_reason: str
    #: Clients blocked in `wait_stopped` (`offpg stop`) when the status was published.
    waiting_for_stop: int = 0


class Controller:
    """Desired actor count, stop request, and the latest status the driver published."""

    def __init__(self, run: str, num_actors: int):
        self._run = run
        self._lock = threading.Lock()
        self._published = threading.Condition(self._lock)
        self._desired = num_actors
        self._stop = False
        self._stop_reason = ""
        self._status: dict[str, Any] = {"run": run, "state": "starting"}
        self._published_at = time.time()
        self._final: dict[str, Any] | None = None
        self._waiting = 0  # calls blocked in wait_stopped

    # -- the driver's side ---------------------------------------------------------------------

    def publish(self, status: dict[str, Any]) -> Orders:
        """Store the driver's latest status; return the desired actor count and stop flag."""
        with self._lock:
            self._status = dict(status)
            self._published_at = time.time()
            if status.get("state") == "stopped":
                self._final = dict(status)
            self._published.notify_all()
            return Orders(self._desired, self._stop, self._stop_reason, self._waiting)

    # -- the command line's side ---------------------------------------------------------------

    def scale(self, num_actors: int) -> dict[str, int]:
        """Ask for `num_actors` rollout actors; the driver applies it on its next poll."""
        if not isinstance(num_actors, int) or not 0 <= num_actors <= MAX_ACTORS:
            raise ValueError(
                f"the actor count must be an integer in [0, {MAX_ACTORS}], got {num_actors!r}"
            )
        with self._lock:
            previous, self._desired = self._desired, num_actors
        return {"previous": previous, "desired": num_actors}

    def request_stop(self, reason: str = "stop requested") -> None:
        """Ask the driver to stop gracefully (final checkpoint, replay snapshot, flushed logs)."""
        with self._lock:
            self._stop, self._stop_reason = True, reason

    def status(self) -> dict[str, Any]:
        """The latest published status, with the desired count and its age in seconds."""
        with self._lock:
            return {
                **self._status,
                "desired_actors": self._desired,
                "stop_requested": self._stop,
                "status_age_s": round(time.time() - self._published_at, 3),
            }

    def wait_stopped(self, timeout: float) -> dict[str, Any] | None:
        """Block up to `timeout` s for the driver's final status (None when it did not come)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._waiting += 1
            try:
                while self._final is None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    self._published.wait(left)
                return dict(self._final)
            finally:
                self._waiting -= 1


# -- client helpers (used by deploy.commands) --------------------------------------------------


class RunNotFound(LookupError):
    """No controller of that run on the cluster: the run is not running (or never was)."""


class TokenRefused(ConnectionError):
    """The cluster uses token authentication and refused this process's (missing) token."""


def check_token(address: str | None) -> None:
    """Raise `TokenRefused`, in milliseconds, when the GCS at `address` (`host:port`) refuses
    this process's token: `ray.init` would retry for ~20 s and end in two pages of traceback.

    Only a GCS that accepts a TCP connection is asked (one key-value read); an address that
    is not `host:port`, a port that does not answer, or any other error is left to `ray.init`
    to report."""
    host, _, port = (address or "").rpartition(":")
    if not host or "://" in address or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=2.0).close()
        from ray._raylet import GcsClient
        from ray.exceptions import AuthenticationError
    except (OSError, ImportError):
        return
    try:
        with _stderr_silenced():  # Ray's C++ client logs the refusal as a warning line
            GcsClient(address=address).internal_kv_get(b"offpg-token-check", None, timeout=5)
    except AuthenticationError:
        mode = os.environ.get("RAY_AUTH_MODE", "disabled")
        raise TokenRefused(
            f"the Ray cluster at {address} refused this process's token (RAY_AUTH_MODE is "
            f"{mode!r}): set RAY_AUTH_MODE=token and the cluster's token in RAY_AUTH_TOKEN, "
            "the file named by RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token (`ray "
            "get-auth-token` on the head node prints it)"
        ) from None
    except Exception:  # anything else is for ray.init to report
        return


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 points at /dev/null inside the block (output from C++ included)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def connect(address: str | None) -> None:
    """Join the cluster at `address` (GCS `host:port`, `ray://...`, or None/'auto': local)."""
    import ray

    if ray.is_initialized():
        return
    check_token(address)
    ray.init(
        address=address or "auto",
        namespace=NAMESPACE,
        logging_level="ERROR",
        log_to_driver=False,
        configure_logging=False,
    )


def get_controller(run: str) -> Any:
    import ray

    try:
        return ray.get_actor(controller_name(run), namespace=NAMESPACE)
    except ValueError:
        raise RunNotFound(
            f"no running offpg run named {run!r} on this cluster (its controller "
            f"{controller_name(run)!r} is not in namespace {NAMESPACE!r})"
        ) from None


def call(run: str, method: str, *args: Any, timeout: float = CLIENT_TIMEOUT) -> Any:
    """Call `method` on the run's controller and wait for the answer."""
    import ray

    handle = get_controller(run)
    try:
        return ray.get(getattr(handle, method).remote(*args), timeout=timeout)
    except ray.exceptions.RayActorError:
        raise RunNotFound(f"run {run!r} ended while the call was in flight") from None
