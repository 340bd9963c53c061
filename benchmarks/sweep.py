"""Seeds of CartPole recipes through the in-process wiring: how many solve, and at what cost.

Each (recipe, seed) runs `deploy.inprocess.InProcessRun` (the job's own classes, no Ray, one
thread, deterministic for a seed) to the recipe's target return or `--budget` env steps, in its
own process (`--jobs` at a time). A recipe is `deploy/configs/cartpole.toml` plus `--set`-style
overrides. Besides env steps to solve it reports the learner's work: steps and sample rows
(batch x unroll x envs per step, each forward and backward through the network), which on a
learner-bound machine is what the wall time follows.

    python benchmarks/sweep.py --seeds 12 --recipe base= --recipe spi4=replay.samples_per_insert=4

Prints a Markdown table; the last line is `SWEEP {json}`. Wall time needs real `offpg train`
runs (`benchmarks/startup.py --solve`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def one_seed(overrides: list[str], seed: int, budget: int) -> dict:
    """One seed of one recipe in this process; what it cost."""
    import torch

    from deploy.config import load_config
    from deploy.inprocess import InProcessRun

    torch.set_num_threads(1)  # as in a Ray job, whose learner and actors get one CPU each
    config = load_config(None, [*overrides, f"env.seed={seed}"])
    run = InProcessRun(config, seed=seed)
    try:
        result = run.run(budget, config.run.target_return)
    finally:
        run.close()
    rows = config.learner.batch_size * config.actors.unroll_length * config.actors.num_envs
    return {
        "seed": seed,
        "solved_at": result.solved_at,
        "env_steps": result.env_steps,
        "learner_steps": result.learner_steps,
        "sample_rows": result.learner_steps * rows,
    }


def parse_recipe(text: str) -> tuple[str, list[str]]:
    """`NAME=KEY=VALUE,KEY=VALUE` (commas inside brackets belong to the value)."""
    name, _, rest = text.partition("=")
    return name, [part for part in re.split(r",(?![^\[]*\])", rest) if part]


def summarise(runs: list[dict]) -> dict:
    solved = [r for r in runs if r["solved_at"] is not None]
    out = {"solved": len(solved), "seeds": len(runs)}
    for key in ("solved_at", "learner_steps", "sample_rows"):
        values = [r[key] for r in solved]
        if values:
            out[f"{key}_median"] = statistics.median(values)
            out[f"{key}_max"] = max(values)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=12)
    parser.add_argument("--budget", type=int, default=1_500_000)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--recipe",
        action="append",
        required=True,
        metavar="NAME=KEY=VALUE,KEY=VALUE",
        help="a recipe: its name, '=', then comma-separated overrides (none: the shipped one)",
    )
    parser.add_argument(
        "--log",
        type=Path,
        help="JSON lines of finished (recipe, seed) runs: appended to, and read back so that a "
        "sweep that was interrupted goes on where it stopped",
    )
    args = parser.parse_args()
    recipes = dict(parse_recipe(text) for text in args.recipe)
    results: dict[str, list[dict]] = {name: [] for name in recipes}
    for line in args.log.read_text().splitlines() if args.log and args.log.exists() else []:
        done = json.loads(line)
        if recipes.get(done["recipe"]) == done["overrides"] and done["seed"] < args.seeds:
            results[done["recipe"]].append(done)
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        futures = {
            pool.submit(one_seed, overrides, seed, args.budget): name
            for seed in range(args.seeds)
            for name, overrides in recipes.items()
            if seed not in {r["seed"] for r in results[name]}
        }
        for future in concurrent.futures.as_completed(futures):
            name = futures[future]
            result = {"recipe": name, "overrides": recipes[name], **future.result()}
            results[name].append(result)
            print(f"{name}: {json.dumps(result)}", flush=True)
            if args.log:
                with args.log.open("a") as log:
                    log.write(json.dumps(result) + "\n")
    summary = {name: summarise(runs) for name, runs in results.items()}
    print(f"\nload {os.getloadavg()[0]:.1f}")
    print("| recipe | solved | env steps to solve: median (max) | learner steps | sample rows |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, s in summary.items():
        if "solved_at_median" not in s:
            print(f"| {name} | {s['solved']}/{s['seeds']} | | | |")
            continue
        print(
            f"| {name} {' '.join(recipes[name])} | {s['solved']}/{s['seeds']} | "
            f"{s['solved_at_median']:,.0f} ({s['solved_at_max']:,}) | "
            f"{s['learner_steps_median']:,.0f} | {s['sample_rows_median'] / 1e6:.1f} M |"
        )
    print("SWEEP " + json.dumps({"recipes": recipes, "summary": summary, "runs": results}))


if __name__ == "__main__":
    main()
