"""`offpg tensorboard`: a real TensorBoard process serves a run's tags, its dashboard layout and
its hparams over its HTTP API."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2
from torch.utils.tensorboard import SummaryWriter

from deploy import eventfile, events
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


def read_events(run_dir: Path) -> EventAccumulator:
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    return events


def test_the_writer_writes_what_torchs_summary_writer_writes(tmp_path):
    """The driver's writer (the `tensorboard` package alone) against torch's `SummaryWriter`
    as the reference: the same histogram buckets, text, layout and scalars read back."""
    rng = np.random.default_rng(0)
    spread = np.concatenate([rng.normal(0, 3, 500), np.zeros(7), rng.lognormal(0, 4, 100)])
    arrays = {"h/spread": spread, "h/one": np.array([5.0]), "h/zeros": np.zeros(4)}
    ours = tags.MetricsWriter(str(tmp_path / "ours"))
    ours.histograms(7, {**arrays, "h/none": np.array([np.nan])})
    ours.scalars(7, {"s/a": 1.5, "s/nan": math.nan, "s/none": None})
    ours.close()
    reference = SummaryWriter(str(tmp_path / "torch"))
    for tag, values in arrays.items():
        reference.add_histogram(tag, values, 7)
    reference.add_scalar("s/a", 1.5, 7)
    reference.close()
    mine, theirs = read_events(tmp_path / "ours"), read_events(tmp_path / "torch")
    assert sorted(mine.Tags()["histograms"]) == sorted(arrays), "no finite value: no histogram"
    assert mine.Tags()["scalars"] == ["s/a"], "None and non-finite values are left out"
    assert [(e.step, e.value) for e in mine.Scalars("s/a")] == [(7, 1.5)]
    for tag in arrays:
        (got,), (want,) = mine.Histograms(tag), theirs.Histograms(tag)
        assert got.step == want.step == 7
        assert got.histogram_value == want.histogram_value, tag


def test_record_checksums_are_crc32c_as_tensorboards_own():
    """The NumPy CRC-32C against TensorBoard's byte-at-a-time one (and the standard check
    value), over lengths around the 32 bits the start flips and the table's doublings."""
    assert eventfile.crc32c(b"123456789") == 0xE3069283
    rng = np.random.default_rng(0)
    for size in [*range(4, 80), 127, 128, 129, 1250, 10_540, 70_001]:
        data = rng.bytes(size)
        assert eventfile.masked_crc32c(data) == masked_crc32c(data), size
    assert eventfile.masked_crc32c(bytes(64)) == masked_crc32c(bytes(64)), "all zeros"
    with pytest.raises(ValueError, match="4 bytes or more"):
        eventfile.crc32c(b"abc")


def test_the_hparams_names_are_the_plugins():
    assert (events.HPARAMS_PLUGIN, events.HPARAMS_VERSION) == (
        metadata.PLUGIN_NAME,
        metadata.PLUGIN_DATA_VERSION,
    )
    assert (
        events.EXPERIMENT_TAG,
        events.SESSION_START_INFO_TAG,
        events.SESSION_END_INFO_TAG,
    ) == (metadata.EXPERIMENT_TAG, metadata.SESSION_START_INFO_TAG, metadata.SESSION_END_INFO_TAG)


def test_the_config_reads_back_as_text_hparams_and_layout(tmp_path):
    config = load_config(None, ["learner.reward_clip=none"], extra={"run.name": "cfg"})
    writer = tags.MetricsWriter(str(tmp_path))
    writer.write_config(config)
    writer.close(ok=False)
    events = read_events(tmp_path)
    (text,) = events.Tensors("config/text_summary")
    assert text.tensor_proto.string_val[0].decode() == f"```toml\n{config.to_toml()}\n```"
    assert events.SummaryMetadata("config/text_summary").plugin_data.plugin_name == "text"
    (layout,) = events.Tensors("custom_scalars__config__")
    categories = layout_pb2.Layout.FromString(layout.tensor_proto.string_val[0]).category
    assert [c.title for c in categories] == list(tags.LAYOUT)
    band = categories[1].chart[0].margin.series[0]
    assert (band.value, band.lower, band.upper) == (
        tags.ACTING_LAG_MEAN,
        tags.ACTING_LAG_MEAN,
        tags.ACTING_LAG_MAX,
    )

    def plugin_data(tag: str) -> plugin_data_pb2.HParamsPluginData:
        content = events.SummaryMetadata(tag).plugin_data.content
        return plugin_data_pb2.HParamsPluginData.FromString(content)

    start = plugin_data("_hparams_/session_start_info").session_start_info.hparams
    expected = tags.hparams(config)
    assert set(start) == set(expected) and start["learner.reward_clip"].string_value == "none"
    for key, value in expected.items():
        assert getattr(start[key], start[key].WhichOneof("kind")) == value, key
    experiment = plugin_data("_hparams_/experiment").experiment
    assert [i.name for i in experiment.hparam_infos] == list(expected)
    names = {m.name.tag: m.display_name for m in experiment.metric_infos}
    assert names == {
        tags.EPISODE_RETURN: "mean return (target 475)",
        tags.SOLVED_AT: "env steps to the target",
    }
    end = plugin_data("_hparams_/session_end_info").session_end_info
    assert end.status == api_pb2.STATUS_FAILURE


def test_a_resumed_writer_hides_what_was_logged_at_or_after_its_step(tmp_path):
    first = tags.MetricsWriter(str(tmp_path))
    for step in range(0, 1000, 100):
        first.scalars(step, {tags.EPISODE_RETURN: 1.0})
    first.close()
    resumed = tags.MetricsWriter(str(tmp_path), purge_step=500)
    for step in (500, 600):
        resumed.scalars(step, {tags.EPISODE_RETURN: 2.0})
    resumed.close()
    points = [(e.step, e.value) for e in read_events(tmp_path).Scalars(tags.EPISODE_RETURN)]
    assert points == [(step, 1.0 if step < 500 else 2.0) for step in range(0, 700, 100)]


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
