"""Stopping the learner: the final checkpoint is never written while a step may still be
running (a learner that does not answer `stop` at all is in `test_faults.py`)."""

from __future__ import annotations

import logging
import threading

from deploy.workers.learner import final_checkpoint
from learner.learner import Learner, LearnerConfig
from learner.policy import PolicySpec

SPEC = PolicySpec((4,), "float32", "discrete", 2)


def test_final_checkpoint_waits_for_the_stepping_thread(tmp_path, caplog):
    learner = Learner(SPEC, LearnerConfig(), checkpoint_dir=str(tmp_path))
    step_done = threading.Event()  # a step that outlasts stop's timeout
    stepping = threading.Thread(target=step_done.wait, name="offpg-learner", daemon=True)
    stepping.start()

    with caplog.at_level(logging.ERROR):
        assert final_checkpoint(learner, stepping, timeout=0.1) is None
    assert learner.checkpoints() == []
    assert "did not stop within" in caplog.text

    step_done.set()
    path = final_checkpoint(learner, stepping, timeout=5.0)
    assert path is not None and learner.checkpoints() == [path]


def test_a_learner_never_started_still_writes_its_final_checkpoint(tmp_path):
    learner = Learner(SPEC, LearnerConfig(), checkpoint_dir=str(tmp_path))
    never_started = threading.Thread(target=lambda: None, name="offpg-learner")
    path = final_checkpoint(learner, never_started, timeout=0.1)
    assert path is not None and learner.checkpoints() == [path]
