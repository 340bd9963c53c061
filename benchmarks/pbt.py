"""Population-based training against independent runs: CartPole-v1 to 475 with `offpg tune`.

Four learning rates are drawn once (log-uniform in [1e-4, 3e-3], one per quarter of that range,
from `--seed`). Two
experiments then run on this machine, each with the default CartPole recipe otherwise:

1. independent: `offpg tune --search learner.lr=grid(<the four>)`, four runs that never meet;
2. PBT: `offpg tune --pbt --search learner.lr=grid(<the four>)`, the same four as the initial
   population; every `--interval` env steps the bottom quarter copies a top trial's learner
   checkpoint and moves to a neighbouring learning rate of the four (or redraws one).

The figure compared is env steps to the target: for PBT, those of the first trial to reach it
(counted along its lineage: a trial that copies another continues from the other's env-step
count); for the independent runs, their median (an unsolved run counts as never). Target
(issue 16): PBT no later than the median. The population's total env steps are reported too.

    python benchmarks/pbt.py                          # writes benchmarks/results/pbt.json
    python benchmarks/pbt.py --max-env-steps 600000 --interval 25000 --logdir runs/bench
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "pbt.json"


def sample_lrs(seed: int, n: int) -> list[float]:
    """`n` learning rates, log-uniform in [1e-4, 3e-3], one from each n-th of the log range
    (stratified: four plain draws can all land at one end)."""
    rng = np.random.default_rng(seed)
    u = (np.arange(n) + rng.uniform(size=n)) / n
    low, high = np.log(1e-4), np.log(3e-3)
    return [float(f"{v:.3g}") for v in np.exp(low + u * (high - low))]


def run_tune(logdir: str, name: str, args: list[str], timeout: float) -> dict:
    """One `offpg tune` subprocess; returns its trials.json rows and the outside wall time."""
    cmd = [sys.executable, "-m", "deploy.cli", "tune", "--logdir", logdir, "--name", name, *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - start
    trials = Path(logdir) / name / "trials.json"
    if not trials.exists():
        raise RuntimeError(f"offpg tune {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    table = proc.stdout[proc.stdout.rfind("trial ") :]
    command = " ".join(["offpg tune --name", name, *(f"'{a}'" if "(" in a else a for a in args)])
    rows = json.loads(trials.read_text())
    return {"rows": rows, "wall_s": wall, "table": table, "command": command}


def solved(rows: list[dict]) -> list[float]:
    return [r["solved_at_env_steps"] or math.inf for r in rows]


def _finite(value: object) -> object:
    """`value` with every infinite float (never solved) as None, for strict JSON."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return None if isinstance(value, float) and math.isinf(value) else value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--population", type=int, default=4)
    parser.add_argument("--interval", type=int, default=50_000, help="PBT perturbation interval")
    parser.add_argument("--max-env-steps", type=int, default=1_500_000)
    parser.add_argument("--timeout", type=float, default=3600.0)
    parser.add_argument("--logdir", help="keep the runs here (default: a temporary directory)")
    args = parser.parse_args()
    lrs = sample_lrs(args.seed, args.population)
    grid = "learner.lr=grid(" + ",".join(map(str, lrs)) + ")"
    common = ["--search", grid, "--max-env-steps", str(args.max_env_steps)]
    print(f"machine: {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}")
    print(f"learning rates: {lrs}", flush=True)
    with tempfile.TemporaryDirectory() as scratch:
        logdir = args.logdir or scratch
        indep = run_tune(logdir, "independent", common, args.timeout)
        print(f"$ {indep['command']}\n{indep['table']}", flush=True)
        pbt_args = ["--pbt", "--perturbation-interval", str(args.interval), *common]
        pbt = run_tune(logdir, "pbt", pbt_args, args.timeout)
        print(f"$ {pbt['command']}\n{pbt['table']}", flush=True)
    median = statistics.median(solved(indep["rows"]))
    best = min(solved(pbt["rows"]))
    result = {
        "learning_rates": lrs,
        "interval": args.interval,
        "max_env_steps": args.max_env_steps,
        "independent_solved_at": solved(indep["rows"]),
        "independent_median": median,
        "pbt_first_solved_at": best,
        "pbt_population_env_steps": sum(r["env_steps"] for r in pbt["rows"]),
        "pbt_exploits": sum(r["exploits"] for r in pbt["rows"]),
        "wall_s": {"independent": indep["wall_s"], "pbt": pbt["wall_s"]},
        "load_average": os.getloadavg()[0],
        "commands": {"independent": indep["command"], "pbt": pbt["command"]},
        "tables": {"independent": indep["table"], "pbt": pbt["table"]},
        "met": best <= median,
    }
    RESULTS.write_text(json.dumps(_finite(result), indent=1))
    print(
        f"PBT first to 475 at {best:,.0f} env steps; independent median {median:,.0f} "
        f"({'met' if result['met'] else 'MISSED'}); written to {RESULTS}"
    )


if __name__ == "__main__":
    main()
