"""Stage entry points: ``python -m flows.stages.<name>``, each run as a Prefect flow (see dvc.yaml).

Beside them, what makes a stage a flow run (orchestration.py, and reporter.py, the process that
holds it) and the warm stage server of a pipeline run (warm.py). Imports gateways, core and contracts.
"""
