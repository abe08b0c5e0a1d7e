"""planc under torch.distributed (DDP, torchrun): helpers the runtime and compile call.

Every pruning decision must be the same on every rank. Under DDP the weights and the
attention logits are replicated (gradients are all-reduced, and an all-reduce gives every
rank the same bits), so the scores that decide which blocks to prune are equal on every
rank already. But nothing forces a user's ranks to hold equal state (a rank-local tweak,
a different initial seed without DDP's initial broadcast, a non-deterministic kernel), and
one divergent decision is permanent: each rank zeroes the raw weights of the blocks *it*
pruned, and DDP only ever synchronises gradients and buffers, not parameters. So the
runtime broadcasts each decision (the bool grid of blocks to prune now) from rank 0 and
every rank applies rank 0's; with one process, or without an initialised process group,
these helpers do nothing.

- `broadcast_decision(grid)`: rank 0's grid on every rank (one small broadcast per layer
  and pruning step; collective, so every rank must call it in the same order — the runtime
  does, because its schedule is a function of the step only).
- `assert_synchronized(masks)`: raise RuntimeStateError if the alive grids differ
  between ranks (for tests and debugging; one all-gather of a checksum per layer).
- `join_from_environment()`: under torchrun (WORLD_SIZE > 1 in the environment), join
  the default process group (gloo: the built-in trainer runs on the CPU); what
  `planc apply` calls, so `torchrun --nproc_per_node N -m planc.cli apply PLAN` trains on
  N processes. `Ranks.share(batch)` is this rank's slice of a global batch and the
  factor that makes DDP's gradient average equal the full batch's mean-loss gradient.
- `unwrap(model)`: the module inside DistributedDataParallel / DataParallel, so
  `planc.compile(DDP(model), plan)` compiles the model itself. Layer names are those of
  the unwrapped model (`layers.0`); rules written for the wrapped names (`module.layers.*`)
  match too (passes.select strips a leading `module.`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Tuple

import torch
from torch import nn

from planc.errors import PlancError, RuntimeStateError
import torch.distributed as dist


def active() -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@dataclass(frozen=True)
class Ranks:
    """Where this process stands: rank, world size, and whether planc started the
    process group (and so must end it)."""

    rank: int = 0
    world: int = 1
    started_group: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    def share(self, x: torch.Tensor, y: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, float]:
        """This rank's contiguous slice of a global batch (x, y), and the factor to
        multiply its mean loss by. DDP averages gradients over ranks, so with
        factor = n_rank·world/n the average is the gradient of the global batch's mean
        loss, for any split (the last batch of an epoch need not divide evenly)."""
        n = len(y)
        if self.world == 1:
            return x, y, 1.0
        if n < self.world:
            raise PlancError(f"a training batch of {n} samples cannot be split across {self.world} ranks; "
                             f"use a larger batch size in train.data")
        lo, hi = self.rank * n // self.world, (self.rank + 1) * n // self.world
        return x[lo:hi], y[lo:hi], (hi - lo) * self.world / n

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of a scalar over ranks (the same on every rank)."""
        if self.world == 1:
            return value

        buf = value.detach().to(torch.float64).reshape(1).clone()
        dist.all_reduce(buf)
        return buf[0] / self.world

    def barrier(self) -> None:
        """Wait for every rank (nothing on one process)."""
        if self.world > 1:
            dist.barrier()

    def finish(self) -> None:
        """Wait for every rank, then end the process group if planc started it."""
        if self.world == 1:
            return

        if dist.is_initialized():
            dist.barrier()
            if self.started_group:
                dist.destroy_process_group()


def join_from_environment() -> Ranks:
    """Ranks from a launcher's environment (torchrun sets RANK, WORLD_SIZE, MASTER_ADDR,
    MASTER_PORT); one process without it. Joins the default process group (gloo) unless
    the caller already did."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        world = int(raw)
    except ValueError:
        raise PlancError(f"environment variable WORLD_SIZE: expected a number of processes, got {raw!r}") from None
    if world <= 1:
        return Ranks()

    started = False
    if not dist.is_initialized():
        missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
        if missing:
            raise PlancError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start the ranks with torchrun")
        dist.init_process_group("gloo")
        started = True
    return Ranks(dist.get_rank(), dist.get_world_size(), started)


def _device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_decision(grid: torch.Tensor, src: int = 0) -> torch.Tensor:
    """`grid` (bool) as rank `src` has it, on every rank; `grid` itself without a group."""
    if not active():
        return grid

    buf = grid.to(device=_device(), dtype=torch.uint8).contiguous()
    dist.broadcast(buf, src=src)
    return buf.to(device=grid.device, dtype=torch.bool).view_as(grid)


def _checksum(t: torch.Tensor) -> torch.Tensor:
    flat = t.detach().flatten().to(torch.float64).cpu()
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64)
    return torch.stack([flat.sum(), (flat * weights).sum(), torch.tensor(float(flat.numel()), dtype=torch.float64)])


def assert_synchronized(masks: Mapping[str, nn.Module]) -> None:
    """RuntimeStateError naming the first layer whose alive grid differs between ranks."""
    if not active():
        return

    world = dist.get_world_size()
    for name, mask in masks.items():
        mine = _checksum(mask.alive).to(_device())
        everyone = [torch.zeros_like(mine) for _ in range(world)]
        dist.all_gather(everyone, mine)
        if any(not torch.equal(everyone[0], other) for other in everyone[1:]):
            raise RuntimeStateError(f"layer {name!r}: the pruning masks differ between ranks "
                                    f"(rank {dist.get_rank()} of {world})")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel wrappers (any depth)."""
    wrappers = (nn.parallel.DistributedDataParallel, nn.DataParallel)
    while isinstance(model, wrappers):
        model = model.module
    return model
