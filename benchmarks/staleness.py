"""How much do importance weights buy when the acting policy is stale? Forced lag, in-process.

    # the CartPole table in benchmarks/README.md:
    python benchmarks/staleness.py --seeds 5 --budget 1000000 --learner vtrace_lambda=0.95 \\
        reward_scale=0.1
    python benchmarks/staleness.py --env Acrobot-v1 --target -100 --budget 1000000
    python benchmarks/staleness.py --seeds 1 --lags 0 16  # quicker

No Ray: the job's own classes in one process (`deploy.inprocess.InProcessRun`), one actor and
a fifo replay queue of batch 1, stepped in turn. The weight store is handed the weights the
learner published `lag` versions ago (`policy_lag`), so before learner step k the actor syncs to
version `max(0, k - lag)`, collects one fragment (encoded, inserted into the replay service and
sampled, exactly the bytes a real actor sends), and the learner takes one step on it. So every
batch is exactly `lag` versions old (until there are that many versions), each fragment is
learned from once, and nothing but the forced lag is off-policy; the learner's own lag metric is
checked against it. Deterministic for a seed (one torch thread).

Estimators (`learner.estimators`): `vtrace`; `vtrace_clip`, V-trace with the learner's
`policy_clip = 0.2` (APPO's clipped surrogate against the behaviour policy); `first_order_is`,
`reduced_is`, `per_decision_is` from `pg_weights`; `reward_to_go`, which ignores the ratios
(no correction); and `stgs`, the pathwise straight-through Gumbel-softmax gradient through a
learned action-value head Q(s, .) (no ratios in its policy term; Q's targets are the V-trace
ones, so the lag is corrected there). Every one uses the learner's defaults otherwise, in
particular `rho_clip = 1`: V-trace's rho-bar, and for the `pg_weights` estimators the
truncation of every per-step ratio at 1 (so `first_order_is` is the truncated first-order form,
and the product estimators multiply truncated ratios). The value function is always trained on
the V-trace targets, so the estimators other than `stgs` differ only in the weights of the
policy gradient.

Writes `benchmarks/results/staleness_<env>.png` (mean return of the last 100 episodes against
env steps, one panel per lag, line = mean over seeds, band = min..max) and
`staleness_<env>.md` (median env steps to solve, the ratio to lag 0, solved/seeds).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deploy.config import parse_override

RESULTS = Path(__file__).resolve().parent / "results"
ESTIMATORS = (
    "vtrace",
    "vtrace_clip",
    "first_order_is",
    "reduced_is",
    "per_decision_is",
    "reward_to_go",
    "stgs",
)
# Estimator names that are V-trace plus other learner settings.
VARIANTS = {"vtrace_clip": {"estimator": "vtrace", "policy_clip": 0.2}}
#: The arguments a results JSON keeps, so --from-json can redraw its table and plot.
SAVED_ARGS = (
    "env",
    "target",
    "lags",
    "estimators",
    "seeds",
    "budget",
    "num_envs",
    "unroll",
    "lr",
    "learner",
)
LABELS = {
    "vtrace": "V-trace",
    "vtrace_clip": "V-trace + clipped surrogate (APPO, e = 0.2)",
    "first_order_is": "first-order IS (rho clip 1)",
    "reduced_is": "reduced IS",
    "per_decision_is": "per-decision IS",
    "reward_to_go": "no correction (reward-to-go)",
    "stgs": "STGS (straight-through Gumbel-softmax through Q)",
}


@dataclasses.dataclass(frozen=True)
class Job:
    env: str
    estimator: str
    lag: int
    seed: int
    budget: int
    target: float
    num_envs: int
    unroll: int
    lr: float
    learner: tuple[tuple[str, object], ...] = ()


def run(job: Job) -> dict:
    import torch

    from actors.config import ActorConfig
    from actors.envs import EnvConfig
    from deploy.config import JobConfig, RunConfig
    from deploy.inprocess import InProcessRun
    from learner.config import LearnerConfig
    from replay.service import ReplayConfig

    torch.set_num_threads(1)
    learner = {
        "lr": job.lr,
        "batch_size": 1,
        "device": "cpu",
        "torch_threads": 1,
        **dict(job.learner),
        **VARIANTS.get(job.estimator, {"estimator": job.estimator}),
    }
    config = JobConfig(
        run=RunConfig(num_actors=1),
        env=EnvConfig(id=job.env, seed=job.seed * 7919),
        actors=ActorConfig(num_envs=job.num_envs, unroll_length=job.unroll),
        learner=LearnerConfig(**learner),
        replay=ReplayConfig.fifo_queue(),
    )

    def check_lag(metrics) -> None:
        if not metrics.skipped and metrics.lag_max != min(job.lag, metrics.version - 1):
            raise AssertionError(f"lag {metrics.lag_max}, forced {job.lag}")

    started = time.perf_counter()
    wiring = InProcessRun(config, seed=job.seed, policy_lag=job.lag)
    try:
        result = wiring.run(job.budget, job.target, on_step=check_lag)
    finally:
        wiring.close()
    steps = [point[0] for point in result.curve]
    returns = [point[1] for point in result.curve]
    return {
        **dataclasses.asdict(job),
        "solved_at": result.solved_at,
        "env_steps": result.env_steps,
        "seconds": time.perf_counter() - started,
        "steps": steps[::4] + steps[-1:],
        "returns": returns[::4] + returns[-1:],
    }


def _median_steps(runs: list[dict]) -> float | None:
    vals = sorted(math.inf if r["solved_at"] is None else r["solved_at"] for r in runs)
    med = statistics.median(vals)
    return None if math.isinf(med) else med


def summarise(results: list[dict], lags: list[int], estimators: list[str], budget: int) -> str:
    head = "| estimator | " + " | ".join(f"lag {lag}" for lag in lags) + " |"
    rows = [head, "| --- |" + " ---: |" * len(lags)]
    for est in estimators:
        cells = []
        base = _median_steps([r for r in results if r["estimator"] == est and r["lag"] == lags[0]])
        for lag in lags:
            runs = [r for r in results if r["estimator"] == est and r["lag"] == lag]
            med = _median_steps(runs)
            solved = sum(r["solved_at"] is not None for r in runs)
            if med is None:
                cells.append(f"> {budget / 1e3:,.0f}k ({solved}/{len(runs)})")
            else:
                ratio = f", {med / base:.2f}x" if base and lag != lags[0] else ""
                cells.append(f"{med / 1e3:,.0f}k ({solved}/{len(runs)}{ratio})")
        rows.append(f"| {LABELS[est]} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(results: list[dict], lags: list[int], estimators: list[str], out: Path, title: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from deploy.plot import Series, aggregate

    fig, axes = plt.subplots(1, len(lags), figsize=(4.2 * len(lags), 4.4), sharex=True, sharey=True)
    axes = np.atleast_1d(axes)
    for ax, lag in zip(axes, lags, strict=True):
        for i, est in enumerate(estimators):
            runs = [r for r in results if r["estimator"] == est and r["lag"] == lag and r["steps"]]
            if not runs:
                continue
            # A run that solved stops early; hold its last value so the band covers the budget.
            end = max(r["steps"][-1] for r in runs)
            series = [
                Series(np.array([*r["steps"], end]), np.array([*r["returns"], r["returns"][-1]]))
                for r in runs
            ]
            curve = aggregate(est, series, weight=0.0)
            color = f"C{i}"
            ax.plot(curve.x, curve.mean, color=color, label=LABELS[est])
            if curve.seeds > 1:
                ax.fill_between(curve.x, curve.low, curve.high, color=color, alpha=0.15)
        ax.set_title(f"policy lag {lag}")
        ax.set_xlabel("environment steps")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("mean return (last 100 episodes)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize="small")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="CartPole-v1")
    parser.add_argument("--target", type=float, default=475.0)
    parser.add_argument("--lags", type=int, nargs="+", default=[0, 4, 16, 64])
    parser.add_argument("--estimators", nargs="+", choices=ESTIMATORS, default=list(ESTIMATORS))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--budget", type=int, default=400_000, help="env steps per run")
    parser.add_argument("--num-envs", type=int, default=32)
    parser.add_argument("--unroll", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument(
        "--learner",
        nargs="*",
        default=["vtrace_lambda=0.95"],
        metavar="KEY=VALUE",
        help="other LearnerConfig fields for every run, e.g. normalize_advantages=true",
    )
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where the results go")
    parser.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        help="redo the table and plot from results JSONs this script wrote (e.g. on a machine "
        "without matplotlib; several runs of the same grid with other estimators merge), "
        "running nothing",
    )
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        saved = [json.loads(path.read_text()) for path in args.from_json]
        args = argparse.Namespace(**{**vars(args), **saved[0]["args"]})
        ran = {est for run in saved for est in run["args"]["estimators"]}
        args.estimators = [est for est in ESTIMATORS if est in ran]
        results = [r for run in saved for r in run["results"]]
        report(args, results, "\n\n".join(run["header"] for run in saved))
        return

    learner = tuple(parse_override(item) for item in args.learner)
    jobs = [
        Job(
            args.env,
            est,
            lag,
            seed,
            args.budget,
            args.target,
            args.num_envs,
            args.unroll,
            args.lr,
            learner,
        )
        for seed in range(args.seeds)
        for lag in args.lags
        for est in args.estimators
    ]
    started = time.time()
    load = os.getloadavg()[0]
    results = []
    with multiprocessing.get_context("spawn").Pool(args.jobs) as pool:
        for r in pool.imap_unordered(run, jobs):
            results.append(r)
            solved = f"solved at {r['solved_at']:,}" if r["solved_at"] else "not solved"
            print(
                f"staleness: {r['estimator']:16} lag {r['lag']:3} seed {r['seed']}: {solved} "
                f"({r['env_steps']:,} steps, {r['seconds']:.0f} s)  [{len(results)}/{len(jobs)}]",
                flush=True,
            )
    cmd = "python benchmarks/staleness.py" + (" " + " ".join(argv or sys.argv[1:])).rstrip()
    header = (
        f"`{cmd}`, {time.strftime('%Y-%m-%d')}, {args.seeds} seed(s), {args.jobs} process(es) "
        f"on {os.cpu_count()} cores (load {load:.1f} at the start), "
        f"{time.time() - started:.0f} s in all."
    )
    (args.out / f"staleness_{_env_name(args.env)}.json").write_text(
        json.dumps(
            {
                "header": header,
                "args": {k: getattr(args, k) for k in SAVED_ARGS},
                "results": results,
            }
        )
    )
    report(args, results, header)


def _env_name(env: str) -> str:
    """`ALE/Pong-v5` -> `ale-pong`, `CartPole-v1` -> `cartpole`: the results' file stem."""
    return env.replace("/", "-").split("-v")[0].lower()


def report(args, results: list[dict], header: str) -> None:
    """Write `staleness_<env>.md` (and the plot, where matplotlib is installed)."""
    name = _env_name(args.env)
    table = summarise(results, args.lags, args.estimators, args.budget)
    png = args.out / f"staleness_{name}.png"
    try:
        plot(
            results,
            args.lags,
            args.estimators,
            png,
            f"{args.env}: forced policy lag, {args.seeds} seed(s), "
            f"{args.num_envs} envs x {args.unroll} steps per learner step, lr {args.lr:g}"
            + "".join(f", {item}" for item in args.learner),
        )
        picture = f"\n![mean return against env steps per lag]({png.name})\n"
    except ImportError:
        picture = "\n(no plot: matplotlib is not installed here; redo it with --from-json)\n"
    text = (
        f"# Forced policy lag on {args.env}\n\n{header}\n\n"
        f"Median env steps until the mean return of the last 100 episodes reached "
        f"{args.target:g} (solved seeds / seeds, and the ratio to lag {args.lags[0]}); "
        f"budget {args.budget:,} env steps per run, one fragment of {args.num_envs} x "
        f"{args.unroll} steps per learner step, lr {args.lr:g}"
        f"{''.join(', ' + item for item in args.learner)}.\n\n{table}\n{picture}"
    )
    md = args.out / f"staleness_{name}.md"
    md.write_text(text)
    print("\n" + text + f"\nwrote {md}")


if __name__ == "__main__":
    main()
