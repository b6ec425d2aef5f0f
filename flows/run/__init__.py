"""One run of the pipeline: its flows, workspace, GPU slot, labels, DVC session use, and runs over several nodes.

May import flows.ship, flows.stages, gateways, core and contracts.
"""
