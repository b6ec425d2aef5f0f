"""`tunedeck federated deploy NAME...`: one work pool and one silo deployment per silo, and the coordinator.

Silos are a site's configuration, not the project's: so they are not in prefect.yaml (whose
`prefect deploy --all` would then need every site's pool on every server). Each silo gets the
work pool `silo-NAME` and the deployment `silo/NAME`; the coordinator, `federated/coordinator`
on the pool `local`, is prefect.yaml's (`tunedeck deploy` deploys it too). All use prefect.yaml's
pull step (the worker's own clone). A site starts
its worker with its data folder, which only that host reads:

    TUNEDECK_SILO_DATA=/secure/images tunedeck worker --pool silo-NAME
"""

from __future__ import annotations

import re
from pathlib import Path

from flows.contracts.settings import Settings
from flows.core.errors import TunedeckError
from flows.gateways import prefect_api
from flows.host.deploy import DEFAULT_POOL, check_deployed, deploy_flow, ensure_pool, reachable

SILO_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,40}$")


def pool_of(silo: str) -> str:
    """The work pool of a silo."""
    return f"silo-{silo}"


def deploy_federated(silos: list[str], root: Path | None = None) -> list[str]:
    """Create the silos' pools and deployments and the coordinator's; the deployment names."""
    root = (root or Path.cwd()).resolve()
    bad = [s for s in silos if not SILO_NAME.match(s)]
    if not silos or bad:
        raise TunedeckError(f"silo name '{bad[0] if bad else ''}' is not usable: name silos with lower-case letters, "
                            "digits and dashes, e.g. `tunedeck federated deploy site-a site-b`.")
    reachable()
    names = []
    for silo in silos:
        ensure_pool(pool_of(silo))
        deploy_flow(root, "flows/federated/silo.py:silo", silo, pool_of(silo))
        names.append(f"silo/{silo}")
    ensure_pool(DEFAULT_POOL)
    proc = prefect_api.cli("deploy", "--name", "coordinator", cwd=root, env=Settings(project=root).env())  # prefect.yaml's
    check_deployed(proc, "--name coordinator")
    return [*names, "federated/coordinator"]
