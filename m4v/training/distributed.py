"""One process or torchrun: process group, device, FSDP2 sharding per block (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    distributed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def init_distributed(device: str | None = None) -> DistInfo:
    """Start the process group when launched by torchrun (nccl on CUDA, gloo on CPU); else one process."""
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if not launched_by_torchrun():
        dev = torch.device(device or ("cuda" if use_cuda else "cpu"))
        return DistInfo(0, 1, 0, dev, False)
    local = int(os.environ["LOCAL_RANK"])
    if use_cuda:
        torch.cuda.set_device(local)
        dev = torch.device("cuda", local)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        kw = {"device_id": dev} if use_cuda else {}
        dist.init_process_group("nccl" if use_cuda else "gloo", **kw)
    return DistInfo(dist.get_rank(), dist.get_world_size(), local, dev, True)


def shard_model(model: nn.Module, info: DistInfo, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: ``fully_shard`` each dual/single block, then the root (embedders and output layers)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(info.device.type, (info.world,))
    blocks = [m for name in ("dual_blocks", "single_blocks") for m in getattr(model, name, [])]
    if not blocks:  # generic module (e.g. the VAE): shard its direct children that hold parameters
        blocks = [m for m in model.children() if any(True for _ in m.parameters())]
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def all_reduce_mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= info.world
    return x


def barrier(info: DistInfo) -> None:
    if info.distributed:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    """Tear the process group down together: a rank that destroys it while another still works (e.g. rank 0
    writing files) could abort at exit with gloo ("terminate called without an active exception")."""
    if info.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
