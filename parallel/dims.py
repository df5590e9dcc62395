"""Parallel degrees -> one named DeviceMesh (torchtitan's ParallelDims idea).

Every axis is built here: the main mesh ``(pp, dp_replicate, dp_shard, cp, tp)`` (pipeline
outermost, tensor parallel innermost: the ranks of one node), the expert mesh
``(pp, ep_replicate, ep, tp)`` over the same ranks, the data-parallel group and the
context-parallel group. Data- and context-parallel ranks together hold different tokens
(``batch_degree``): FSDP shards over ``dp_shard x cp``, experts over groups of them, and the
Engram tables are row-sharded over all of them (``engram_shard``; ``etp`` is expert *tensor*
parallelism in torchtitan, so that name is not used).

This module knows nothing of models (parallelism is applied to them from outside):
model-dependent checks (heads, experts, layers) live in the model family's parallel plan.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    tp: int
    pp: int
    ep: int
    cp: int
    engram_shard: int
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
            cfg.engram_shard_degree,
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
            "parallelism.engram_shard_degree": self.engram_shard,
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
        if self.ep > 1 and self.batch_degree % self.ep:
            raise ValueError(
                f"parallelism.expert_parallel_degree={self.ep} must divide the data-parallel x "
                f"context-parallel degree {self.batch_degree} (experts are sharded over the "
                "ranks holding different tokens)"
            )
        if self.engram_shard > 1 and self.engram_shard != self.batch_degree:
            raise ValueError(
                f"parallelism.engram_shard_degree={self.engram_shard}: the tables are sharded over "
                "the ranks that hold different tokens (data parallel x context parallel); set it "
                f"to {self.batch_degree} (dp_replicate * dp_shard * cp) or 1"
            )

    @property
    def dp_degree(self) -> int:
        return self.dp_replicate * self.dp_shard

    @property
    def batch_degree(self) -> int:
        """Ranks holding different tokens of a step: data parallel x context parallel. Gradients
        are averaged over them (each rank's loss is the mean over its own tokens)."""
        return self.dp_degree * self.cp

    def cp_rank(self, rank: int) -> int:
        """The context-parallel index of global ``rank``: which chunks of every row it holds."""
        return (rank // self.tp) % self.cp

    def dp_rank(self, rank: int) -> int:
        """The data-parallel index of global ``rank`` (its loader shard): tp and cp peers, and the
        stages of one pipeline, share it."""
        return (rank // (self.tp * self.cp)) % self.dp_degree

    def build_mesh(self, device_type: str):
        """The main mesh ``(pp, dp_replicate, dp_shard, cp, tp)``."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(
            device_type,
            (self.pp, self.dp_replicate, self.dp_shard, self.cp, self.tp),
            mesh_dim_names=("pp", "dp_replicate", "dp_shard", "cp", "tp"),
        )

    def build_ep_mesh(self, device_type: str):
        """``(pp, ep_replicate, ep, tp)``: the ranks holding different tokens (the main mesh's
        ``dp_replicate x dp_shard x cp``, flattened in that order) split into expert groups.
        An ep group is ``ep`` consecutive such ranks, so with context parallelism (inner to
        ``dp_shard``) it stays inside a node, as torchtitan's EP over ``dp_shard x cp``."""
        from torch.distributed.device_mesh import init_device_mesh

        return init_device_mesh(
            device_type,
            (self.pp, self.batch_degree // self.ep, self.ep, self.tp),
            mesh_dim_names=("pp", "ep_replicate", "ep", "tp"),
        )

    def dp_group(self, mesh):
        """The group of all data-parallel ranks (None: the whole world)."""
        if self.dp_degree == self.world_size:
            return None
        return mesh["dp_replicate", "dp_shard"]._flatten("dp").get_group()

    def cp_group(self, mesh):
        """The ``cp`` group (None without context parallelism)."""
        return mesh["cp"].get_group() if self.cp > 1 else None

    def batch_group(self, mesh):
        """The group of every rank holding different tokens (dp x cp; None: the whole world)."""
        if self.batch_degree == self.world_size:
            return None
        if self.cp == 1:
            return self.dp_group(mesh)
        return mesh["dp_replicate", "dp_shard", "cp"]._flatten("batch").get_group()

    def fsdp_mesh(self, mesh):
        """The mesh FSDP shards over: ``dp_shard`` and ``cp`` flattened (context-parallel ranks
        hold different tokens, so they share the parameter shards like data-parallel ones), with
        ``dp_replicate`` outside it for HSDP."""
        if self.cp == 1:
            return mesh["dp_replicate", "dp_shard"] if self.dp_replicate > 1 else mesh["dp_shard"]
        flat = mesh["dp_shard", "cp"]._flatten("dp_shard_cp")
        return mesh["dp_replicate", "dp_shard_cp"] if self.dp_replicate > 1 else flat

    def layout(self) -> dict[str, int]:
        return {
            "dp_replicate": self.dp_replicate,
            "dp_shard": self.dp_shard,
            "tp": self.tp,
            "pp": self.pp,
            "cp": self.cp,
            "ep": self.ep,
            "engram_shard": self.engram_shard,
        }
