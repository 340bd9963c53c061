"""A multi-node Ray cluster on this machine's loopback, for benchmarks.

`LoopbackCluster` starts a head and worker nodes with `ray start --block` on 127.0.0.1, each in
its own process group, with its own temp dir and free ports, so it cannot meet another Ray on
the machine (tests/test_cluster.py does the same for the `offpg` CLI tests). Token
authentication is off (`RAY_AUTH_MODE=disabled`): a driver in this process reads Ray's auth
mode when it imports Ray, before the cluster and its token exist. Nodes can carry fake custom
resources, which is how a benchmark places its actors on a chosen node. `stop()` ends every
process the cluster started: each node's process group, then any process left that carries the
cluster's temp dir or marker variable (never `ray stop`, which would end every Ray on the
machine). Use it as a context manager; `stop()` also runs on Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
#: Seconds a node gets to register (Ray gives a raylet 30 s; a loaded machine needs a retry).
NODE_START_S = 120.0
#: Tries per node: Ray gives a raylet a fixed 30 s to register, which a loaded machine misses.
START_ATTEMPTS = 5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_ports() -> list[str]:
    names = (
        "node-manager-port",
        "object-manager-port",
        "metrics-export-port",
        "dashboard-agent-listen-port",
        "dashboard-agent-grpc-port",
        "runtime-env-agent-port",
    )
    return [f"--{name}={free_port()}" for name in names]


class LoopbackCluster:
    """Ray nodes on 127.0.0.1; `address` is the head's GCS for `ray.init(address=...)`."""

    def __init__(self, object_store_bytes: int = 300_000_000) -> None:
        # Short: Ray's unix sockets live under it and their paths are length-limited.
        self.temp_dir = tempfile.mkdtemp(prefix="offpg-bl-", dir="/tmp")
        #: In every node's environment, so the processes Ray starts inherit it (see `stop`).
        self.marker = secrets.token_hex(16)
        self.object_store_bytes = object_store_bytes
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTEST_"))}
        self.env.update(
            OFFPG_LOOPBACK_CLUSTER=self.marker,
            RAY_AUTH_MODE="disabled",
            RAY_USAGE_STATS_ENABLED="0",
            PYTHONPATH=str(REPO),
            # The nodes' own processes (GCS, raylets) run at the default priority (`_spawn`);
            # the workers, which do the work, at this process's.
            RAY_worker_niceness=str(os.getpriority(os.PRIO_PROCESS, 0)),
            # How long a raylet waits for its agents (Python processes) to come up: the
            # defaults are too short on a loaded machine.
            RAY_agent_register_timeout_ms="120000",
            RAY_raylet_start_wait_time_s="120",
        )
        self.gcs_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.nodes: list[subprocess.Popen] = []
        # SIGTERM raises KeyboardInterrupt, as Ctrl-C does, so the caller's `finally` (or
        # `with`) stops the cluster; by default it would end this process and leave the nodes.
        signal.signal(signal.SIGTERM, _interrupt)

    def __enter__(self) -> LoopbackCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def connect(self) -> None:
        """`ray.init` this process as the cluster's driver, keeping SIGTERM's handler (`ray.init`
        installs one that ends the process at once)."""
        import ray

        ray.init(address=self.address, logging_level="ERROR", log_to_driver=False)
        signal.signal(signal.SIGTERM, _interrupt)

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen:
        log = open(Path(self.temp_dir) / f"{name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            [
                "ray",
                "start",
                "--block",
                "--node-ip-address=127.0.0.1",
                f"--object-store-memory={self.object_store_bytes}",
                "--disable-usage-stats",
                *args,
                *_node_ports(),
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            # Raised priority while it starts (`_settle` lowers it to the default after): `ray
            # start` gives its raylet a fixed 30 s to register, and the raylet waits for its
            # agents, Python processes, to start first; on a loaded machine they miss it.
            preexec_fn=_start_priority,
        )
        log.close()
        self.nodes.append(proc)
        return proc

    def start_head(self, cpus: float, resources: dict[str, float] | None = None) -> None:
        """Start the head node and wait until it says it has started; a head that fails to
        come up (Ray gives its processes fixed start-up timeouts) is tried again."""
        for attempt in range(START_ATTEMPTS):
            proc = self._spawn(
                [
                    "--head",
                    f"--port={self.gcs_port}",
                    f"--num-cpus={cpus:g}",
                    f"--resources={json.dumps(resources or {})}",
                    "--include-dashboard=false",
                    f"--dashboard-port={free_port()}",
                    f"--ray-client-server-port={free_port()}",
                    f"--temp-dir={self.temp_dir}",
                ],
                f"head-{attempt}",
            )
            log = Path(self.temp_dir) / f"head-{attempt}.log"
            if self._wait(lambda log=log: b"Ray runtime started" in log.read_bytes(), proc):
                self._settle()
                return
        raise RuntimeError(f"the Ray head did not start; see {self.temp_dir}/head-*.log")

    def add_worker(self, cpus: float, resources: dict[str, float] | None = None) -> None:
        """Start a worker node and wait until it has joined (this process must be connected:
        `ray.init(address=self.address)`); tried again when it fails to start."""
        import ray

        def alive() -> int:
            return sum(1 for n in ray.nodes() if n["Alive"])

        before = alive()
        name = f"worker{len(self.nodes)}"
        for attempt in range(START_ATTEMPTS):
            proc = self._spawn(
                [
                    f"--address={self.address}",
                    f"--num-cpus={cpus:g}",
                    f"--resources={json.dumps(resources or {})}",
                ],
                f"{name}-{attempt}",
            )
            if self._wait(lambda: alive() > before, proc):
                self._settle()
                return
        raise RuntimeError(f"Ray node {name} did not join; see {self.temp_dir}/{name}-*.log")

    def _wait(self, ready, proc: subprocess.Popen) -> bool:
        """Wait for `ready()`; False (the node's group ended) when `proc` exits first."""
        deadline = time.monotonic() + NODE_START_S
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                _end_group(proc)
                self.nodes.remove(proc)
                return False
            time.sleep(0.5)
        return True

    def _settle(self) -> None:
        """The started nodes' own processes back to the default priority (workers keep theirs:
        `RAY_worker_niceness`)."""
        for pid in _pids():
            if pid == os.getpid() or not self._is_ours(pid):
                continue
            with contextlib.suppress(OSError):
                if os.getpriority(os.PRIO_PROCESS, pid) < 0:
                    os.setpriority(os.PRIO_PROCESS, pid, 0)

    def stop(self) -> None:
        """End every process this cluster started (idempotent)."""
        for proc in reversed(self.nodes):
            _end_group(proc)
        self.nodes.clear()
        # Processes that left the groups (Ray workers): ours carry this cluster's temp dir on
        # their command line or its marker in their environment.
        ours = [pid for pid in _pids() if pid != os.getpid() and self._is_ours(pid)]
        for pid in ours:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while any(Path(f"/proc/{pid}").exists() for pid in ours) and time.monotonic() < deadline:
            time.sleep(0.2)

    def _is_ours(self, pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return False
        return self.temp_dir.encode() in cmdline or (
            f"OFFPG_LOOPBACK_CLUSTER={self.marker}".encode() in environ.split(b"\0")
        )


def _end_group(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


#: Niceness of a node's own processes while it starts (negative needs root; else the default).
START_NICENESS = -10


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _start_priority() -> None:
    for niceness in (START_NICENESS, 0):
        try:
            os.setpriority(os.PRIO_PROCESS, 0, niceness)
            return
        except OSError:  # raising priority needs privileges
            continue


def session_priority(priority: int, pid: int | None = None) -> str:
    """Give the session that process `pid` leads (by default: this process, put in a session of
    its own unless it leads one) the scheduler priority `priority`; returns the kernel's account
    of it. Linux's autogroup scheduling (the default) shares the CPU between sessions before it
    looks at niceness, and each node of a loopback cluster runs in its own session: a process's
    niceness does not move it ahead of the nodes' processes, its session's priority does.
    Raising it needs root; elsewhere the session keeps an equal share."""
    if pid is None:
        with contextlib.suppress(OSError):  # already a process group leader
            os.setsid()
    group = Path(f"/proc/{pid or 'self'}/autogroup")
    try:
        group.write_text(str(priority))
        return group.read_text().strip()
    except OSError as e:
        return f"the default priority ({e.strerror})"


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]
