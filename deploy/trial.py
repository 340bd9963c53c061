"""One `offpg tune` trial: a full `deploy.job.train` run inside a Ray Tune trial.

The trial reports to Tune at every driver poll (`Reporter`, train's `on_poll`). With PBT, its
reports at each perturbation point carry a checkpoint of its learner (weights, optimiser state,
version, env-step counter), written by the learner thread between two steps. When PBT exploits,
Tune stops the trial (gracefully: `trainable`) and restarts it with a top trial's checkpoint and
perturbed values; `run_trial` then installs that checkpoint as its run's only one and resumes
the run (`run.resume`): the learner continues from the other trial's version and env steps,
the actors start on its weights, and the trial's own replay contents come back from its
snapshot (kept, not emptied: importance weights correct for the older behaviour policy). The
reported mean return is then the other trial's last 100 episodes, followed by its own.

A trial that fails (a worker lost, a timeout) is restarted by Tune (`FailureConfig`) and resumes
from its run directory's newest checkpoint, as does a trial PBT paused for lack of resources.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deploy.metrics import EPISODE_RETURN
from deploy.search import trial_config

#: The metric every trial reports and PBT ranks by.
METRIC = EPISODE_RETURN
#: Seconds a stopped trial gets to stop its run gracefully before Tune moves on.
TRIAL_STOP_S = 120.0


@dataclasses.dataclass(frozen=True)
class TrialSetup:
    """What every trial gets besides its values (pickled into Tune's trainable)."""

    base: dict[str, Any]  # flat_config of the base config
    logdir: str  # absolute <logdir>/<tune-name>
    perturbation_interval: int | None  # env steps; None: no checkpoints (a plain sweep)


#: File names inside a Tune checkpoint directory.
LEARNER_FILE, META_FILE = "learner.pt", "meta.json"
#: Episodes the reported mean return is taken over (CartPole-v1's "solved" definition).
WINDOW = 100


class TrialState:
    """What a trial remembers across its restarts, in `<run dir>/tune_state.json`.

    `perturbed_at`: env steps of its last report with a checkpoint. PBT perturbs a trial at a
    report `perturbation_interval` env steps after its previous perturbation, and keeps that
    count across the trial's restarts; the trial keeps the same count here, so its reports at
    those points carry the checkpoint PBT clones. `returns`: its last `WINDOW` episode returns
    (a restarted run starts counting afresh; the reported mean does not). `applied`: the other
    trial's checkpoint it continued from last (Tune offers it again at every restart until the
    trial has reported one of its own). `exploits`: the checkpoints it continued from.
    """

    def __init__(self, path: Path):
        self.path = path
        saved = json.loads(path.read_text()) if path.exists() else {}
        self.perturbed_at: int = saved.get("perturbed_at", 0)
        self.returns: collections.deque[float] = collections.deque(
            saved.get("returns", []), maxlen=WINDOW
        )
        self.applied: str | None = saved.get("applied")
        self.exploits: list[dict[str, Any]] = saved.get("exploits", [])

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        state = {"perturbed_at": self.perturbed_at, "returns": list(self.returns)}
        state.update(applied=self.applied, exploits=self.exploits)
        self.path.write_text(json.dumps(state))


def _job_progress(job: Any) -> tuple[list[float], int, int, int]:
    """(returns of the last 100 episodes, episodes, env steps, learner version) of the running
    `deploy.job.Job` handed to `on_poll`; the one place that reads its counters."""
    episodes = job.fleet.episodes
    return list(episodes.returns), int(episodes.count), int(job.env_steps), int(job.version)


def _job_learner(job: Any) -> Any:
    """The job's learner actor (`deploy.topology.LearnerWorker`)."""
    return job.topology.learner


def _job_services(job: Any) -> list[Any]:
    """The job's actors that outlive `train` (it leaves them to its Ray's shutdown)."""
    topology = job.topology
    return [] if topology is None else [topology.learner, *topology.shards, topology.store]


class Reporter:
    """The trial's `on_poll`: one Tune report per driver poll, with a learner checkpoint at
    each perturbation point (see `TrialState`)."""

    def __init__(self, name: str, setup: TrialSetup, state: TrialState):
        self.name = name
        self.interval = setup.perturbation_interval
        self.state = state
        self.job: Any = None  # the running job, once it has polled
        self._episodes = 0  # of this job's episodes, those already in state.returns

    def __call__(self, job: Any) -> bool:
        from ray import tune

        self.job = job
        returns, episodes, steps, version = _job_progress(job)
        new = min(episodes - self._episodes, len(returns))
        self.state.returns.extend(returns[len(returns) - new :])
        self._episodes = episodes
        if not self.state.returns:  # PBT ranks by the metric: no report before an episode
            return False
        metrics = self.result(steps, version)
        with tempfile.TemporaryDirectory(prefix="offpg-tune-") as directory:
            checkpoint = None
            if self.interval and steps - self.state.perturbed_at >= self.interval:
                self.state.perturbed_at = steps
                if self._write_checkpoint(job, steps, Path(directory), metrics):
                    checkpoint = tune.Checkpoint.from_directory(directory)
            self.state.save()
            # Blocks until Tune has taken the result; raises SystemExit(0) when Tune stops or
            # pauses the trial, which ends `train` through its cleanup (see `trainable`).
            tune.report(metrics, checkpoint=checkpoint)
        return False

    def result(self, steps: int, version: int) -> dict[str, Any]:
        restored = self.state.exploits[-1] if self.state.exploits else {}
        returns = self.state.returns
        return {
            METRIC: sum(returns) / len(returns) if returns else math.nan,
            "env_steps": steps,
            "learner_version": version,
            "episodes_in_mean": len(self.state.returns),
            "exploits": len(self.state.exploits),
            "restored_from": restored.get("trial", ""),
            "restored_version": restored.get("version", -1),
        }

    def final(self, summary: Any) -> dict[str, Any]:
        """The last report, from the run's `RunSummary`; `done` ends the trial."""
        return {
            **self.result(summary.env_steps, summary.learner_version),
            "solved_at_env_steps": summary.solved_at_env_steps or -1,
            "stop_reason": summary.stop_reason,
            "ok": summary.ok,
            "done": True,
        }

    def _write_checkpoint(self, job: Any, steps: int, directory: Path, metrics: dict) -> bool:
        import ray

        from deploy.topology import CALL_TIMEOUT

        answer = ray.get(
            _job_learner(job).checkpoint.remote({"env_steps": steps}), timeout=CALL_TIMEOUT
        )
        if answer is None:
            print(f"offpg tune: {self.name}: learner took no step; no checkpoint", flush=True)
            return False
        shutil.copyfile(answer["path"], directory / LEARNER_FILE)
        meta = {"trial": self.name, "version": answer["version"], "env_steps": steps}
        meta["returns"] = list(self.state.returns)
        (directory / META_FILE).write_text(json.dumps(meta))
        metrics["checkpoint_version"] = answer["version"]
        return True


def _continue_from(offered: Any, name: str, run_dir: Path, state: TrialState) -> dict | None:
    """Install another trial's checkpoint that Tune offers (a PBT exploit) as this run's only
    learner checkpoint; returns its metadata, or None when there is nothing new to install."""
    from learner.checkpoint import checkpoint_path, list_checkpoints

    if offered is None:
        return None
    with offered.as_directory() as directory:
        meta = json.loads((Path(directory) / META_FILE).read_text())
        ident = f"{meta['trial']}@{meta['version']}"
        if meta["trial"] == name or ident == state.applied:
            return None  # its own, or already installed: the run directory is newer
        checkpoints = run_dir / "checkpoints"
        for old in list_checkpoints(str(checkpoints)):
            os.unlink(old)
        checkpoints.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(
            Path(directory) / LEARNER_FILE, checkpoint_path(str(checkpoints), meta["version"])
        )
    state.returns = collections.deque(meta.pop("returns"), maxlen=WINDOW)
    # PBT moves the trial's perturbation clock to the other's (its last perturbation, where
    # that checkpoint was written): the next checkpoint is due one interval after it.
    state.perturbed_at = meta["env_steps"]
    state.applied = ident
    state.exploits.append(meta)
    state.save()
    return meta


def run_trial(values: dict[str, Any], setup: TrialSetup) -> None:
    """One trial: a full `train` run; restarted by Tune after a PBT exploit (see module doc)."""
    from ray import tune

    from deploy.job import train
    from learner.checkpoint import list_checkpoints

    name = tune.get_context().get_trial_name()
    run_dir = Path(setup.logdir) / name
    state = TrialState(run_dir / "tune_state.json")
    restored = _continue_from(tune.get_checkpoint(), name, run_dir, state)
    resume = bool(list_checkpoints(str(run_dir / "checkpoints")))
    if not resume and run_dir.exists():  # an attempt that failed before its first checkpoint
        shutil.rmtree(run_dir)
        state = TrialState(run_dir / "tune_state.json")
    config = trial_config(setup.base, values, name=name, logdir=setup.logdir, resume=resume)
    reporter = Reporter(name, setup, state)
    if restored:
        print(f"offpg tune: {name} continues from {restored['trial']} v{restored['version']}")
    try:
        # The run's console output goes to the trial's log: Tune's table is the live view.
        with _output_to(Path(setup.logdir) / f"{name}.log"):
            summary = train(config, on_poll=reporter)
    finally:
        _end_services(reporter.job)
    tune.report(reporter.final(summary))


@contextlib.contextmanager
def _output_to(path: Path) -> Iterator[None]:
    """This process's stdout and stderr (file descriptors 1 and 2, which Ray forwards to the
    driver's console) into `path`; a trial has its process to itself."""
    saved = []
    with open(path, "a") as log:
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
            saved.append(os.dup(stream.fileno()))
            os.dup2(log.fileno(), stream.fileno())
        try:
            yield
        finally:
            for stream, fd in zip((sys.stdout, sys.stderr), saved, strict=True):
                stream.flush()
                os.dup2(fd, stream.fileno())
                os.close(fd)


def _end_services(job: Any) -> None:
    """End the learner, replay shards and weight store of a finished run: Tune reuses the
    trial's resources at once, and a terminated process would print a traceback."""
    import ray

    for handle in _job_services(job) if job is not None else []:
        ray.kill(handle, no_restart=True)


def trainable(setup: TrialSetup) -> type:
    """`run_trial` as a Tune function trainable whose stop waits for the run to end.

    Tune stops or pauses a trial (a PBT exploit) by making its pending `tune.report` raise
    SystemExit(0) and then ending the trial's process. The stock trainable does not wait in
    between, so the run's actors would die mid-fragment and its last TensorBoard points, final
    checkpoint and replay snapshot would be lost; this one waits up to `TRIAL_STOP_S` for
    `train`'s cleanup (it uses Tune's developer API: `wrap_function`, the trial session).
    """
    from ray.train._internal.session import get_session
    from ray.tune.trainable.function_trainable import wrap_function

    def offpg(config: dict) -> None:
        run_trial(config, setup)

    class OffpgTrial(wrap_function(offpg)):
        def cleanup(self) -> None:
            session = get_session()
            try:
                if session is not None and session.training_started:
                    session.finish(timeout=TRIAL_STOP_S)
            finally:
                super().cleanup()

    return OffpgTrial
