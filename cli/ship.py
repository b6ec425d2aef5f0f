"""`tunedeck promote | rollback | registry | predict`: each runs as a Prefect flow run when a server is
up (flows.stages.orchestration.run_stage), and plainly when not."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flows.contracts.settings import Settings

PROMOTE_REJECTED = 1  # exit status of a rejected promotion: not an error, but a script must see it


def run_ship_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run one shipping command in the project root (the current folder)."""
    from flows.core.params import load_params
    from flows.ship import gate
    from flows.stages.entry import setup_logging
    from flows.stages.orchestration import run_stage

    root = Path.cwd()
    if args.command == "registry":
        return audit_chain(root, args.audit) if args.audit else show_registry(root)
    if args.command == "verify":
        return verify_version(root, args.version)
    setup_logging()
    params = load_params("params.yaml")
    if args.command == "promote":
        summary = run_stage("promote", lambda: gate.promote_clone(root, params, args.force), {"force": args.force}, ["stage:promote"],
                            settings)
        if summary.get("version"):  # the verdict itself the gate printed ("promotion gate: ...")
            print(f"{summary['version']} is prod ({summary['tags']}); `dvc artifacts get . model --stage prod` fetches it.")
        return 0 if summary["promoted"] else PROMOTE_REJECTED
    if args.command == "rollback":
        summary = run_stage("rollback", lambda: gate.rollback(root, args.to, params), {"to": args.to}, ["stage:rollback"],
                            settings)
        print(f"{summary['prod']} is prod again (was {summary['was']}; tag {summary['tag']}).")
        return 0
    if args.command == "explain":
        from flows.ship.explain import explain_command

        parameters = {"model": args.model, "images": [str(i) for i in args.images], "out": str(args.out)}
        run_stage("explain", lambda: explain_command(root, params, args.model, args.images, args.out, args.device),
                  parameters, ["stage:explain"], settings)
        return 0
    if args.command == "monitor":
        if args.errors:
            from flows.ship.monitor import errors_table, read_history

            print(errors_table(read_history(root)))
            return 0
        if args.folder is None:
            print("tunedeck monitor: name the folder of new images to score (or --errors for the estimators' record).",
                  file=sys.stderr)
            return 2
        return monitor_command(root, params, args.folder, args.device, settings)
    from flows.ship.predict import predict_command

    parameters = {"model": args.model, "input": str(args.input), "out": str(args.out), "backend": args.backend,
                  "prior_shift": args.prior_shift}
    summary = run_stage("predict", lambda: predict_command(root, params, args.model, args.input, args.out, args.backend, args.device,
                                                           args.prior_shift),
                        parameters, ["stage:predict"], settings)
    return 0 if summary else 1


def verify_version(root: Path, version: str) -> int:
    """`tunedeck verify vX`: print what held; each mismatch is one sentence on stderr, and exit 1."""
    from flows.ship.verify import verify

    held, problems = verify(root, version)
    for line in held:
        print(f"ok: {line}")
    for problem in problems:
        print(f"tunedeck verify: {problem}.", file=sys.stderr)
    if not problems:
        print(f"{version} is the model and data its record names.")
    return 1 if problems else 0


def audit_chain(root: Path, version: str) -> int:
    """`tunedeck registry --audit vX`: who registered it, made it prod or rolled back to it, when, why, on what."""
    from flows.ship import audit, registry

    if version not in [v.version for v in registry.versions(root)]:
        print(f"tunedeck registry: there is no registered version {version}: `tunedeck registry` lists them.", file=sys.stderr)
        return 2
    for line in audit.chain(root, version):
        print(line)
    return 0


def show_registry(root: Path) -> int:
    """Print the versions (prod marked) and the history, newest first."""
    from flows.ship import registry

    versions = registry.versions(root)
    if not versions:
        print("no model version is registered yet: `tunedeck promote` registers the first.")
        return 0
    prod = registry.prod(root)
    for v in versions:
        mark = "  <- prod" if prod and v.version == prod.version else ""
        print(f"{v.version:<10} {v.commit[:12]}{mark}")
    print("\nhistory (newest first):")
    for e in registry.history(root)[:20]:
        what = f"{e.version} -> {e.stage}" if e.event == "assignment" else f"{e.version} registered"
        print(f"  {e.at:%Y-%m-%d %H:%M:%S}  {what:<22} {e.message[:70]}")
    return 0


def monitor_command(root: Path, params, folder: Path, device: str | None, settings: Settings) -> int:
    """`tunedeck monitor DIR`: one batch, recorded in monitor/ and (with a server) as Prefect events."""
    from flows.gateways import prefect_api
    from flows.ship.monitor import errors_summary, estimate_summary, monitor_batch, read_history, summary
    from flows.stages.orchestration import run_stage

    def work() -> dict:
        url = prefect_api.api_url()
        batch = monitor_batch(root, params, folder, device, api_url=url if url and prefect_api.healthy(url, timeout=1.0) else None,
                              host_name=settings.host)
        flagged = {s.name: round(s.value, 4) for s in batch.statistics}
        record = errors_summary(read_history(root)) if batch.accuracy is not None else None
        return {"summary": summary(batch), "estimates": estimate_summary(batch), "errors": record, "drifted": batch.drifted, "streak": batch.streak, "triggered": batch.triggered,
                "model_version": batch.model_version, **flagged}

    result = run_stage("monitor", work, {"folder": str(folder)}, ["stage:monitor"], settings)
    print(result["summary"])
    print(result["estimates"])
    if result.get("errors"):
        print(result["errors"])
    return 0
