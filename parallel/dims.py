"""Parallel degrees -> one named DeviceMesh (torchtitan's ParallelDims idea).

Axis names: ``dp_replicate``, ``dp_shard``, ``tp``, ``pp``, ``ep``, ``cp``, ``etp`` (Engram tables).
This module knows nothing of models (../STYLE rule 1): model-dependent checks (heads, experts,
layers)
live in the model family's parallelize function.
"""

from __future__ import annotations

from dataclasses import dataclass

AVAILABLE = {"dp_replicate", "dp_shard"}  # axes the trainer can apply today


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    ep: int
    cp: int
    etp: int
    world_size: int

    @classmethod
    def from_config(cls, cfg, world_size: int) -> ParallelDims:
        dims = cls(
            cfg.data_parallel_replicate_degree,
            cfg.data_parallel_shard_degree,
            cfg.tensor_parallel_degree,
            cfg.pipeline_parallel_degree,
            cfg.expert_parallel_degree,
            cfg.context_parallel_degree,
            cfg.engram_table_parallel_degree,
            world_size,
        )
        dims.validate()
        return dims

    def validate(self) -> None:
        named = {
            "parallelism.data_parallel_replicate_degree": self.dp_replicate,
            "parallelism.tensor_parallel_degree": self.tp,
            "parallelism.pipeline_parallel_degree": self.pp,
            "parallelism.expert_parallel_degree": self.ep,
            "parallelism.context_parallel_degree": self.cp,
            "parallelism.engram_table_parallel_degree": self.etp,
        }
        for name, value in named.items():
            if value < 1:
                raise ValueError(f"{name}={value}: must be >= 1")
        others = self.dp_replicate * self.tp * self.pp * self.cp
        if self.dp_shard == -1:
            if self.world_size % others:
                raise ValueError(
                    f"world size {self.world_size} is not divisible by "
                    f"dp_replicate*tp*pp*cp={others}; "
                    "fix the parallelism degrees or the number of processes"
                )
            self.dp_shard = self.world_size // others
        if self.dp_shard < 1:
            raise ValueError(
                f"parallelism.data_parallel_shard_degree={self.dp_shard}: must be >= 1 or -1"
            )
        if others * self.dp_shard != self.world_size:
            raise ValueError(
                f"dp_replicate({self.dp_replicate}) * dp_shard({self.dp_shard}) * tp({self.tp}) * "
                f"pp({self.pp}) * cp({self.cp}) = {others * self.dp_shard} != world size "
                f"{self.world_size}"
            )
        if self.ep > 1 and self.dp_degree % self.ep:
            raise ValueError(
                f"parallelism.expert_parallel_degree={self.ep} must divide the data-parallel "
                f"degree {self.dp_degree} (experts are sharded over data-parallel ranks)"
            )
        if self.etp > 1 and self.etp != self.dp_degree:
            raise ValueError(
                f"parallelism.engram_table_parallel_degree={self.etp}: the table group is the "
                f"data-parallel ranks; set it to {self.dp_degree} (dp_replicate * dp_shard) or 1"
            )
        pending = {"parallelism.context_parallel_degree": self.cp}
        pending = {k: v for k, v in pending.items() if v > 1}
        if pending:
            raise ValueError(
                f"{', '.join(f'{k}={v}' for k, v in pending.items())}: context parallelism is not "
                "in the trainer yet (reserved for long-context extension); use the data, tensor, "
                "pipeline, expert and Engram-table degrees"
            )

    @property
    def dp_degree(self) -> int:
        return self.dp_replicate * self.dp_shard

    def dp_group(self, mesh):
        """The group of all data-parallel ranks (None: the whole world)."""
        if self.dp_degree == self.world_size:
            return None
        return mesh["dp_replicate", "dp_shard"]._flatten("dp").get_group()

    def build_mesh(self, device_type: str):
        """Axes (pp, dp_replicate, dp_shard, tp): pipeline outermost, tensor parallel innermost
        (the ranks of one node)."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(
            device_type,
            (self.pp, self.dp_replicate, self.dp_shard, self.tp),
            mesh_dim_names=("pp", "dp_replicate", "dp_shard", "tp"),
        )
