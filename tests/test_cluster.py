"""A real multi-node Ray cluster on loopback: `offpg launch | status | scale | stop` end to end.

The cluster is three `ray start --block` processes on 127.0.0.1 (a head with 1 CPU and two
workers with 2 CPUs each), with token authentication on, its own temp dir and its own ports, so
it cannot meet another Ray on this machine. The tests drive it through the `offpg` command line,
as a user would; only the status reads of `wait_for` (one a second, for minutes) go through one
long-lived client that makes the call `offpg status --json` makes (`STATUS_CLIENT`), so that the
waiting does not start a Python with Ray every second on the cluster's 2 cores. Every process it
starts is ended by the module's teardown: each node's
process group, then any process left that carries this cluster's temp dir or token (never
`ray stop`, which would end every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray

from benchmarks.loopback import session_priority

if not Path("/proc/self/environ").exists():
    pytest.skip("the teardown finds leftover processes through /proc", allow_module_level=True)

CLI = [sys.executable, "-m", "deploy.cli"]
REPO = Path(__file__).resolve().parent.parent
#: Seconds a scaled fleet gets to be running: new actors start Python, torch and Gymnasium on
#: a 2-core machine that the learner and the other actors keep busy (90 s ran out at a load
#: average of 50 from other jobs on the machine).
START_S = 180.0
#: Tries to start a node: a raylet whose Python agents do not come up within Ray's fixed
#: deadline (about 15 s) dies, and a node joining while a run keeps 2 cores busy can miss it.
ATTEMPTS = 4
#: The scheduler priority (autogroup niceness) of a node that joins mid-run. Each node is
#: started in its own session, and Linux (with autogroup scheduling, the default) shares the CPU
#: between sessions before it looks at niceness: a node's raylet, its two Python agents and its
#: workers share one session's share, whatever their niceness. On a real cluster a joining node
#: brings its own cores; here it must start its Python agents within Ray's fixed ~15 s on the
#: 2 cores the running cluster keeps busy, and at an equal share it did not (its agents waited
#: for a CPU 90% of the time). Raising a priority needs CAP_SYS_NICE (root); without it the
#: node starts at an equal share.
JOINING_PRIORITY = -10
#: The priority of the test's own clients (`offpg` commands and `STATUS_CLIENT`): each starts
#: Python and Ray's client, which took 5-16 s at an equal share of a cluster this busy.
CLIENT_PRIORITY = -5
#: The status client: one run name per line in, its status as one line `STATUS <json>` out
#: (`null` when the run is not there; Ray may print other lines).
STATUS_CLIENT = """
import json, sys
from deploy import controller
controller.connect(sys.argv[1])
for run in sys.stdin:
    try:
        state = controller.call(run.strip(), "status")
    except controller.RunNotFound:
        state = None
    print("STATUS", json.dumps(state, sort_keys=True, default=str), flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
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
    """Ray nodes started with `ray start --block`, each in its own process group."""

    def __init__(self) -> None:
        # Short: Ray's unix sockets live under it and their paths are length-limited.
        self.temp_dir = tempfile.mkdtemp(prefix="offpg-rc-", dir="/tmp")
        self.token = secrets.token_hex(32)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTEST_"))}
        self.env.update(
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN=self.token,
            RAY_USAGE_STATS_ENABLED="0",
            PYTHONPATH=str(REPO),
            # Within a node's session, the run's worker processes (learner, actors) yield the
            # CPU to the node's own processes (raylet, agents, and the GCS and dashboard on the
            # head). How long a raylet waits for its agents to register is raised for a loaded
            # machine (the ~15 s it waits for their ports is fixed).
            RAY_worker_niceness="10",
            RAY_agent_register_timeout_ms="120000",
        )
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.gcs = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.nodes: list[subprocess.Popen] = []
        self._client: subprocess.Popen | None = None

    def _popen(self, args: list[str], name: str, attempt: int, priority: int) -> subprocess.Popen:
        log = open(Path(self.temp_dir) / f"{name}-{attempt}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [
                *("ray", "start", "--block", "--node-ip-address=127.0.0.1"),
                *args,
                *node_ports(),
            ],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        self.nodes.append(proc)
        if priority:  # `ray start` has not started its raylet yet; they would share it anyway
            session_priority(priority, proc.pid)
        return proc

    def _start(
        self, args: list[str], name: str, cpus: float, priority: int = 0
    ) -> subprocess.Popen:
        """Start a node (`ray start` arguments, name, CPUs) in its own session at scheduler
        priority `priority` (`JOINING_PRIORITY`), and wait until the cluster has its CPUs. Ray
        gives a raylet 30 s (fixed) to register, and ~15 s to its dashboard agent; on a loaded
        2-core machine that can run out, so a node whose start failed is cleaned up and tried
        again, `ATTEMPTS` times in all. (One node at a time: `ray start` names its sockets
        after the ones it finds, so two starting at once can pick the same name.)"""
        cpus += self.total_cpus()
        for attempt in range(ATTEMPTS):
            proc = self._popen(args, name, attempt, priority)
            if self.wait_cpus(cpus, proc):
                return proc
            self.end_group(proc)
            self.nodes.remove(proc)
        raise AssertionError(f"Ray node {name} did not start; see {self.temp_dir}/{name}-*.log")

    def start_head(self) -> None:
        self._start(
            [
                "--head",
                f"--port={self.gcs_port}",
                "--num-cpus=1",
                "--include-dashboard=true",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}",
                f"--temp-dir={self.temp_dir}",
                "--object-store-memory=150000000",
                "--disable-usage-stats",
            ],
            "head",
            1,
        )

    def add_worker(self, cpus: int, priority: int = 0) -> subprocess.Popen:
        return self._start(
            [
                f"--address={self.gcs}",
                f"--num-cpus={cpus}",
                "--object-store-memory=150000000",
                "--disable-usage-stats",
            ],
            f"worker{len(self.nodes)}",
            cpus,
            priority,
        )

    def api(self, path: str) -> dict:
        request = urllib.request.Request(
            self.dashboard + path, headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            return json.loads(answer.read())

    def total_cpus(self) -> float:
        try:
            nodes = self.api("/nodes?view=summary")["data"]["summary"]
        except OSError:
            return 0.0
        return sum(
            n["raylet"].get("resourcesTotal", {}).get("CPU", 0.0)
            for n in nodes
            if n["raylet"].get("state") == "ALIVE"
        )

    def wait_cpus(self, cpus: float, proc: subprocess.Popen, timeout: float = 120.0) -> bool:
        """Wait for the cluster to have `cpus` CPUs; False when `proc` (the node) exited."""
        deadline = time.monotonic() + timeout
        while self.total_cpus() < cpus:
            if proc.poll() is not None:
                return False
            assert time.monotonic() < deadline, f"the cluster never reached {cpus} CPUs"
            time.sleep(0.5)
        return True

    def offpg(self, *args: str, timeout: float = 120.0, check: bool = True) -> str:
        began = time.monotonic()
        with subprocess.Popen(
            [*CLI, *args],
            env=self.env,
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        ) as proc:
            session_priority(CLIENT_PRIORITY, proc.pid)
            try:
                stdout, stderr = proc.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise
        done = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
        print(f"offpg {args[0]}: {time.monotonic() - began:.1f} s")
        if check:
            assert done.returncode == 0, f"offpg {' '.join(args)}: {done.stderr[-3000:]}"
        return done.stdout

    def status(self, run: str) -> dict:
        """The run's status, as `offpg status --json` prints it (through `STATUS_CLIENT`)."""
        if self._client is None or self._client.poll() is not None:
            self._client = subprocess.Popen(
                [sys.executable, "-c", STATUS_CLIENT, self.gcs],
                env=self.env,
                cwd=REPO,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
            session_priority(CLIENT_PRIORITY, self._client.pid)
        self._client.stdin.write(run + "\n")
        self._client.stdin.flush()
        while (line := self._client.stdout.readline()) and not line.startswith("STATUS "):
            pass
        state = json.loads(line.removeprefix("STATUS ") or "null")
        assert state is not None, f"no run {run!r} on the cluster (yet)"
        return state

    def node_id(self, proc: subprocess.Popen) -> str:
        """The Ray node id of the node that `proc` (its `ray start`) runs."""
        port = next(int(a.split("=")[1]) for a in proc.args if "node-manager-port" in a)
        for node in self.api("/nodes?view=summary")["data"]["summary"]:
            if int(node["raylet"]["nodeManagerPort"]) == port:
                return node["raylet"]["nodeId"]
        raise AssertionError(f"no node with node manager port {port}")

    def job_status(self, job_id: str) -> str:
        return self.api(f"/api/jobs/{job_id}")["status"]

    @staticmethod
    def end_group(proc: subprocess.Popen) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)

    def stop(self) -> None:
        if self._client is not None:
            self._client.kill()
            self._client.wait(timeout=15)
        # Killed, not drained: a node asked to stop drains its work for up to 30 s first.
        for proc in reversed(self.nodes):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.nodes:
            proc.wait(timeout=15)
        # Processes that left the groups (Ray workers, the job's driver): ours carry this
        # cluster's temp dir on their command line or its token in their environment.
        ours = [pid for pid in _pids() if self._is_ours(pid)]
        for pid in ours:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while any(Path(f"/proc/{pid}").exists() for pid in ours):
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)

    def _is_ours(self, pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            return False
        return self.temp_dir.encode() in cmdline or (
            f"RAY_AUTH_TOKEN={self.token}".encode() in environ.split(b"\0")
        )


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


@pytest.fixture(scope="module")
def cluster() -> Iterator[LoopbackCluster]:
    # The test session's local Ray (tests/conftest.py) is not needed here: its processes would
    # take CPU from the nodes starting on 2 cores. The next module that needs it starts it.
    if ray.is_initialized():
        ray.shutdown()
    rc = LoopbackCluster()
    try:
        rc.start_head()
        rc.add_worker(2)
        rc.add_worker(2)
        yield rc
    finally:
        rc.stop()


def launch(rc: LoopbackCluster, run: str, tmp: Path, *sets: str) -> str:
    out = rc.offpg(
        "launch",
        "--address",
        rc.dashboard,
        "--name",
        run,
        "--set",
        "run.target_return=none",
        "--set",
        "run.max_env_steps=500000000",
        "--set",
        "run.log_every=1.0",
        "--set",
        "actors.num_envs=16",
        "--set",
        f"run.logdir={tmp}",
        *(arg for s in sets for arg in ("--set", s)),
    )
    assert f"offpg: run {run} submitted as job " in out, out
    return out.split("submitted as job ", 1)[1].split()[0]


def wait_for(rc: LoopbackCluster, run: str, what: str, ok, timeout: float = START_S) -> dict:
    """Poll `offpg status --json` until `ok(status)`; returns that status."""
    began = time.monotonic()
    deadline = began + timeout
    last: dict = {}
    while time.monotonic() < deadline:
        try:
            last = rc.status(run)
        except AssertionError:  # not registered yet
            time.sleep(1.0)
            continue
        if ok(last):
            print(f"{run}: {what} after {time.monotonic() - began:.1f} s")
            return last
        time.sleep(1.0)
    raise AssertionError(f"{run}: never {what}; last status {json.dumps(last)[:2000]}")


def running(n: int):
    return lambda s: (
        s["state"] == "running" and s["actors"]["running"] == n and s["actors"]["pending"] == 0
    )


def stop_run(rc: LoopbackCluster, run: str, job_id: str) -> str:
    out = rc.offpg("stop", run, "--address", rc.gcs, timeout=200)
    deadline = time.monotonic() + 60
    while rc.job_status(job_id) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.monotonic() < deadline, "the job did not end after offpg stop"
        time.sleep(0.5)
    assert rc.job_status(job_id) == "SUCCEEDED"
    return out


def test_launch_scale_2_4_1_beyond_the_cluster_lose_a_node_and_stop(cluster, tmp_path):
    """One launched run: scaled 2 -> 4 -> 1 (training goes on), then to 5, more than the cluster
    holds (the 5th is pending, not failed, until a node joins); that node is lost (issue 6: its
    actors are restarted on the remaining nodes, counted); then stopped."""
    rc, run = cluster, "elastic"
    job_id = launch(rc, run, tmp_path, "run.num_actors=2")
    extra = None
    try:
        first = wait_for(
            rc,
            run,
            "2 actors running with env steps",
            lambda s: running(2)(s) and s["env_steps"] > 0,
        )
        # Placement: the replay service sits on the learner's node; actors spread.
        assert set(first["placement"]["replay_nodes"]) == {first["placement"]["learner_node"]}
        assert first["cluster"]["cpus_total"] == 5
        steps = [first["env_steps"]]

        for n in (4, 1):
            rc.offpg("scale", run, "--actors", str(n), "--address", rc.gcs)
            asked = time.monotonic()
            now = rc.status(run)
            assert now["desired_actors"] == n  # the request is visible at once
            now = wait_for(rc, run, f"{n} actors running", running(n))
            print(f"{run}: {n} actors running {time.monotonic() - asked:.1f} s after the request")
            assert len(now["actors"]["ids"]) == n
            assert now["actors"]["restarted"] == 0
            steps.append(now["env_steps"])
            if n == 4:
                assert len(now["actors"]["by_node"]) >= 2, "actors were not spread"
            # Training goes on: the learner advances and so do the env steps.
            later = wait_for(
                rc, run, "making progress", lambda s, v=now: s["env_steps"] > v["env_steps"]
            )
            assert later["learner"]["version"] > first["learner"]["version"]
            steps.append(later["env_steps"])
        assert steps == sorted(steps) and len(set(steps)) == len(steps), steps

        text = rc.offpg("status", run, "--address", rc.gcs)
        assert "1 running, 0 pending, 0 restarted" in text and "offpg tensorboard" in text
        # Through the dashboard (a relay job): stdout is exactly one JSON document.
        relayed = json.loads(rc.offpg("status", run, "--json", "--address", rc.dashboard))
        assert relayed["run"] == run and relayed["actors"]["running"] == 1

        # 5 CPUs, the learner holds 1: room for 4 one-CPU actors, so the 5th waits.
        rc.offpg("scale", run, "--actors", "5", "--address", rc.gcs)
        waiting = wait_for(
            rc,
            run,
            "4 running and 1 pending",
            lambda s: (
                s["state"] == "running"
                and s["actors"]["running"] == 4
                and s["actors"]["pending"] == 1
            ),
        )
        assert waiting["actors"]["restarted"] == 0
        text = rc.offpg("status", run, "--address", rc.gcs)
        assert "1 pending" in text and "they start when nodes are added" in text
        # Still pending a few polls later: pending is not failing (no restarts).
        time.sleep(3)
        still = rc.status(run)
        assert still["actors"]["pending"] == 1 and still["actors"]["restarted"] == 0
        assert still["env_steps"] > waiting["env_steps"]
        extra = rc.add_worker(2, priority=JOINING_PRIORITY)
        joined = wait_for(rc, run, "5 actors running after the node joined", running(5))
        assert joined["actors"]["restarted"] == 0

        # That node dies (its `ray start` process group is killed): the actors it held are
        # restarted (counted) on the remaining nodes, the one that does not fit waits pending
        # (4 one-CPU places again), and training goes on.
        dead = rc.node_id(extra)
        lost = joined["actors"]["by_node"].get(dead, 0)
        assert lost >= 1, f"the joined node holds no actor: {joined['actors']}"
        rc.end_group(extra)
        extra = None
        after = wait_for(
            rc,
            run,
            "the lost node's actors restarted elsewhere, the rest pending",
            lambda s: (
                s["state"] == "running"
                and s["actors"]["restarted"] >= lost
                and dead not in s["actors"]["by_node"]
                and (s["actors"]["running"], s["actors"]["pending"]) == (4, 1)
            ),
        )
        # Training goes on: the actors step and the learner learns from what they send (the
        # learner waits for the restarted actors' first fragments, so it may move later).
        wait_for(
            rc,
            run,
            "making progress",
            lambda s: (
                s["env_steps"] > after["env_steps"]
                and s["learner"]["version"] > after["learner"]["version"]
            ),
        )

        out = stop_run(rc, run, job_id)
        checkpoint = out.rsplit("final checkpoint ", 1)[1].strip()
        assert Path(checkpoint).is_file() and Path(checkpoint).parent.parent == tmp_path / run
        logs = rc.offpg("logs", run, "--address", rc.dashboard)
        assert "stop requested (offpg stop)" in logs and "scaling from 2 to 4" in logs
        assert list((tmp_path / run).glob("events.out.tfevents.*"))
        assert (tmp_path / run / "replay.snapshot").is_file()
        # The run is gone from the cluster: its controller ended with it.
        gone = rc.offpg("status", run, "--address", rc.gcs, check=False)
        assert gone == ""
    finally:
        if rc.job_status(job_id) not in ("SUCCEEDED", "FAILED", "STOPPED"):
            rc.offpg("stop", run, "--address", rc.gcs, "--no-wait", check=False)
        if extra is not None:
            rc.end_group(extra)


def test_a_client_without_the_token_fails_at_once_with_one_line(cluster, tmp_path):
    """Without RAY_AUTH_MODE=token, `train --address` and `status --address` end with exit 2
    and one line saying how to pass the token (not Ray's retries and traceback); nothing is
    written."""
    env = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    for args in (
        ["train", "--address", cluster.gcs, "--logdir", str(tmp_path), "--name", "notoken"],
        ["status", "somerun", "--json", "--address", cluster.gcs],
    ):
        done = subprocess.run(
            [*CLI, *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 2, done.stderr[-3000:]
        assert done.stderr.strip().count("\n") == 0, done.stderr[-3000:]
        assert "set RAY_AUTH_MODE=token" in done.stderr and done.stdout == ""
    assert not any(tmp_path.iterdir())
