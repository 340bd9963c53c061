"""Start-up: the processes that need no torch do not import it, and a run's summary.json holds
the moments it went through (`deploy.timeline`), in order."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import ray

from deploy import topology
from deploy.config import load_config
from deploy.job import train
from deploy.timeline import MOMENTS, ORDER
from replay.service import ReplayConfig

ROOT = Path(__file__).resolve().parent.parent

#: Packages only the learner and the rollout actors need.
HEAVY = ("torch", "gymnasium")


def heavy_modules(handle) -> list[str]:
    """The torch and Gymnasium modules loaded in the process of the actor `handle`."""

    # Defined in here so that Ray ships the function itself, not a reference to this module
    # (importing this test module in the actor would load torch).
    def loaded(_actor) -> list[str]:
        return sorted(m for m in sys.modules if m.split(".")[0] in HEAVY_NAMES)

    HEAVY_NAMES = HEAVY
    return ray.get(handle.__ray_call__.remote(loaded), timeout=120)


def test_replay_store_and_controller_processes_import_no_torch(local_ray, tmp_path):
    replay = topology.start_replay(ReplayConfig(capacity_fragments=4))
    store = topology.start_store()
    controller = topology.start_controller("lean", 1)
    learner_like = topology.start_store()
    for name, handle in [("replay", replay), ("store", store), ("controller", controller)]:
        assert heavy_modules(handle) == [], f"the {name} process imported torch or Gymnasium"
    # The check can fail: a process that did import torch shows it.
    ray.get(learner_like.__ray_call__.remote(lambda _actor: __import__("torch").zeros(1)))
    assert "torch" in heavy_modules(learner_like)
    for handle in (replay, store, controller, learner_like):
        ray.kill(handle)


def test_the_driver_its_tensorboard_writer_and_a_bad_config_import_no_torch(tmp_path):
    """Importing the driver's modules, checking a config and writing a run's TensorBoard events
    (a point, the config's text, hparams and layout, a histogram) import no torch: the learner
    and the actors build the network, in their own processes, and the driver's writer is the
    `tensorboard` package's protobufs alone (not even its TensorFlow stub, which imports fsspec
    and boto3). So a bad config is refused at once: `offpg train --set lr=-1` answers without
    torch's import."""
    code = (
        "import sys\n"
        "STUB = 'tensorboard.compat.tensorflow_stub'\n"
        "import numpy as np\n"
        "import deploy.cli, deploy.job, deploy.tune\n"
        "from deploy.config import load_config\n"
        "from deploy.metrics import MetricsWriter\n"
        "config = load_config(None, ['learner.lr=3e-4'])\n"
        f"writer = MetricsWriter({str(tmp_path)!r}, purge_step=10)\n"
        "writer.write_config(config)\n"
        "writer.scalars(10, {'episode/return_mean': 1.0})\n"
        "writer.histograms(10, {'actors/env_steps_per_s': np.arange(4.0)})\n"
        "writer.close()\n"
        "print(sorted(m for m in ('torch', 'ray.tune', STUB) if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert done.stdout.strip() == "[]", done.stdout
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1, "the run's event file"
    bad = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "deploy.cli", "train", "--set", "learner.lr=-1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and "learner.lr: must be > 0" in bad.stderr, bad.stderr[-2000:]
    assert not re.search(r"\|\s+torch$", bad.stderr, re.MULTILINE), "torch was imported"


def test_summary_json_holds_the_runs_moments_in_order(local_ray, tmp_path):
    config = load_config(
        None,
        [
            "run.max_env_steps=5000",
            "run.target_return=none",
            "actors.num_envs=16",
            "actors.unroll_length=16",
        ],
        extra={"run.logdir": str(tmp_path), "run.name": "moments"},
    )
    summary = train(config)
    assert summary.ok and summary.stop_reason == "env-step budget reached", summary.line()
    saved = json.loads((tmp_path / "moments" / "summary.json").read_text())["timeline"]
    assert saved == summary.timeline
    # A budget run passes every moment (the budget ends it only after fragments arrived; the
    # learner may or may not have stepped by then).
    missing = set(MOMENTS) - set(saved) - {"first_learner_step"}
    assert missing == set(), f"moments not reached: {missing}"
    assert list(saved) == [m for m in MOMENTS if m in saved], "kept in MOMENTS order"
    for earlier, later in ORDER:
        if earlier in saved and later in saved:
            assert saved[earlier] <= saved[later], (earlier, later, saved)
    assert saved["first_fragment"] <= saved["stop_seen"]
    assert saved["train_called"] > 0 and saved["exit"] < 3600
