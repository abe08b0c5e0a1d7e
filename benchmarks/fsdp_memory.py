"""Per-rank memory of a compiled model sharded with FSDP2 over 2 CPU processes (gloo),
counted tensor by tensor (process RSS is dominated by torch's own libraries and says
nothing about the model): the parameter, gradient and optimizer-state bytes each rank
holds between steps, against the whole model's, and the largest transient gather a
pruning update makes. Trains the digits MLP (64→H→H→10, SGD with momentum, 8×8 blocks,
SequentialAttention++) through a dense→sparsify schedule so the numbers are taken after
real pruning updates. Not a test; its figures are in docs/robustness.md.

    python benchmarks/fsdp_memory.py [hidden]        # default 1024
"""
from __future__ import annotations

import os
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import planc
from planc.examples.digits import mlp

PLAN = """
version: 1
name: fsdp-memory
model: {example_inputs: [[16, 64]]}
targets:
  defaults: {block: [8, 8], sparsity: 0.9, min_blocks: 16}
  rules: [{match: {position: last}, skip: true}]
method: {name: sequential_attention_pp}
schedule: {phases: [{phase: dense, steps: 2}, {phase: sparsify, steps: 4}]}
"""


def _bytes(tensors) -> int:
    return sum(t.to_local().numel() * t.element_size() if hasattr(t, "to_local") else t.numel() * t.element_size()
               for t in tensors)


def _worker(rank: int, world: int, init: str, hidden: int) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.manual_seed(0)
    pruned = planc.compile(mlp(hidden=hidden), PLAN)
    fully_shard(pruned.module)
    opt = torch.optim.SGD(pruned.param_groups(lr=0.05, momentum=0.9))
    pruned.attach(opt)
    g = torch.Generator().manual_seed(rank)
    for _ in range(6):
        x, y = torch.randn(16, 64, generator=g), torch.randint(0, 10, (16,), generator=g)
        F.cross_entropy(pruned.module(x), y).backward()
        grads = _bytes(p.grad for p in pruned.module.parameters() if p.grad is not None)
        opt.step()
        opt.zero_grad(set_to_none=True)
        pruned.step()
    params = list(pruned.module.parameters())
    whole = sum(p.numel() * p.element_size() for p in params)
    state = _bytes(v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    gather = max(pruned.weight(n).numel() * pruned.weight(n).element_size() for n in pruned.masks)
    line = (f"rank {rank}: parameters {_bytes(params)} of {whole} bytes ({_bytes(params) / whole:.3f}), "
            f"gradients {grads}, optimizer state {state} (after the last edge's reset and steps), "
            f"largest gather at a pruning update {gather} bytes; sparsity {pruned.pruning_runtime().mean_sparsity():.3f}")
    for r in range(world):
        if r == rank:
            print(line, flush=True)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    hidden = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), hidden), nprocs=2, join=True)
