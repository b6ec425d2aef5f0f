"""The ``tunedeck`` command: demo, the local Prefect server, workers, shipping models, and the dashboard."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flows.contracts.settings import Settings
from flows.core.errors import TunedeckError


def build_parser() -> argparse.ArgumentParser:
    """The command line, one sub-command per job."""
    parser = argparse.ArgumentParser(prog="tunedeck", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="offline transfer-learning demo: pretrain on digits 0-4, fine-tune on 5-9")
    demo.add_argument("--port", type=int, default=4200, help="port of the local Prefect server it starts (default 4200)")
    demo.add_argument("--seeds", type=int, default=5, help="seeds per arm, at least 2 (default 5)")
    demo.add_argument("--jobs", type=int, help="experiments at a time (default: 2 where there are 2 cores)")
    demo.add_argument("--source-epochs", type=int, default=8, metavar="N",
                      help="epochs of the source backbone (default 8, as the README's figures; fewer: a quicker, weaker one)")
    srv = sub.add_parser("server", help="the Prefect server (SQLite under .tunedeck/, or a team's PostgreSQL)")
    srv.add_argument("action", choices=["start", "stop", "status"])
    srv.add_argument("--port", type=int, default=4200, help="port (default 4200)")
    srv.add_argument("--host", default="127.0.0.1", help="address to serve on; beyond 127.0.0.1 needs PREFECT_SERVER_API_AUTH_STRING")
    srv.add_argument("--database", metavar="URL", help="a shared server's PostgreSQL: postgresql+asyncpg://USER:PASSWORD@HOST:5432/DB "
                     "(default: PREFECT_SERVER_DATABASE_CONNECTION_URL if set, which keeps the password off the command line; "
                     "else SQLite under .tunedeck/)")
    sub.add_parser("deploy", help="create the work pool and the deployments of prefect.yaml on the Prefect server")
    worker = sub.add_parser("worker", help="a Prefect worker on this host: one run per free GPU (or one on the CPU)")
    worker.add_argument("--pool", default="local", help="work pool (default: local)")
    worker.add_argument("--gpus", help="GPU indices this worker hands out, e.g. 0,1 (default: CPU only)")
    worker.add_argument("--git-pull", action="store_true",
                        help="git pull --ff-only this clone before each run (for remote GPU hosts)")
    worker.add_argument("--price-per-hour", type=float, metavar="P",
                        help="what a device-hour (a GPU, or the CPU) of this host costs: each run's cost, beside its energy")
    worker.add_argument("--cpu-slots", type=int, default=1, metavar="N",
                        help="without --gpus: runs at once on the CPU, each with its share of the cores (default 1)")
    add_ship_commands(sub)
    fed = sub.add_parser("federated", help="federated fine-tuning (FedAvg): deploy silos, or run the coordinator here")
    fed.add_argument("action", choices=["deploy", "run"], help="deploy: pools silo-NAME + deployments; run: the coordinator")
    fed.add_argument("silos", nargs="*", metavar="NAME", help="deploy: the silos' names")
    fed.add_argument("--config", type=Path, default=Path("federated.yaml"), help="run: the settings file (default federated.yaml)")
    plan = sub.add_parser("plan", help="each host's expected time and cost for a run of the current params, from past runs")
    plan.add_argument("--deadline", metavar="DURATION", help="e.g. 45m or 2h: pick the cheapest host that meets it")
    plan.add_argument("-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="a param override, as dvc exp run -S takes it (repeatable), e.g. train.epochs=20")
    plan.add_argument("--run", action="store_true", help="start the pipeline deployment on the picked host")
    dash = sub.add_parser("dash", help="the terminal dashboard: GPUs, runs, deployments, experiments")
    dash.add_argument("--demo", action="store_true", help="fake GPUs, runs and deployments: no GPU or server needed")
    dash.add_argument("--readonly", action="store_true", help="hide every action (cancel, retry, pause, run)")
    dash.add_argument("--refresh", type=float, default=1.0, metavar="SECONDS", help="telemetry refresh (default 1)")
    dash.add_argument("--replay", type=Path, metavar="FILE", help="replay a recording made with --record")
    dash.add_argument("--record", type=Path, metavar="FILE", help="record what the providers return to FILE")
    return parser


def add_ship_commands(sub) -> None:
    """The sub-commands that ship and watch a model: promote, rollback, registry, verify, predict, explain, monitor."""
    promote = sub.add_parser("promote", help="the promotion gate: this clone's trained model becomes prod if no worse than prod")
    promote.add_argument("--force", action="store_true", help="promote even when the gate rejects it (recorded as forced)")
    rollback = sub.add_parser("rollback", help="make an earlier registered model version prod again")
    rollback.add_argument("--to", required=True, metavar="VERSION", help="a registered version, e.g. v0.2.0")
    registry = sub.add_parser("registry", help="the registered model versions, which is prod, and the history")
    registry.add_argument("--audit", metavar="VERSION", help="the version's chain: who registered it, made it prod or "
                          "rolled back to it, when, why, and on which data, code and params")
    verify = sub.add_parser("verify", help="recompute a registered version's model sha256 and data md5 against its record")
    verify.add_argument("version", metavar="VERSION", help="a registry version, e.g. v0.2.0 (`tunedeck registry` lists them)")
    predict = sub.add_parser("predict", help="label a folder of images with a model: one row per image")
    predict.add_argument("--model", default="prod", help="prod (default), a registry version vX.Y.Z, or a .safetensors file")
    predict.add_argument("--input", required=True, type=Path, metavar="DIR", help="folder of images (searched recursively)")
    predict.add_argument("--out", required=True, type=Path, metavar="FILE", help="FILE.parquet or FILE.csv")
    predict.add_argument("--backend", choices=["torch", "onnx", "openvino", "onnx-int8", "openvino-int8"], default="torch",
                         help="torch (default); onnx or openvino run the export stage's ONNX model; -int8: its int8 model")
    predict.add_argument("--device", help="cpu, cuda, cuda:N (default: params.yaml base.device)")
    predict.add_argument("--prior-shift", action="store_true",
                         help="correct the predictions for the images' own class mix (EM of Saerens et al.), printed")
    explain = sub.add_parser("explain", help="a model's top classes for images and a Grad-CAM overlay of why")
    explain.add_argument("images", nargs="+", type=Path, metavar="IMAGE", help="image files")
    explain.add_argument("--model", default="prod", help="prod (default), a registry version vX.Y.Z, or a .safetensors file")
    explain.add_argument("--out", type=Path, default=Path("explain"), metavar="DIR", help="where the overlays go (default explain/)")
    explain.add_argument("--device", help="cpu, cuda, cuda:N (default: params.yaml base.device)")
    monitor = sub.add_parser("monitor", help="drift of a folder of new images against the prod model's reference")
    monitor.add_argument("folder", type=Path, nargs="?", metavar="DIR",
                         help="one batch of new images (sub-folders named as classes: labelled)")
    monitor.add_argument("--errors", action="store_true",
                         help="print the label-free estimators' errors on the labelled batches monitored so far, and exit")
    monitor.add_argument("--device", help="cpu, cuda, cuda:N (default: params.yaml base.device)")


def server_command(action: str, port: int, host: str = "127.0.0.1", database: str | None = None) -> int:
    """tunedeck server start|stop|status."""
    from flows.gateways import prefect_api
    from flows.host import server

    if action == "start":
        url = server.start(port, host=host, database_url=database)
        stored = server.database()
        print(f"Prefect server running at {url.removesuffix('/api')}{f' on {stored}' if stored else ''} "
              "(stages report to it; `tunedeck server stop` stops it).")
        if port != server.DEFAULT_PORT:
            print(f"For the prefect CLI: export PREFECT_API_URL={url}")
    elif action == "stop":
        print("Prefect server stopped." if server.stop() else "No Prefect server of this project was running.")
    else:
        url, stored = prefect_api.local_url(), server.database()
        print(f"Prefect server running at {url}{f' on {stored}' if stored else ''}." if url
              else "Prefect server not running (`tunedeck server start`).")
        return 0 if url else 3
    return 0


WARM_COMMANDS = ("promote", "rollback", "predict", "monitor", "explain")
"""The commands that import torch: run in the project's warm server (flows.stages.warm), started if none is up."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script; bad input is one sentence on stderr and exit 2."""
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.read()  # once, here: every verb gets them from this
        if args.command == "demo":
            from flows.demo.run import run_demo

            if args.seeds < 2 or (args.jobs is not None and args.jobs < 1) or args.source_epochs < 1:
                raise TunedeckError("--seeds must be 2 or more (an interval needs a spread), --jobs and --source-epochs "
                                    "1 or more.")
            run_demo(settings, args.port, tuple(range(1, args.seeds + 1)), args.jobs, args.source_epochs)
            return 0
        if args.command == "server":
            return server_command(args.action, args.port, args.host, args.database)
        if args.command == "deploy":
            from flows.host.deploy import deploy

            names = deploy(settings)
            print(f"deployed {', '.join(names)} to the work pool 'local'; `prefect deployment ls` lists them.")
            return 0
        if args.command == "worker":
            from flows.host.worker import run_worker

            if args.price_per_hour is not None:
                if not 0 <= args.price_per_hour < float("inf"):
                    raise TunedeckError(f"--price-per-hour {args.price_per_hour}: give a price of 0 or more.")
                settings = settings.but(price_per_hour=args.price_per_hour)
            return run_worker(settings, args.pool, args.gpus, args.git_pull, args.cpu_slots)
        if args.command == "plan":
            from cli.plan import plan_command

            return plan_command(args.deadline, args.overrides, args.run)
        if args.command == "federated":
            from cli.federated import federated_command

            return federated_command(args.action, args.silos, args.config)
        if args.command in ("promote", "rollback", "registry", "predict", "monitor", "verify", "explain"):
            from cli.ship import run_ship_command
            from flows.stages.warm import hand_over

            if argv is None and args.command in WARM_COMMANDS and (status := hand_over(settings, "cli.main")) is not None:
                return status

            return run_ship_command(args, settings)
        from tui.app import run_dashboard

        return run_dashboard(args.demo, args.readonly, args.refresh, args.replay, args.record, settings.host)
    except TunedeckError as exc:
        print(f"tunedeck: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tunedeck: interrupted.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
