"""The `offpg` command line.

Heavy imports (torch, Ray, Gymnasium) happen inside the command that needs them, so `offpg
--help` and `offpg --version` answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from deploy import __version__

#: Named `offpg train` flags and the config key each one sets.
TRAIN_FLAGS: dict[str, str] = {
    "name": "run.name",
    "env": "env.id",
    "actors": "run.num_actors",
    "max_env_steps": "run.max_env_steps",
    "target_return": "run.target_return",
    "logdir": "run.logdir",
    "address": "run.address",
    "resume": "run.resume",
}


def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="TOML file (see deploy/configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one key, e.g. --set learner.lr=3e-4 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    """Every command and flag of `offpg`: one declarative list, long because the CLI is."""
    parser = argparse.ArgumentParser(
        prog="offpg",
        description="Distributed actor-learner RL: Ray actors act with stale policies, a learner "
        "corrects for the staleness with importance weights (V-trace by default).",
    )
    parser.add_argument("--version", action="version", version=f"offpg {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = sub.add_parser(
        "train",
        help="train on an embedded Ray (or --address); CartPole-v1 to 475 by default",
        description="Train a policy. With no arguments: CartPole-v1 until the mean return of "
        "the last 100 episodes reaches 475. Logs go to <logdir>/<name> for TensorBoard.",
    )
    _add_config_args(train)
    _add_run_flags(
        train,
        name="run name (default: env id and time)",
        actors="number of rollout actors",
        steps="environment step budget",
        target="stop at this mean return over 100 episodes ('none': never)",
        logdir="parent directory of run directories (default runs/)",
    )
    train.add_argument(
        "--resume", action="store_true", default=None, help="continue the run named by --name"
    )

    show = sub.add_parser("config", help="print the resolved config as TOML, or every key")
    _add_config_args(show)
    show.add_argument(
        "--keys",
        action="store_true",
        help="list every key: its default, its value here, what it allows and what it means",
    )

    _add_cluster_parsers(sub)
    _add_tune_parser(sub)

    tb = sub.add_parser(
        "tensorboard",
        help="start TensorBoard for a run directory (on 127.0.0.1 unless --host)",
        description="TensorBoard over a run (or a parent of runs). It listens on 127.0.0.1: "
        "from another machine use an SSH tunnel (ssh -L 6006:127.0.0.1:6006 HOST), or --host "
        "to listen on another address (TensorBoard has no authentication).",
    )
    tb.add_argument("run_dir", nargs="?", default="runs", help="run or parent directory")
    tb.add_argument("--port", type=int, default=6006)
    tb.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1, this machine only; 0.0.0.0: every "
        "interface, with a warning)",
    )

    plot = sub.add_parser(
        "plot",
        help="learning curves from TensorBoard event files (line + band across seeds)",
        description="Plain RUN_DIRs are seeds of one curve; each 'LABEL=GLOB' is a curve of its "
        "own over the runs the glob matches (quote it). Line: mean across seeds (of the runs "
        "as logged; --smooth to smooth them); band: lowest to highest seed; dashed: the runs' "
        "target return.",
    )
    plot.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directory or LABEL=GLOB")
    plot.add_argument("--tag", default="episode/return_mean", help="scalar tag to plot")
    plot.add_argument("--out", default="curves.png", help="PNG file to write")
    plot.add_argument(
        "--smooth",
        type=float,
        default=0.0,
        help="TensorBoard-style EMA weight in [0, 1) (default 0: no smoothing)",
    )
    plot.add_argument(
        "--each", action="store_true", help="one curve per run directory found (tune trials)"
    )
    return parser


def _add_tune_parser(sub: argparse._SubParsersAction) -> None:
    tune = sub.add_parser(
        "tune",
        help="sweep hyperparameters or run population-based training on Ray Tune",
        description="Run one offpg training run per trial on Ray Tune: the base config (--config, "
        "--set) plus the trial's values of the --search keys. Trials log to "
        "<logdir>/<name>/<trial>; a table of trials and their best returns ends the run.",
    )
    _add_config_args(tune)
    tune.add_argument(
        "--search",
        action="append",
        default=[],
        metavar="KEY=SPEC",
        help="a searched key; SPEC: loguniform(A,B), uniform(A,B), choice(V,...), grid(V,...) "
        "(repeatable), e.g. --search 'learner.lr=loguniform(1e-4,3e-3)'",
    )
    tune.add_argument(
        "--trials", type=int, help="samples drawn (grids: repeats); default 4, or 1 with a grid"
    )
    tune.add_argument("--pbt", action="store_true", help="population-based training")
    tune.add_argument(
        "--perturbation-interval",
        type=int,
        default=50_000,
        metavar="STEPS",
        help="PBT: env steps between a trial's exploit/explore decisions (default 50000)",
    )
    tune.add_argument(
        "--quantile",
        type=float,
        default=0.25,
        metavar="Q",
        help="PBT: the bottom fraction Q of the trials copies the top Q (default 0.25)",
    )
    _add_run_flags(
        tune,
        name="experiment name (default: env id, 'tune' and time)",
        actors="rollout actors per trial",
        steps="environment step budget of each trial",
        target="a trial stops at this mean return over 100 episodes ('none')",
        logdir="parent directory of the experiment (default runs/)",
    )


def _add_run_flags(
    parser: argparse.ArgumentParser, *, name: str, actors: str, steps: str, target: str, logdir: str
) -> None:
    """The run flags `train` and `tune` share (`TRAIN_FLAGS` maps them to config keys)."""
    parser.add_argument("--name", help=name)
    parser.add_argument("--env", help="Gymnasium id or package.module:callable")
    parser.add_argument("--actors", type=int, help=actors)
    parser.add_argument("--max-env-steps", type=int, help=steps)
    parser.add_argument("--target-return", help=target)
    parser.add_argument("--logdir", help=logdir)
    parser.add_argument("--address", help="Ray cluster address (default: embedded Ray)")


_ADDRESS_HELP = (
    "the cluster: dashboard URL http://HEAD:8265 (relayed as a short job), GCS HEAD:6379 or "
    "ray://HEAD:10001 (direct); default $RAY_ADDRESS, else the Ray cluster on this machine"
)


def _add_cluster_parsers(sub: argparse._SubParsersAction) -> None:
    launch = sub.add_parser(
        "launch",
        help="submit the training job to a Ray cluster (Ray Jobs API)",
        description="Validate the config here, then submit `offpg train` to the cluster with "
        "the project directory as the job's working_dir. Prints the run name and job id.",
    )
    _add_config_args(launch)
    launch.add_argument(
        "--address",
        help="dashboard URL, e.g. http://HEAD:8265 (default $RAY_ADDRESS, else local)",
    )
    launch.add_argument("--name", help="run name (default: env id and time)")
    launch.add_argument(
        "--working-dir",
        help="directory uploaded as the job's working_dir (default: this offpg checkout)",
    )
    launch.add_argument(
        "--pip",
        action="append",
        default=[],
        metavar="REQ",
        help="pip requirement installed into the job's runtime env (repeatable)",
    )
    launch.add_argument("--wait", action="store_true", help="stream the logs until the job ends")

    logs = sub.add_parser("logs", help="print (or --follow) the logs of a launched run")
    logs.add_argument("run")
    logs.add_argument("--address", help="dashboard URL (default $RAY_ADDRESS, else local)")
    logs.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")

    scale = sub.add_parser("scale", help="change the number of rollout actors of a running run")
    scale.add_argument("run")
    scale.add_argument("--actors", type=int, required=True, help="rollout actors wanted")
    scale.add_argument("--address", help=_ADDRESS_HELP)

    status = sub.add_parser("status", help="actors, steps, learner, replay of a running run")
    status.add_argument("run")
    status.add_argument("--json", action="store_true", help="one JSON object")
    status.add_argument("--address", help=_ADDRESS_HELP)

    stop = sub.add_parser(
        "stop", help="stop a running run gracefully (final checkpoint, flushed logs)"
    )
    stop.add_argument("run")
    stop.add_argument("--no-wait", action="store_true", help="return once the stop is asked")
    stop.add_argument("--address", help=_ADDRESS_HELP)


def _launch(args: argparse.Namespace) -> int:
    import dataclasses

    from deploy.config import ConfigError, die, load_config

    extra: dict[str, object] = {"run.name": args.name} if args.name else {}
    try:
        config = load_config(args.config, args.overrides, extra=extra)
    except ConfigError as exc:
        die(exc)
    if not os.path.isabs(config.run.logdir):
        # On the cluster a relative path lands in the job's unpacked working directory: one
        # per node, deleted with the job.
        die(
            ConfigError(
                "run.logdir",
                f"{config.run.logdir!r} is relative; a launched run needs an absolute path "
                "that every node can write and that outlives the job (a shared volume), "
                "e.g. --set run.logdir=/mnt/shared/runs",
            )
        )
    from deploy import launch
    from deploy.job import run_name

    # The job finds its cluster in RAY_ADDRESS; a name fixed here is what `offpg scale` uses.
    config = dataclasses.replace(
        config, run=dataclasses.replace(config.run, name=run_name(config), address="")
    )
    return launch.launch(
        config,
        address=args.address,
        working_dir=args.working_dir,
        pip=args.pip,
        wait=args.wait,
    )


def _tune(args: argparse.Namespace) -> int:
    from deploy.config import ConfigError, die, load_config
    from deploy.search import parse_search
    from deploy.tune import TuneOptions, run_tune, tune_name

    try:
        extra = _train_extra(args)
        extra.pop("run.name", None)  # --name names the experiment, its trials are named after it
        config = load_config(args.config, args.overrides, extra=extra)
        searches = tuple(parse_search(text) for text in args.search)
        trials = args.trials
        if trials is None:
            trials = 1 if any(s.kind == "grid" for s in searches) else 4
        if trials < 1:
            raise ConfigError("--trials", f"must be >= 1, got {trials}")
        if args.perturbation_interval < 1:
            raise ConfigError("--perturbation-interval", "must be >= 1 env step")
        if not 0 < args.quantile <= 0.5:
            raise ConfigError("--quantile", f"must be in (0, 0.5], got {args.quantile}")
        options = TuneOptions(
            name=tune_name(config, args.name),
            searches=searches,
            trials=trials,
            pbt=args.pbt,
            perturbation_interval=args.perturbation_interval,
            quantile=args.quantile,
        )
        rows = run_tune(config, options)
    except ConfigError as exc:
        die(exc)
    return 0 if rows and all(r.error is None for r in rows) else 1


def _train_extra(args: argparse.Namespace) -> dict[str, object]:
    extra: dict[str, object] = {}
    for flag, key in TRAIN_FLAGS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        if flag == "target_return":
            value = None if str(value).lower() in ("none", "off", "") else _number(value)
        extra[key] = value
    return extra


def _print_keys(rows: list) -> None:
    """`offpg config --keys`: each key with its neutral default, the value in the config shown
    (the CartPole recipe without --config) where it differs, what it allows and what it means."""
    print("KEY = DEFAULT [-> THIS CONFIG]  (ALLOWED)  MEANING")
    for row in rows:
        value = f" -> {row.value}" if row.value != row.default else ""
        print(f"{row.key} = {row.default}{value}  ({row.allowed})  {row.doc}")


def _number(text: str) -> float | str:
    try:
        return float(text)
    except ValueError:
        return text  # the config check names the key and the problem


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command in ("train", "config"):
        from deploy.config import ConfigError, die, field_docs, load_config

        try:
            extra = _train_extra(args) if args.command == "train" else {}
            config = load_config(args.config, args.overrides, extra=extra)
        except ConfigError as exc:
            die(exc)
        if args.command == "config":
            if args.keys:
                _print_keys(field_docs(config))
            else:
                print(config.to_toml())
            return 0
        from deploy.job import train

        program = argv is None  # run as the `offpg` program, not called from Python
        try:
            summary = train(config, exiting=program)
        except ConfigError as exc:
            die(exc)
        code = 0 if summary.ok else 1
        if program:
            _exit_now(code)
        return code
    if args.command == "tune":
        return _tune(args)
    if args.command == "launch":
        return _launch(args)
    if args.command == "logs":
        from deploy import launch

        return launch.logs(args.run, address=args.address, follow_logs=args.follow)
    if args.command in ("scale", "status", "stop"):
        from deploy import commands

        return commands.run_command(args.command, args)
    if args.command == "tensorboard":
        return _tensorboard(args.run_dir, args.port, args.host)
    if args.command == "plot":
        return _plot(args)
    parser.error(f"unknown command {args.command}")
    return 2


def _exit_now(code: int) -> None:
    """End the process without the interpreter's teardown.

    By now the run has closed everything it owns (logs flushed, checkpoint and summary.json
    written; an embedded Ray's processes end with this one, `deploy.session.shut_down`), and
    what is left is the interpreter unloading torch's and Ray's extension modules, which took
    seconds on a loaded 2-core machine (benchmarks/README.md, start-up); the user waits for none
    of it.
    """
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _plot(args: argparse.Namespace) -> int:
    from deploy.plot import describe, plot_runs

    try:
        curves = plot_runs(args.runs, args.out, tag=args.tag, weight=args.smooth, each=args.each)
    except (ValueError, KeyError, FileNotFoundError) as exc:
        print(f"offpg plot: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    for curve in curves:
        print(describe(curve))
    print(f"wrote {args.out}")
    return 0


def _is_loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: say so rather than resolve it
        return False


def _tensorboard(run_dir: str, port: int, host: str = "127.0.0.1") -> int:
    from tensorboard import program

    if not _is_loopback(host):
        print(
            f"offpg tensorboard: listening on {host}, beyond this machine: TensorBoard has no "
            "authentication, so whoever reaches this port reads every run under "
            f"{run_dir}; an SSH tunnel (ssh -L {port}:127.0.0.1:{port} THIS_HOST) keeps it "
            "private",
            file=sys.stderr,
        )
    board = program.TensorBoard()
    board.configure(argv=[None, "--logdir", run_dir, "--host", host, "--port", str(port)])
    url = board.launch().rstrip("/")
    # The custom-scalars dashboard each run writes (deploy.metrics.LAYOUT), unsmoothed.
    print(
        f"TensorBoard at {url}/ (logdir {run_dir}); the offpg dashboard, unsmoothed: "
        f"{url}/#custom_scalars&_smoothingWeight=0 (untick 'Ignore outliers in chart "
        "scaling' there to see every point); Ctrl-C stops it",
        flush=True,
    )
    try:
        import time

        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
