"""The one door to each external system: Prefect, DVC, git, NVML.

Imports flows.core and flows.contracts only; everything above reaches those systems through here.
"""
