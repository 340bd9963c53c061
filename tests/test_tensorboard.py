"""`offpg tensorboard`: a real TensorBoard process serves a run's tags, its dashboard layout and
its hparams over its HTTP API."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from deploy import metrics as tags
from deploy.cli import _is_loopback
from deploy.config import load_config

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get(url: str, body: dict | None = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def write_run(run_dir: Path) -> None:
    config = load_config(None, [], extra={"run.name": run_dir.name})
    writer = tags.MetricsWriter(str(run_dir))
    writer.write_config(config)
    for step in range(0, 1000, 100):
        writer.scalars(step, {tags.EPISODE_RETURN: step / 10, tags.ENV_STEPS_PER_S: 5000.0})
    writer.close()


def test_offpg_tensorboard_serves_the_runs_tags_layout_and_hparams(tmp_path):
    write_run(tmp_path / "run-a")
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    board = subprocess.Popen(
        [sys.executable, "-m", "deploy.cli", "tensorboard", str(tmp_path), "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}/data/plugin"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                served = get(f"{base}/scalars/tags")
                if "run-a" in served:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert board.poll() is None, board.stdout.read()
            assert time.monotonic() < deadline, "TensorBoard did not serve the run"
            time.sleep(0.5)
        assert {tags.EPISODE_RETURN, tags.ENV_STEPS_PER_S} <= set(served["run-a"])
        layout = get(f"{base}/custom_scalars/layout")
        first = layout["category"][0]
        assert first["chart"][0]["multiline"]["tag"] == [f"^{tags.EPISODE_RETURN}$"]
        experiment = get(f"{base}/hparams/experiment", {"experimentName": ""})
        names = {info["name"] for info in experiment["hparamInfos"]}
        assert {"learner.reward_clip", "learner.policy_clip", "run.target_return"} <= names
        (metric,) = [
            m for m in experiment["metricInfos"] if m["name"]["tag"] == "episode/return_mean"
        ]
        assert metric["displayName"] == "mean return (target 475)"
    finally:
        board.terminate()
        board.wait(timeout=30)


def test_listening_beyond_loopback_is_told_apart():
    assert _is_loopback("127.0.0.1") and _is_loopback("localhost") and _is_loopback("::1")
    assert not _is_loopback("0.0.0.0") and not _is_loopback("10.1.2.3")


def test_the_dashboard_charts_only_tags_a_run_writes():
    """Every series of the layout is a tag each run writes (the GPU ones: each run on CUDA)."""
    gpu = {tags.GPU_UTILIZATION, tags.GPU_MEMORY}
    for category in tags.LAYOUT.values():
        for kind, series in category.values():
            names = [s.strip("^$") for s in series]
            assert kind in ("Multiline", "Margin")
            assert set(names) <= set(tags.REQUIRED_TAGS) | gpu, names


def test_device_stats_are_empty_on_cpu_and_read_the_gpu_on_cuda():
    assert tags.DeviceStats(torch.device("cpu")).read() == {}
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the GPU half needs one")
    device = torch.device("cuda")
    held = torch.empty(64 * 2**20, dtype=torch.uint8, device=device)
    stats = tags.DeviceStats(device, every_s=60.0)
    first = stats.read()
    assert first[tags.GPU_MEMORY] >= 64 and first[tags.GPU_MEMORY_PEAK] >= first[tags.GPU_MEMORY]
    del held
    assert stats.read() is first, "read again within every_s: the last reading"
