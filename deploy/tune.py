"""`offpg tune`: sweeps and population-based training on Ray Tune, each trial a full offpg run.

A trial is `deploy.job.train(config, on_poll=...)` with the base config plus the trial's
values. Tune runs it in a placement group of `deploy.placement.job_bundles` (the trial's driver,
its learner with the replay shards, its rollout actors), so trials sharing a cluster do not
take each other's CPUs. At every driver poll the trial reports `episode/return_mean` (the mean
return of its last 100 episodes), its env steps and learner version to Tune; it stops at
`run.target_return` or `run.max_env_steps`, like any run.

With `--pbt`, Tune's `PopulationBasedTraining` compares the trials every `perturbation_interval`
env steps of each and exploits through the learner checkpoints the trials report then; what a
trial keeps and loses in an exploit is in `deploy.trial`.

Logs: each trial is an ordinary run directory, `<logdir>/<tune-name>/<tune-name>-NN` (TensorBoard
events, config, checkpoints), with its console output in `<tune-name>-NN.log` next to it; Tune's
own state (results, checkpoints it copies between trials) is in `<logdir>/<tune-name>/tune/`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from deploy.config import ConfigError, JobConfig
from deploy.search import Search, check_searches, flat_config
from deploy.trial import METRIC, TrialSetup, trainable

#: Tune checkpoints a trial keeps: all of them (one learner checkpoint per perturbation). With a
#: limit, Tune deletes checkpoints PBT still offers to other trials: each save PBT asks for
#: registers the trial's last reported checkpoint again, the copies push the originals out of
#: the limit, and a trial told to continue from one finds it gone.
KEEP_CHECKPOINTS = None
#: Times Tune restarts a failed trial (from its newest checkpoint) before giving it up.
MAX_FAILURES = 2


@dataclasses.dataclass(frozen=True)
class TuneOptions:
    """`offpg tune`'s own options (the base config carries the rest)."""

    name: str
    searches: tuple[Search, ...]
    trials: int = 1
    pbt: bool = False
    perturbation_interval: int = 50_000
    quantile: float = 0.25  # PBT: the bottom fraction that copies the top one (Tune's default)


@dataclasses.dataclass
class TrialRow:
    """One line of the final table (also in `<logdir>/<tune-name>/trials.json`)."""

    trial: str
    values: dict[str, Any]
    best_return: float
    last_return: float
    env_steps: int
    solved_at_env_steps: int | None
    exploits: int
    error: str | None = None


def tune_name(config: JobConfig, name: str | None) -> str:
    if name:
        if "/" in name or name.startswith("."):
            raise ConfigError("--name", f"must be a plain directory name, got {name!r}")
        return name
    env = config.env.id.replace("/", "-").replace(":", "-")
    return f"{env}-tune-{time.strftime('%Y%m%d-%H%M%S')}"


def _ray_cpus(config: JobConfig, per_trial: float, trials: int) -> int:
    """Logical CPUs for an embedded Ray: every trial's placement group at once."""
    if config.run.num_cpus:
        return config.run.num_cpus
    return max(math.ceil(per_trial * trials), os.cpu_count() or 1)


def run_tune(config: JobConfig, options: TuneOptions) -> list[TrialRow]:
    """Run the sweep or PBT population to the end; print and return the table of trials."""
    import ray

    from deploy.controller import TokenRefused, check_token
    from deploy.placement import job_bundles
    from deploy.topology import learner_wants_gpu

    try:
        import ray.tune
    except ImportError as exc:
        raise ConfigError(
            "offpg tune", f"needs Ray Tune: pip install -e '.[tune]' ({exc})"
        ) from None
    total = check_searches(config, options.searches, options.pbt, options.trials)
    root = (Path(config.run.logdir) / options.name).resolve()
    if root.exists():
        raise ConfigError("--name", f"{root} exists: pick a new name")
    per_trial = sum(
        b["CPU"] for b in job_bundles(config.run.actor_cpus, config.run.num_actors, False)
    )
    owns_ray = not ray.is_initialized()
    address = config.run.address or os.environ.get("RAY_ADDRESS", "")
    if owns_ray and address:
        try:
            check_token(address)  # a refused token: one line, before ray.init's retries
        except TokenRefused as exc:
            raise ConfigError("run.address", str(exc)) from None
        ray.init(address=address, log_to_driver=True)
    elif owns_ray:
        ray.init(num_cpus=_ray_cpus(config, per_trial, total), include_dashboard=False)
    try:
        bundles = job_bundles(
            config.run.actor_cpus, config.run.num_actors, learner_wants_gpu(config.learner)
        )
        fits_all = _say_capacity(bundles, total, options.pbt)
        root.mkdir(parents=True)
        (root / "base.toml").write_text(config.to_toml())
        results = _fit(config, options, root, bundles, fits_all)
    finally:
        if owns_ray:
            ray.shutdown()
    rows = [_row(result, options) for result in results]
    rows.sort(key=lambda r: -r.best_return if math.isfinite(r.best_return) else math.inf)
    (root / "trials.json").write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    print(format_table(rows, options, root))
    return rows


def _say_capacity(bundles: list[dict[str, float]], trials: int, pbt: bool) -> bool:
    """Print what the trials need and the cluster has; whether they all fit at once."""
    import ray

    have = ray.cluster_resources()
    need = {kind: sum(b.get(kind, 0.0) for b in bundles) for kind in ("CPU", "GPU")}
    print(
        f"offpg tune: {trials} trial(s), each {need['CPU']:g} CPUs (driver, learner, actors)"
        + (f" and {need['GPU']:g} GPU" if need["GPU"] else "")
        + f"; the cluster has {have.get('CPU', 0.0):g} CPUs",
        flush=True,
    )
    if any(need[kind] * trials > have.get(kind, 0.0) for kind in need if need[kind]):
        print(
            "offpg tune: not every trial fits at once: they wait for each other"
            + (" (PBT pauses and resumes them from checkpoints)" if pbt else ""),
            file=sys.stderr,
        )
        return False
    return True


def _fit(
    config: JobConfig, options: TuneOptions, root: Path, bundles: list, fits_all: bool
) -> Iterable[Any]:
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    setup = TrialSetup(
        base=flat_config(config),
        logdir=str(root),
        perturbation_interval=options.perturbation_interval if options.pbt else None,
    )
    scheduler = None
    if options.pbt:
        scheduler = _pbt(
            fits_all,
            time_attr="env_steps",
            perturbation_interval=options.perturbation_interval,
            hyperparam_mutations={s.key: s.mutation() for s in options.searches},
            quantile_fraction=options.quantile,
        )
    tuner = tune.Tuner(
        tune.with_resources(trainable(setup), tune.PlacementGroupFactory(bundles)),
        param_space={s.key: s.domain() for s in options.searches},
        tune_config=tune.TuneConfig(
            metric=METRIC,
            mode="max",
            num_samples=options.trials,
            scheduler=scheduler,
            reuse_actors=False,
            trial_name_creator=lambda t: _trial_name(options.name, t.trial_id),
            trial_dirname_creator=lambda t: _trial_name(options.name, t.trial_id),
        ),
        run_config=tune.RunConfig(
            name="tune",
            storage_path=str(root),
            # Tune's own TensorBoard files would sit next to the runs' (JSON and CSV stay).
            callbacks=[JsonLoggerCallback(), CSVLoggerCallback()],
            checkpoint_config=tune.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
            failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
            verbose=1,
        ),
    )
    with _env("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1"):
        return tuner.fit()


def _pbt(fits_all: bool, **kwargs: Any) -> Any:
    """Tune's asynchronous `PopulationBasedTraining`, with three changes.

    Every trial outside the bottom quantile keeps the checkpoint of its last perturbation as the
    one others may copy. Stock PBT keeps it only for a trial that was in the top quantile at
    that moment; a trial that rose to the top later (or was first to report, alone) then "has no
    checkpoint" and an exploit of it is skipped. Here every perturbation report carries a
    checkpoint anyway (`deploy.trial.Reporter`), so keeping it costs nothing.

    A finished trial (at its budget or target) still ranks and can be copied: stock PBT drops
    it from the ranking, so a trial that started late finds no one to copy, and the trial that
    reached the target first, the best donor, is never copied.

    Stock PBT also pauses a trial at its perturbation whenever another one is paused or pending,
    to make room for it; a paused offpg trial stops its run and starts it again. When every
    trial fits on the cluster at once (`fits_all`) that only costs time, so the trial goes on.

    (Tune's synchronous mode is not offered: with env steps as its clock, trials that overshoot
    a perturbation point unevenly can all end up waiting for each other.)
    """
    from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

    class OffpgPBT(PopulationBasedTraining):
        def _quantiles(self):
            scored = [
                trial
                for trial, state in self._trial_state.items()
                if state.last_score is not None and not math.isnan(state.last_score)
            ]
            if len(scored) <= 1:
                return [], []
            scored.sort(key=lambda t: self._trial_state[t].last_score)
            size = min(math.ceil(len(scored) * self._quantile_fraction), len(scored) // 2)
            return scored[:size], scored[len(scored) - size :]

        def _checkpoint_or_exploit(self, trial, tune_controller, upper_quantile, lower_quantile):
            keeps = upper_quantile if trial in lower_quantile else [*upper_quantile, trial]
            super()._checkpoint_or_exploit(trial, tune_controller, keeps, lower_quantile)

        def on_trial_result(self, tune_controller, trial, result):
            decision = super().on_trial_result(tune_controller, trial, result)
            if decision == TrialScheduler.PAUSE and fits_all:
                return TrialScheduler.CONTINUE
            return decision

    return OffpgPBT(**kwargs)


@contextlib.contextmanager
def _env(key: str, value: str):
    old = os.environ.get(key)
    os.environ[key] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _trial_name(name: str, trial_id: str) -> str:
    """`<tune-name>-NN`: Tune's trial ids end in the trial's index (`..._00003`)."""
    return f"{name}-{int(trial_id.rsplit('_', 1)[-1]):02d}"


def _row(result: Any, options: TuneOptions) -> TrialRow:
    """A trial's line: best and last reported mean return; solved as `offpg train` judges it
    (100 episodes at the target); the number of other trials' checkpoints it continued from."""
    history = result.metrics_dataframe
    metrics = result.metrics or {}
    values = {s.key: _trial_values(result).get(s.key) for s in options.searches}
    error = _error_line(result.error) if result.error else None
    if error is None and not metrics.get("ok", True):  # the run failed (its learner did)
        error = str(metrics.get("stop_reason"))
    if history is None or METRIC not in history:
        return TrialRow(Path(result.path).name, values, math.nan, math.nan, 0, None, 0, error)
    returns = history[METRIC].astype(float)
    solved = int(metrics.get("solved_at_env_steps", -1))
    return TrialRow(
        trial=Path(result.path).name,
        values=values,
        best_return=float(returns.max()),
        last_return=float(returns.iloc[-1]),
        env_steps=int(history["env_steps"].iloc[-1]),
        solved_at_env_steps=solved if solved >= 0 else None,
        exploits=int(metrics.get("exploits", 0)),
        error=error,
    )


def _trial_values(result: Any) -> dict[str, Any]:
    """The trial's values: from its last result, else (no result yet) the params.json Tune
    wrote when it started the trial."""
    if result.config:
        return result.config
    params = Path(result.path) / "params.json"
    return json.loads(params.read_text()) if params.exists() else {}


def _error_line(error: BaseException) -> str:
    """The last line of a trial's error (the exception), without terminal colours."""
    lines = [line for line in re.sub(r"\x1b\[[0-9;]*m", "", str(error)).splitlines() if line]
    return lines[-1].strip() if lines else type(error).__name__


def format_table(rows: Sequence[TrialRow], options: TuneOptions, root: Path) -> str:
    keys = [s.key for s in options.searches]
    head = ["trial", *keys, "best return", "last", "env steps", "solved at"]
    head += ["exploits"] if options.pbt else []
    lines = []
    for r in rows:
        cells = [r.trial, *(_fmt(r.values.get(k)) for k in keys)]
        cells += [f"{r.best_return:.1f}", f"{r.last_return:.1f}", f"{r.env_steps:,}"]
        cells += [f"{r.solved_at_env_steps:,}" if r.solved_at_env_steps else "-"]
        cells += [str(r.exploits)] if options.pbt else []
        lines.append(cells + ([f"error: {r.error}"] if r.error else []))
    widths = [
        max(len(str(c)) for c in col)
        for col in zip(head, *(line[: len(head)] for line in lines), strict=False)
    ]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    out += [
        "  ".join(str(c).ljust(w) for c, w in zip(line, [*widths, 0], strict=False))
        for line in lines
    ]
    out.append(f"TensorBoard: offpg tensorboard {root}; curves: offpg plot --each {root}")
    return "\n".join(line.rstrip() for line in out)


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
