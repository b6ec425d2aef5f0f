"""Stage entry points: ``python -m flows.stages.<name>``, each run as a Prefect flow (see dvc.yaml)."""
