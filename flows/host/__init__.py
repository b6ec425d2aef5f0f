"""One host's processes: the local Prefect server, `tunedeck worker`, deployments, host telemetry, pull steps.

May import flows.run, flows.ship, flows.stages, gateways, core and contracts; never tui or cli.
"""
