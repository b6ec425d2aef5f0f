"""Where one run over several hosts puts this host: the placement a pipeline run hands each host's
train stage through its settings (flows.run.multinode sets them, flows.stages.train reads them).

Here, not in flows.core.distributed, because the pipeline run's own process needs it and never
trains: importing torch there cost every pipeline run about 1.5 s of CPU (python -X importtime).
"""

from __future__ import annotations

from dataclasses import dataclass

from flows.contracts.settings import Settings


@dataclass(frozen=True)
class Placement:
    """This host's place in one run over several hosts: node_rank of nodes, node 0's rendezvous at master."""

    nodes: int
    node_rank: int
    master: str  # host:port of the c10d store torchrun serves on node 0

    @classmethod
    def from_settings(cls, settings: Settings) -> Placement | None:
        """The placement a process's settings carry, None when they carry none."""
        if not settings.ddp_master or settings.ddp_nodes is None or settings.ddp_node_rank is None:
            return None
        return cls(settings.ddp_nodes, settings.ddp_node_rank, settings.ddp_master)

    def settings(self) -> dict[str, object]:
        """The settings that carry this placement to a train stage (Settings.but(**placement.settings()))."""
        return {"ddp_nodes": self.nodes, "ddp_node_rank": self.node_rank, "ddp_master": self.master}

    def torchrun_args(self, nproc: int, join_s: int) -> list[str]:
        """torchrun's arguments: a static rendezvous (node ranks as placed, so node 0 holds rank 0) on node 0's store."""
        host, port = self.master.rsplit(":", 1)
        return [f"--nnodes={self.nodes}", f"--node_rank={self.node_rank}", f"--nproc_per_node={nproc}",
                "--rdzv_backend=static", f"--master_addr={host}", f"--master_port={port}", f"--rdzv_conf=timeout={join_s}"]
