"""tunedeck flows: the ML core (``flows.core``) and the Prefect layer around it, in folders by concern.

From the top: demo and federated, host, run, ship, stages, gateways, core, contracts; each imports
only the folders below it (import-linter's layers contract in pyproject.toml; docs/design.md).
"""
