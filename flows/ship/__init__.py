"""After training: the promotion gate, the model registry (GTO tags), predict, and the drift monitor.

May import flows.stages, gateways, core and contracts.
"""
