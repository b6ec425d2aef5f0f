"""Where one run over several hosts puts this host: the placement a pipeline run hands each host's
train stage through the environment (flows.run.multinode writes it, flows.stages.train reads it).

Here, not in flows.core.distributed, because the pipeline run's own process needs it and never
trains: importing torch there cost every pipeline run about 1.5 s of CPU (python -X importtime).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

PLACEMENT_VARIABLES = ("TUNEDECK_DDP_NODES", "TUNEDECK_DDP_NODE_RANK", "TUNEDECK_DDP_MASTER")
"""How the pipeline run that placed a run over several hosts tells each host's train stage its place."""


@dataclass(frozen=True)
class Placement:
    """This host's place in one run over several hosts: node_rank of nodes, node 0's rendezvous at master."""

    nodes: int
    node_rank: int
    master: str  # host:port of the c10d store torchrun serves on node 0

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Placement | None:
        """The placement the environment carries, None when it carries none."""
        env = os.environ if env is None else env
        if not env.get("TUNEDECK_DDP_MASTER"):
            return None
        return cls(int(env["TUNEDECK_DDP_NODES"]), int(env["TUNEDECK_DDP_NODE_RANK"]), env["TUNEDECK_DDP_MASTER"])

    def env(self) -> dict[str, str]:
        """The variables that carry this placement to a train stage."""
        return dict(zip(PLACEMENT_VARIABLES, (str(self.nodes), str(self.node_rank), self.master), strict=True))

    def torchrun_args(self, nproc: int, join_s: int) -> list[str]:
        """torchrun's arguments: a static rendezvous (node ranks as placed, so node 0 holds rank 0) on node 0's store."""
        host, port = self.master.rsplit(":", 1)
        return [f"--nnodes={self.nodes}", f"--node_rank={self.node_rank}", f"--nproc_per_node={nproc}",
                "--rdzv_backend=static", f"--master_addr={host}", f"--master_port={port}", f"--rdzv_conf=timeout={join_s}"]
