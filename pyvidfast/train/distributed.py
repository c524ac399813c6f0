"""Processes, devices and how the trained model is spread over them: DDP (the default), FSDP2
(``torch.distributed.fsdp.fully_shard``) and activation checkpointing (``torch.utils.checkpoint``).

FSDP2 and activation checkpointing work per *unit*: a module that is sharded (its parameters all-gathered just
before its forward and freed after) or whose activations are recomputed in the backward pass. Units are found the
same way for every family (:func:`block_units`):

- a module that defines ``fsdp_units() -> list[nn.Module]`` names its own units (the modules below it it wants
  sharded; e.g. a vision tower's blocks plus a language model's decoder layers);
- otherwise every child of an ``nn.ModuleList`` attribute called ``blocks`` (VideoMAE V2, FluxViT, the pretraining
  encoder and decoder), ``resblocks`` (UniFormerV2's CLIP transformer) or ``layers`` (Hugging Face decoders).

The root (``task.model``) is sharded too and holds what no unit holds (embeddings, norms, heads).
"""

import os
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint

BLOCK_LISTS = ("blocks", "resblocks", "layers")  # nn.ModuleList attribute names whose children are units


class Context:
    """Rank, world size and device of this process; initialises the process group under torchrun (gloo on CPU,
    NCCL on GPU). ``distributed=True`` makes a group even for a single process outside torchrun (a one-member
    gloo group on an in-memory store), which FSDP2 needs."""

    def __init__(self, device: str = "auto", distributed: bool = False):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(f"cuda:{local_rank}" if device == "cuda" else device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.backend = "nccl" if self.device.type == "cuda" else "gloo"
        if not dist.is_initialized():
            if self.world > 1 or (distributed and "MASTER_ADDR" in os.environ):
                # torchrun's elastic restarts keep the rendezvous store, and with it the previous attempt's peer
                # addresses, which the new attempt's gloo then dials (pytorch/pytorch#167288): each attempt gets
                # its own key prefix.
                store, rank, world = next(dist.rendezvous("env://"))
                attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
                dist.init_process_group(self.backend, store=dist.PrefixStore(f"pyvidfast/attempt_{attempt}", store),
                                        rank=rank, world_size=world)
            elif distributed:
                dist.init_process_group(self.backend, store=dist.HashStore(), rank=0, world_size=1)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def grouped(self) -> bool:
        return dist.is_initialized()

    def mean(self, value: torch.Tensor) -> float:
        """Mean of a scalar over ranks."""
        return float(self.means(value.reshape(1))[0])

    def means(self, values: torch.Tensor) -> torch.Tensor:
        """Means over ranks of a tensor of scalars, as float64 on the CPU (one all-reduce for all of them)."""
        values = values.detach().double().to(self.device)
        if self.grouped:
            dist.all_reduce(values)
        return values.cpu() / self.world

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        values = values.to(self.device)
        if self.grouped:
            dist.all_reduce(values)
        return values

    def barrier(self) -> None:
        if self.grouped:
            dist.barrier()

    def close(self) -> None:
        """Leaves the process group once every rank is done with it: the barrier keeps a rank that returned from
        the last collective first (rank 0 after a DCP save) from tearing its side of the group down while a peer
        is still inside that collective. Called on the normal path only: after an error a barrier would wait for
        peers that may never come."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def block_units(model: nn.Module) -> list[nn.Module]:
    """The units of ``model`` for FSDP2 and activation checkpointing (see the module docstring), outermost first;
    a module that defines ``fsdp_units`` is not searched further."""
    units: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        if hasattr(module, "fsdp_units"):
            units.extend(module.fsdp_units())
            return
        for name, child in module.named_children():
            if name in BLOCK_LISTS and isinstance(child, nn.ModuleList):
                units.extend(child)
            else:
                visit(child)

    visit(model)
    return units


def checkpoint_activations(model: nn.Module) -> int:
    """Recomputes each unit's activations in the backward pass (``torch.utils.checkpoint``, non-reentrant, RNG
    state preserved so dropout and drop path redraw the same). Names and the module tree stay as they are, so
    checkpoints are unchanged. Returns the number of units."""
    units = block_units(model)
    if not units:
        raise ValueError(f"--activation-checkpointing: {type(model).__name__} has no blocks to checkpoint "
                         f"(no fsdp_units() and no nn.ModuleList called one of {BLOCK_LISTS})")
    for unit in units:
        unit.forward = _checkpointed(unit.forward)
    return len(units)


def _checkpointed(forward: Callable) -> Callable:
    def run(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def shard(model: nn.Module, ctx: Context, reshard_after_forward: bool = False, mixed_precision: str = "") -> int:
    """FSDP2 on every unit of ``model`` and on ``model`` itself, over all ranks. ``reshard_after_forward``: free
    the gathered parameters after each unit's forward and gather them again for its backward (less memory, one
    more all-gather). ``mixed_precision="bf16"``: units compute with bfloat16 parameters while the sharded
    parameters, the gradient reduction and the optimizer stay float32. Returns the number of units."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if mixed_precision not in ("", "bf16"):
        raise ValueError(f"--fsdp-mp: expected 'bf16' or nothing; got {mixed_precision!r}")
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if mixed_precision == "bf16" else MixedPrecisionPolicy())
    mesh = init_device_mesh(ctx.device.type, (ctx.world,))
    units = block_units(model)
    for unit in units:
        fully_shard(unit, mesh=mesh, reshard_after_forward=reshard_after_forward, mp_policy=policy)
    # The root's parameters are needed again right after the forward (the head's backward): keep them gathered.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=policy)
    return len(units)


def full_value(value: torch.Tensor) -> torch.Tensor:
    """A DTensor (FSDP2's sharded parameters, their gradient norm) as the whole tensor; other tensors as they are."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value
