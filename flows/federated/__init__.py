"""Federated averaging: the coordinator flow, the silo flow, their rounds and their exchange folder.

May import flows.host (deployments), flows.run, flows.ship, gateways, core and contracts.
"""
