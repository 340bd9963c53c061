"""The driver SIGKILLed mid-run: `offpg train --name RUN --resume` continues from the learner's
checkpoint and the replay snapshot and still solves CartPole; the killed driver's embedded Ray
is gone afterwards (whatever Ray's fate-sharing leaves behind is found and stopped here)."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from deploy import metrics as tags
from learner import checkpoint

ROOT = Path(__file__).resolve().parent.parent


def _children() -> dict[int, list[int]]:
    """ppid -> pids of every process on the machine (from /proc)."""
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                # The command name may hold spaces and parentheses: split after the last ')'.
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is dead
    except OSError:
        return False


#: What Ray 2.60 names the processes of an embedded Ray that outlive a SIGKILLed driver.
SURVIVORS = ("DashboardAgent", "dashboard/agent.py", "RuntimeEnvAgent", "runtime_env/agent")


def _outlives_its_driver(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return any(name in command for name in SURVIVORS)


def _train_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "deploy.cli",
        "train",
        "--name",
        "killed",
        "--logdir",
        str(tmp_path),
        "--max-env-steps",
        "3000000",
        "--set",
        "learner.checkpoint_every=2.0",
        "--set",
        "replay.snapshot_every=2.0",
        "--set",
        "run.log_every=1.0",
        *extra,
    ]


@pytest.mark.slow
def test_sigkilled_driver_resumes_from_checkpoint_and_snapshot(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    run_dir = tmp_path / "killed"
    first = subprocess.Popen(
        _train_args(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=tmp_path,
    )
    leftovers: set[int] = set()
    try:
        # Kill once a checkpoint past the first steps and a replay snapshot are on disk.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and first.poll() is None:
            ckpts = checkpoint.list_checkpoints(str(run_dir / "checkpoints"))
            version = int(re.findall(r"\d+", Path(ckpts[-1]).name)[0]) if ckpts else 0
            if version >= 30 and (run_dir / "replay.snapshot").exists():
                break
            time.sleep(0.5)
        assert first.poll() is None, "the first run ended before it could be killed"
        assert version >= 30, "no checkpoint was written in time"
        ray_processes = _descendants(first.pid)
        assert ray_processes, "the driver started no Ray processes"
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        # Most of Ray's processes share the driver's fate (raylet and GCS watch their parent) and
        # are gone within ~5 s; Ray 2.60's DashboardAgent and RuntimeEnvAgent outlive a SIGKILLed
        # driver. Once the others are gone (or after 10 s), stop whatever is left, so nothing
        # leaks into the rest of the suite.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
            _alive(p) and not _outlives_its_driver(p) for p in ray_processes
        ):
            time.sleep(0.2)
        leftovers = {p for p in ray_processes if _alive(p)}
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
        for pid in leftovers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    # SIGKILL is delivered asynchronously: give the kernel a moment to reap them.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in leftovers):
        time.sleep(0.2)
    assert not any(_alive(p) for p in leftovers)

    newest = dict(checkpoint.readable_checkpoints(str(run_dir / "checkpoints")))
    killed_at_steps = max(int(s["counters"].get("env_steps", 0)) for s in newest.values())
    killed_at_version = max(int(s["version"]) for s in newest.values())

    resumed = subprocess.run(
        _train_args(tmp_path, "--resume"),
        capture_output=True,
        text=True,
        timeout=420,
        env=env,
        cwd=tmp_path,
    )
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    restored = re.search(r"replay service restored (\d+) fragments", out)
    assert restored and int(restored.group(1)) > 0, out[-3000:]
    assert "target return 475 reached" in out, out[-3000:]
    final = max(
        (
            torch.load(p, weights_only=True)
            for p in checkpoint.list_checkpoints(str(run_dir / "checkpoints"))
        ),
        key=lambda s: s["version"],
    )
    assert final["version"] > killed_at_version
    assert final["counters"]["env_steps"] > killed_at_steps

    # The curves go on from the checkpoint's env steps: what the killed driver logged after it
    # is purged, so no step is duplicated or goes backwards.
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    steps = [e.step for e in events.Scalars(tags.ENV_STEPS_PER_S)]
    assert steps == sorted(set(steps))
    assert steps[-1] > killed_at_steps
