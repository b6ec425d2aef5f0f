"""`tunedeck federated deploy NAME...` and `tunedeck federated run --config FILE`."""

from __future__ import annotations

from pathlib import Path

from flows.core.errors import TunedeckError


def federated_command(action: str, silos: list[str], config: Path) -> int:
    """Deploy the silos and the coordinator, or run the coordinator in this process (it reports to the server)."""
    if action == "deploy":
        from flows.federated.deploy import deploy_federated

        names = deploy_federated(silos)
        print(f"deployed {', '.join(names)}; start each silo's worker on its host with "
              "TUNEDECK_SILO_DATA=FOLDER tunedeck worker --pool silo-NAME.")
        return 0
    if silos:
        raise TunedeckError("`tunedeck federated run` takes no silo names: list them under silos: in the --config file.")
    from flows.contracts.federated import load_federated
    from flows.federated.coordinator import coordinator

    summary = coordinator(load_federated(config))
    print(f"federated run done: {summary['rounds']} rounds, global test accuracy {summary['global_acc']:.4f}, "
          f"model in {summary['model']}.")
    return 0
