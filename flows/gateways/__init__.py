"""The one door to each external system: Prefect, DVC, git, NVML, and the processes a helper must end with.

Imports flows.core and flows.contracts only; everything above reaches those systems through here.
"""
