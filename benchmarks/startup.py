"""Where the seconds of an `offpg train` go: start-up, stop and exit, run after run.

Each run is a fresh `offpg train` subprocess (`python -m deploy.cli train`), timed from outside
(spawn to exit: interpreter start, imports, Ray's start and shutdown included) and read from
inside: the moments of its summary.json timeline (`deploy.timeline`, seconds since the command).
The exit latency is the outside wall time minus the moment the driver saw the stop rule.

    python benchmarks/startup.py                          # 5 x `--max-env-steps 1`
    python benchmarks/startup.py --solve --runs 5         # to the recipe's target, seeds 0-4
    python benchmarks/startup.py --baseline /tmp/offpg-old   # alternate with another checkout
    python benchmarks/startup.py --solve --baseline-set replay.samples_per_insert=8  # two recipes

With `--baseline SRC` every run of this checkout is followed by one of the offpg sources in SRC
(another commit, say `git archive OLD | tar -x -C SRC`), so both see the same machine load; a
baseline without a timeline gives its outside wall time only. `--baseline-set KEY=VALUE` gives
the baseline runs their own overrides (two recipes on the same sources). The load average is
recorded with every run: on a shared machine, compare the two columns, not figures taken at
another time.

Prints a Markdown table of the medians per moment; the last line is `STARTUP {json}`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deploy.timeline import MOMENTS  # noqa: E402

#: Tries per run (see `retried`).
ATTEMPTS = 3


def one_run(src: Path, logdir: str, name: str, args: list[str], timeout: float) -> dict:
    """One `offpg train` of the sources in `src`: outside wall, load, and summary.json."""
    cmd = [sys.executable, "-m", "deploy.cli", "train", "--logdir", logdir, "--name", name, *args]
    env = {**os.environ, "PYTHONPATH": str(src)}
    load = os.getloadavg()[0]
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, cwd=src, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    wall = time.perf_counter() - start
    path = Path(logdir) / name / "summary.json"
    if proc.returncode != 0 or not path.exists():
        tail = (proc.stdout + proc.stderr)[-2000:]
        raise RuntimeError(f"offpg train {name} failed ({proc.returncode}):\n{tail}")
    summary = json.loads(path.read_text())
    timeline = summary.get("timeline", {})
    result = {
        "wall_s": round(wall, 3),
        "load_1min": load,
        "timeline": timeline,
        "env_steps": summary["env_steps"],
        "solved": summary["solved"],
        "solved_at_env_steps": summary["solved_at_env_steps"],
    }
    if "stop_seen" in timeline:
        result["exit_after_stop_s"] = round(wall - timeline["stop_seen"], 3)
    return result


def retried(src: Path, logdir: str, name: str, args: list[str], timeout: float) -> dict:
    """`one_run`, tried up to `ATTEMPTS` times: on an overloaded machine Ray's own start can
    time out (its raylet waits a fixed time for its agents); failures are counted."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return {
                **one_run(src, logdir, f"{name}-{attempt}", args, timeout),
                "failed": attempt - 1,
            }
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            print(f"{name}: attempt {attempt} failed: {str(exc)[-300:]}", file=sys.stderr)
    raise RuntimeError(f"{name}: {ATTEMPTS} attempts failed")


def medians(runs: list[dict]) -> dict[str, float]:
    """Median over `runs` of every moment, the outside wall time and the exit latency."""
    out: dict[str, float] = {}
    for moment in MOMENTS:
        values = [r["timeline"][moment] for r in runs if moment in r["timeline"]]
        if values:
            out[moment] = round(statistics.median(values), 3)
    solved = [r["solved_at_env_steps"] for r in runs if r["solved"]]
    if solved:
        out["solved_runs"] = len(solved)
        out["solved_at_env_steps"] = statistics.median(solved)
    for key in ("exit_after_stop_s", "wall_s", "load_1min"):
        values = [r[key] for r in runs if key in r]
        if values:
            out[key] = round(statistics.median(values), 3)
    return out


def table(results: dict[str, dict[str, float]], counts: dict[str, int]) -> str:
    labels = list(results)
    head = "| moment (s since the command) | " + " | ".join(
        f"{label} (median of {counts[label]})" for label in labels
    )
    lines = [head + " |", "| --- |" + " ---: |" * len(labels)]
    rows = [*MOMENTS, "exit_after_stop_s", "wall_s", "solved_runs", "solved_at_env_steps"]
    rows.append("load_1min")
    for row in rows:
        cells = [results[label].get(row) for label in labels]
        if all(cell is None for cell in cells):
            continue
        text = " | ".join("" if cell is None else f"{cell:,.2f}" for cell in cells)
        lines.append(f"| {row} | {text} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--max-env-steps", type=int, default=1)
    parser.add_argument(
        "--solve", action="store_true", help="run to the recipe's target (seeds 0, 1, ...)"
    )
    parser.add_argument("--baseline", type=Path, help="offpg sources to alternate with")
    parser.add_argument(
        "--baseline-set",
        action="append",
        default=[],
        help="override for the baseline runs only (with no --baseline: this checkout's sources)",
    )
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="for this checkout's runs"
    )
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()

    sources = {"this": (ROOT, args.overrides)}
    if args.baseline or args.baseline_set:
        sources["baseline"] = ((args.baseline or ROOT).resolve(), args.baseline_set)
    runs: dict[str, list[dict]] = {label: [] for label in sources}
    with tempfile.TemporaryDirectory(prefix="offpg-startup-") as logdir:
        for i in range(args.runs):
            common = [] if args.solve else ["--max-env-steps", str(args.max_env_steps)]
            common += ["--set", f"env.seed={i}"] if args.solve else []
            for label, (src, overrides) in sources.items():
                train_args = [*common, *(arg for o in overrides for arg in ("--set", o))]
                result = retried(src, logdir, f"{label}-{i}", train_args, args.timeout)
                runs[label].append(result)
                print(f"{label} run {i}: {json.dumps(result)}", flush=True)
    results = {label: medians(r) for label, r in runs.items()}
    print()
    print(table(results, {label: len(r) for label, r in runs.items()}))
    mode = "solve" if args.solve else f"max_env_steps={args.max_env_steps}"
    setup = {label: {"src": str(src), "set": o} for label, (src, o) in sources.items()}
    print("STARTUP " + json.dumps({"mode": mode, "setup": setup, "medians": results, "runs": runs}))


if __name__ == "__main__":
    main()
