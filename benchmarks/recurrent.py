"""A memory task: CartPole without its velocities, an LSTM policy against the feed-forward MLP.

    python benchmarks/recurrent.py --jobs 2               # seeds 0 and 1, both policies, 300k
    python benchmarks/recurrent.py --seeds 0 1 2 3 4 --budget 1000000 --jobs 4
    python benchmarks/recurrent.py --table                # the table again, from recurrent.json

Every run is the recipe `deploy/configs/cartpole_novel_lstm.toml` (`offpg/CartPoleNoVel-v1`:
the policy sees the cart position and the pole angle only) in the in-process wiring
(`deploy.inprocess.InProcessRun`, one torch thread), so a run is deterministic for its seed and
its env-step figures do not depend on the machine's load; the `mlp` row is the same recipe with
`policy.core = "none"`. A run stops at the target (the recipe's `run.target_return`, a mean over
the last 100 episodes) or at the budget, the same for both policies.

Prints a Markdown table (per policy: seeds solved within the budget, env steps to the target
per seed, env steps to the lower returns of `WAYPOINTS` per seed, the best and the final mean
return per seed, CPU seconds per run) and writes it, with every run's curve, to
`benchmarks/results/recurrent.md` and `recurrent.json`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "deploy" / "configs" / "cartpole_novel_lstm.toml"
RESULTS = ROOT / "benchmarks" / "results"
POLICIES = {"lstm": [], "mlp": ['policy.core="none"']}
#: Returns on the way to the target that the table reports too (the MLP's plateau is far below).
WAYPOINTS = (100.0, 200.0, 400.0)


def one_run(job: tuple[str, int, int]) -> dict:
    """One seed of one policy, in its own process (a fresh torch generator and thread count)."""
    import torch

    from deploy.config import load_config
    from deploy.inprocess import InProcessRun

    policy, seed, budget = job
    torch.set_num_threads(1)
    config = load_config(RECIPE, [f"env.seed={seed}", *POLICIES[policy]])
    start, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_utime
    run = InProcessRun(config)
    try:
        result = run.run(budget, config.run.target_return)
    finally:
        run.close()
    return {
        "policy": policy,
        "seed": seed,
        "solved_at": result.solved_at,
        "env_steps": result.env_steps,
        "return_mean": result.return_mean,
        "wall_s": round(time.perf_counter() - start, 1),
        "cpu_s": round(resource.getrusage(resource.RUSAGE_SELF).ru_utime - cpu, 1),
        "curve": result.curve,
    }


def _first_reaching(curve: list, value: float) -> str:
    steps = next((s for s, r in curve if r >= value), None)
    return "-" if steps is None else f"{steps / 1000:.0f}k"


def _per_seed(runs: list[dict], cell) -> str:
    return ", ".join(cell(r) for r in runs)


def table(runs: list[dict], target: float, budget: int) -> str:
    """The Markdown table of `runs` (per policy, seeds in order; "-": not reached)."""
    reach = " / ".join(f"{w:g}" for w in WAYPOINTS)
    lines = [
        f"Target: a mean return of the last 100 episodes of {target:g}, within {budget:,} env "
        "steps per run; per seed in seed order (seeds "
        + ", ".join(str(s) for s in sorted({r["seed"] for r in runs}))
        + ").",
        "",
        f"| policy | solved | env steps to {target:g} | env steps to {reach} | best mean return "
        "| mean return at the end | CPU s per run (median) |",
        "| --- | ---: | --- | --- | --- | --- | ---: |",
    ]
    for policy in POLICIES:
        mine = sorted((r for r in runs if r["policy"] == policy), key=lambda r: r["seed"])
        if not mine:
            continue
        solved = sum(r["solved_at"] is not None for r in mine)
        at_target = _per_seed(mine, lambda r: _first_reaching(r["curve"], target))
        waypoints = _per_seed(
            mine, lambda r: " / ".join(_first_reaching(r["curve"], w) for w in WAYPOINTS)
        )
        best = _per_seed(mine, lambda r: f"{max((v for _, v in r['curve']), default=0):.0f}")
        ends = _per_seed(mine, lambda r: f"{r['return_mean']:.0f}")
        cpu = statistics.median(r["cpu_s"] for r in mine)
        lines.append(
            f"| {policy} | {solved}/{len(mine)} | {at_target} | {waypoints} | {best} | {ends} "
            f"| {cpu:.0f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--budget", type=int, default=300_000, help="env steps per run")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    parser.add_argument("--table", action="store_true", help="print the table of recurrent.json")
    args = parser.parse_args(argv)
    from deploy.config import load_config

    target = load_config(RECIPE).run.target_return
    if args.table:
        saved = json.loads((RESULTS / "recurrent.json").read_text())
        print(table(saved["runs"], target, saved["args"]["budget"]))
        return
    jobs = [(p, s, args.budget) for p in args.policies for s in args.seeds]
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        runs = []
        for run in pool.imap_unordered(one_run, jobs):
            runs.append(run)
            print(
                f"{run['policy']} seed {run['seed']}: solved at {run['solved_at']}, return "
                f"{run['return_mean']:.1f} after {run['env_steps']:,} env steps, "
                f"{run['cpu_s']} CPU s",
                flush=True,
            )
    text = table(runs, target, args.budget)
    print("\n" + text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "recurrent.md").write_text(text + "\n")
    (RESULTS / "recurrent.json").write_text(json.dumps({"args": vars(args), "runs": runs}) + "\n")


if __name__ == "__main__":
    main()
