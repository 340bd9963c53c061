"""`offpg tune` on a real local Ray (`local_ray`): a grid sweep, a PBT population that exploits,
and bad searches refused with status 2 before Tune starts. Trials are tiny CartPole runs to an
env-step budget (never a wall-clock limit)."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import ray

from deploy.cli import main
from deploy.config import ConfigError
from deploy.search import parse_search
from deploy.trial import METRIC

pytest.importorskip("ray.tune")

#: Every trial: one actor of 8 envs (half a logical CPU), a report every half second; with its
#: driver (0.5) and learner (1) a trial holds 2 CPUs, so two trials fit in `local_ray`'s 4.
TINY = ["--target-return", "none"]
TINY += ["--set", "actors.num_envs=8", "--set", "run.actor_cpus=0.5", "--set", "run.log_every=0.5"]


def trial_history(root: Path, trial: str) -> list[dict]:
    """Every result the trial reported to Tune, in order (Tune's result.json)."""
    lines = (root / "tune" / trial / "result.json").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


@pytest.mark.parametrize(
    ("search", "message"),
    [
        ("learner.lr=logunifrom(1e-4,1e-3)", "--search"),
        ("learner.lr", "--search"),
        ("learner.lr=loguniform(1e-3,1e-4)", "A < B"),
        ("learner.lr=loguniform(0,1e-3)", "A > 0"),
        ("learner.lrr=choice(1e-3)", "did you mean learner.lr"),
        ("learnr.lr=grid(1e-3)", "learnr"),
        ("learner.lr=choice(1e-3,-1.0)", "learner.lr"),
        ('learner.batch_size=grid(4,"x")', "learner.batch_size"),
        ("run.num_actors=grid(1,2)", "use --set"),
    ],
)
def test_a_bad_search_exits_2_before_tune_starts(search, message, tmp_path, capsys):
    ray_was_up = ray.is_initialized()
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "--logdir", str(tmp_path), "--search", search])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("offpg: config error:"), err
    assert message in err[0]
    assert ray.is_initialized() == ray_was_up, "Ray was neither started nor stopped"
    assert list(tmp_path.iterdir()) == [], "nothing was started or written"


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--trials", "1"], "population"), (["--quantile", "0.7"], "--quantile")],
)
def test_a_bad_pbt_setting_exits_2(flags, message, tmp_path, capsys):
    search = ["--search", "learner.lr=loguniform(1e-4,1e-3)"]
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", "--logdir", str(tmp_path), "--pbt", *flags, *search])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_parse_search_kinds():
    assert parse_search("learner.lr=loguniform(1e-4, 3e-3)").values == (1e-4, 3e-3)
    assert parse_search("learner.entropy_cost=choice(0.0, 0.01)").values == (0.0, 0.01)
    grid = parse_search('policy.network=grid("mlp", "auto")')
    assert (grid.kind, grid.values) == ("grid", ("mlp", "auto"))
    with pytest.raises(ConfigError, match="TOML"):
        parse_search("learner.lr=choice(1e-3,,)")


@pytest.mark.slow
def test_grid_sweep_runs_both_trials_and_reports_them(local_ray, tmp_path, capsys):
    args = ["--name", "sweep", "--max-env-steps", "2000", "--search", "learner.lr=grid(1e-3,3e-4)"]
    code = main(["tune", "--logdir", str(tmp_path), *args, *TINY])
    assert code == 0
    out = capsys.readouterr().out
    root = tmp_path / "sweep"
    rows = json.loads((root / "trials.json").read_text())
    assert sorted(r["values"]["learner.lr"] for r in rows) == [3e-4, 1e-3]
    for row in rows:
        assert row["error"] is None
        assert row["env_steps"] >= 2000
        assert math.isfinite(row["best_return"]) and row["best_return"] > 0
        assert row["trial"] in out, "the final table lists every trial"
        run_dir = root / row["trial"]
        assert list(run_dir.glob("events.out.tfevents.*")), "each trial logs to TensorBoard"
        history = trial_history(root, row["trial"])
        assert len(history) >= 2 and all(METRIC in h for h in history), "one report per poll"
        steps = [h["env_steps"] for h in history]
        assert steps == sorted(steps) and steps[-1] == row["env_steps"]
    # The two trials ran at once, their placement groups holding all 4 of local_ray's CPUs: an
    # actor a trial started outside its own group could not have been scheduled.
    histories = [trial_history(root, row["trial"]) for row in rows]
    started = [h[0]["timestamp"] - h[0]["time_total_s"] for h in histories]
    assert max(started) < min(h[-1]["timestamp"] for h in histories)
    assert main(["plot", "--each", str(root), "--out", str(tmp_path / "c.png")]) == 0
    assert sum(line.startswith("sweep-0") for line in capsys.readouterr().out.splitlines()) == 2


@pytest.mark.long
def test_pbt_exploits_another_trials_checkpoint(local_ray, tmp_path):
    # A population of two at quantile 0.5: at each perturbation point the lower trial copies
    # the upper one. One trial's episodes are capped at 5 steps (return 5), the other's are not
    # (every CartPole episode lasts at least 8 steps), so which trial is lower does not depend
    # on noise: the capped trial exploits at its first perturbation point after the other has
    # reported one (finished or not, see deploy.tune._pbt), at the latest its second.
    # Why this fails now and then (and is `long`): that needs the capped trial still running
    # when the other makes its first checkpointed report, a race between wall clocks. The two
    # trials' start-ups on a loaded machine differ by seconds (5 s in a failed run, whichever
    # comes first in the grid), about as long as a trial's whole run here; a capped trial that
    # starts first can pass its last perturbation point before the other has reported, and a
    # trial's final report is no perturbation point.
    args = ["--name", "pbt", "--pbt", "--quantile", "0.5"]
    args += ["--perturbation-interval", "1000", "--max-env-steps", "6000"]
    args += ["--search", "env.kwargs=grid({max_episode_steps=5},{})"]
    code = main(["tune", "--logdir", str(tmp_path), *args, *TINY])
    assert code == 0
    root = tmp_path / "pbt"
    rows = json.loads((root / "trials.json").read_text())
    assert len(rows) == 2 and all(r["error"] is None and r["env_steps"] >= 6000 for r in rows)
    histories = {r["trial"]: trial_history(root, r["trial"]) for r in rows}
    exploits = []
    for trial, history in histories.items():
        for before, after in itertools.pairwise(history):
            if after["restored_from"] and after["restored_from"] != before["restored_from"]:
                exploits.append((trial, before, after))
    assert exploits, "no trial continued from another trial's checkpoint"
    assert any(before[METRIC] == 5.0 for _, before, _ in exploits), "the capped trial copied"
    for trial, before, after in exploits:
        donor, version = after["restored_from"], after["restored_version"]
        assert donor != trial and donor in histories
        # The donor reported that checkpoint; the trial's learner continued from its version
        # and env-step count.
        reported = [h for h in histories[donor] if h.get("checkpoint_version") == version]
        assert reported, f"{donor} reported no checkpoint of version {version}"
        assert after["learner_version"] >= version, "the learner continued from that version"
        assert after["env_steps"] >= reported[0]["env_steps"]
        assert after["exploits"] == before["exploits"] + 1
