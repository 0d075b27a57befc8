"""A tensor-parallel group: this process's rank, the group's size, and the two collectives the
layers need (all-reduce after a row-parallel layer, all-gather of the vocabulary's logits).
Size 1 is a plain value that never imports or touches torch.distributed: the single-device path
pays nothing. Gloo on CPU, NCCL on CUDA (`init_group`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TPGroup:
    rank: int = 0
    size: int = 1
    group: object | None = None  # torch.distributed's ProcessGroup (None: the default, or size 1)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place (x itself at size 1)."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        dist.all_reduce(x, group=self.group)  # type: ignore[arg-type]
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's `x` side by side along `dim`, in rank order."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x, group=self.group)  # type: ignore[arg-type]
        return torch.cat(parts, dim=dim)


SINGLE = TPGroup()
_current = SINGLE


@dataclass(frozen=True)
class Stage:
    """A pipeline-parallel rank: which stage of `size` it is. Stage i holds layers
    [i L / size, (i + 1) L / size); the first the embedding, the last the final norm and head
    (and, when the head is tied, the embedding's table too)."""

    rank: int = 0
    size: int = 1
    world_rank: int = (
        0  # this process's rank among all (stage x tensor-parallel size + its TP rank)
    )
    stride: int = 1  # the tensor-parallel size: the same TP rank of the next stage is this far

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.size - 1

    def layers(self, num_layers: int) -> range:
        if self.size > num_layers:
            raise ValueError(f"pipeline_parallel_size {self.size} exceeds the model's {num_layers} layers")  # fmt: skip
        return range(self.rank * num_layers // self.size, (self.rank + 1) * num_layers // self.size)

    def send(self, tensors: list[torch.Tensor]) -> list:
        """To the next stage, without waiting (handles to wait on)."""
        import torch.distributed as dist

        return [dist.isend(t.contiguous(), dst=self.world_rank + self.stride) for t in tensors]

    def receive(self, tensors: list[torch.Tensor]) -> None:
        """From the previous stage, into `tensors` (their shapes are known to both)."""
        import torch.distributed as dist

        for t in tensors:
            dist.recv(t, src=self.world_rank - self.stride)


ONE_STAGE = Stage()
_stage = ONE_STAGE


def current_stage() -> Stage:
    return _stage


def set_stage(stage: Stage) -> None:
    global _stage
    _stage = stage


def current() -> TPGroup:
    """This process's group: what the layer factory shards for (SINGLE unless a rank's
    worker set it, before building its model)."""
    return _current


def set_current(group: TPGroup) -> None:
    global _current
    _current = group


def init_group(rank: int, size: int, init_method: str, backend: str | None = None) -> TPGroup:
    """Join a group of `size` processes at `init_method` (tcp://host:port); the backend is
    NCCL where CUDA is available, else Gloo."""
    if size == 1:
        return SINGLE
    init_world(rank, size, init_method, backend)
    return TPGroup(rank, size, None)


def init_world(rank: int, size: int, init_method: str, backend: str | None = None) -> None:
    import torch.distributed as dist

    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size)


def split(full: int, size: int, rank: int, what: str, unit: int = 1) -> tuple[int, int]:
    """(start, length) of rank's even share of `full` rows in units of `unit` (a head's
    dimension); a ValueError naming `what` when it does not divide."""
    if full % (size * unit):
        raise ValueError(
            f"{what}: {full // unit} {'heads' if unit > 1 else 'rows'} do not split over "
            f"tensor_parallel_size {size}; choose a size that divides them"
        )
    length = full // size
    return rank * length, length


def kv_split(kv_heads: int, head_dim: int, size: int, rank: int) -> tuple[int, int]:
    """(start, length) of rank's K (or V) rows: an even share of the KV heads, or, when there
    are fewer KV heads than ranks, the one head its query heads attend with (replicated)."""
    if kv_heads >= size:
        return split(kv_heads * head_dim, size, rank, "num_key_value_heads", head_dim)
    if size % kv_heads:
        raise ValueError(
            f"num_key_value_heads: {kv_heads} KV heads cannot be replicated evenly over "
            f"tensor_parallel_size {size}; choose a size they divide"
        )
    head = rank * kv_heads // size
    return head * head_dim, head_dim
