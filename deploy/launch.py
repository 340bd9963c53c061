"""`offpg launch` and `offpg logs`: the training job on a Ray cluster, through Ray's Jobs API.

`launch` validates the configuration here (a bad one never reaches the cluster: exit 2), then
submits `python -m deploy.cli train --set ...` with `ray.job_submission.JobSubmissionClient`,
the SDK behind `ray job submit`. The entrypoint carries every key that differs from the
CartPole recipe (`deploy.config.RECIPE`, which `offpg train` loads without `--config` and which
travels with the code) as a `--set`, so the file given with `--config` need not exist on the
cluster. The runtime environment uploads the project directory (`working_dir`, honouring
`.gitignore`) so the cluster runs the code you launched from; the dependencies come from the
cluster's image (`deploy/Dockerfile`) or `--pip`.

Token authentication: the SDK sends `Authorization: Bearer <token>` when this process runs with
`RAY_AUTH_MODE=token`, the token read from `RAY_AUTH_TOKEN`, the file named by
`RAY_AUTH_TOKEN_PATH`, or `~/.ray/auth_token` (see README "Run on a cluster").

Jobs are tagged with the run name in their metadata (`offpg_run`), which is how `offpg logs RUN`
and the HTTP relay of `offpg scale | status | stop` find them.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from deploy.config import JobConfig, override_args

#: Metadata key naming the run a submitted job trains.
RUN_KEY = "offpg_run"
#: Metadata key of the short jobs that relay a command to a run's controller.
RELAY_KEY = "offpg_relay"
#: Never uploaded, whatever .gitignore says (run output, caches, virtual environments).
EXCLUDES = [".git", "runs", "**/__pycache__", "**/.venv*", ".pytest_cache", ".hypothesis"]
#: Seconds a relayed command may take on the cluster.
RELAY_TIMEOUT_S = 180.0
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def project_root() -> Path | None:
    """The checkout this offpg was imported from, if it is one (has pyproject.toml)."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").is_file() else None


def client(address: str | None) -> Any:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def entrypoint(config: JobConfig) -> str:
    """The cluster-side command: `offpg train` with every key that differs from the recipe as
    a `--set` (`deploy.config.override_args`)."""
    args = ["python", "-m", "deploy.cli", "train"]
    for item in override_args(config):
        args += ["--set", item]
    return shlex.join(args)


def runtime_env(working_dir: str | None, pip: list[str]) -> dict[str, Any]:
    env: dict[str, Any] = {"env_vars": {"PYTHONUNBUFFERED": "1"}}
    if working_dir:
        env["working_dir"] = working_dir
        env["excludes"] = list(EXCLUDES)
    if pip:
        env["pip"] = list(pip)
    return env


def launch(
    config: JobConfig,
    *,
    address: str | None,
    working_dir: str | None,
    pip: list[str],
    wait: bool,
) -> int:
    """Submit the job; print its run name, job id and the follow-up commands."""
    wd = working_dir if working_dir is not None else project_root()
    env = runtime_env(str(wd) if wd else None, pip)
    jobs = client(address)
    run = config.run.name
    submission_id = f"offpg-{run}-{uuid.uuid4().hex[:6]}"
    job_id = jobs.submit_job(
        entrypoint=entrypoint(config),
        submission_id=submission_id,
        runtime_env=env,
        metadata={RUN_KEY: run},
    )
    at = f" --address {address}" if address else ""
    print(f"offpg: run {run} submitted as job {job_id}", flush=True)
    print(
        f"  offpg status {run}{at}\n"
        f"  offpg scale {run} --actors N{at}\n"
        f"  offpg logs {run}{at} --follow\n"
        f"  offpg stop {run}{at}",
        flush=True,
    )
    if not wait:
        return 0
    return follow(jobs, job_id)


def follow(jobs: Any, job_id: str) -> int:
    """Stream the job's logs until it ends; 0 when it succeeded."""

    async def tail() -> None:
        async for lines in jobs.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(tail())
    status = wait_done(jobs, job_id, timeout=60.0)
    print(f"offpg: job {job_id} {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


def wait_done(jobs: Any, job_id: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = str(jobs.get_job_status(job_id).value)
        if status in TERMINAL or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


def find_job(jobs: Any, run: str) -> Any | None:
    """The newest job that trains `run`, or None."""
    found = [j for j in jobs.list_jobs() if (j.metadata or {}).get(RUN_KEY) == run]
    return max(found, key=lambda j: j.start_time or 0) if found else None


def logs(run: str, *, address: str | None, follow_logs: bool) -> int:
    jobs = client(address)
    job = find_job(jobs, run)
    if job is None:
        print(f"offpg: no job for run {run!r} on this cluster", file=sys.stderr)
        return 1
    if follow_logs:
        return follow(jobs, job.submission_id)
    sys.stdout.write(jobs.get_job_logs(job.submission_id))
    return 0


def relay(run: str, argv: list[str], *, address: str) -> int:
    """Run `offpg <argv>` on the cluster as a short job and print what it printed.

    From a machine that only reaches the dashboard (`http://HEAD:8265`) the controller cannot be
    called directly; the relay job runs next to it, in the run's own runtime environment (the
    same uploaded code, nothing uploaded again), and joins the cluster from inside.
    """
    jobs = client(address)
    job = find_job(jobs, run)
    if job is None or str(job.status.value) in TERMINAL:
        print(f"offpg: no running job for run {run!r} on this cluster", file=sys.stderr)
        return 1
    job_id = jobs.submit_job(
        entrypoint=shlex.join(["python", "-m", "deploy.cli", *argv]),
        submission_id=f"offpg-relay-{run}-{uuid.uuid4().hex[:6]}",
        runtime_env=job.runtime_env,
        metadata={RELAY_KEY: run},
    )
    status = wait_done(jobs, job_id, timeout=RELAY_TIMEOUT_S)
    relayed = jobs.get_job_logs(job_id)
    if "--json" in argv:
        # The job's log mixes the command's stdout with whatever Ray logged: the JSON document
        # alone goes to stdout (`offpg status RUN --json | jq` works), the rest to stderr.
        document = [line for line in relayed.splitlines() if _is_json_object(line)][-1:]
        rest = [line for line in relayed.splitlines() if line not in document]
        sys.stderr.write("".join(f"{line}\n" for line in rest))
        relayed = "".join(f"{line}\n" for line in document)
    sys.stdout.write(relayed)
    sys.stdout.flush()
    if status not in TERMINAL:
        jobs.stop_job(job_id)
        print(
            f"offpg: the relayed command did not finish in {RELAY_TIMEOUT_S:g} s", file=sys.stderr
        )
    return 0 if status == "SUCCEEDED" else 1


def _is_json_object(line: str) -> bool:
    if not line.startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False
