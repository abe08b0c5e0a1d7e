"""What the block masks cost a training step: an MLP 64→2048→2048→10 with 32×32 blocks,
SGD with momentum, timed as a plain model, and compiled for SequentialAttention++ in its
dense phase (masks and logits active) and in a sparse phase at 90% (pruned blocks zeroed
after every step), with the mask applied and the pruned blocks zeroed two ways: over a
blocked view of the weight (BlockView.scale and zero_blocks_, what planc does) and with
expanded full-size masks (BlockView.expand, what it did before).
Interleaved medians in one process, fp32, 2 threads. Not a test; figures in
docs/benchmarks.md.

    python benchmarks/mask_overhead.py [batch ...]        # default: 64 512
"""
from __future__ import annotations

import sys

import torch
from torch import nn

import planc
from planc.blocks import BlockView
from planc.timing import interleaved

PLAN = """
version: 1
model: {example_inputs: [[64, 64]]}
targets: {defaults: {block: [32, 32], sparsity: 0.9, min_blocks: 1}, rules: [{match: {position: last}, skip: true}]}
method: {name: sequential_attention_pp}
schedule: {phases: [{phase: PHASE, steps: 100000}]}
train: {steps: 100000}
"""


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))


def stepper(model, params, x, y, after=lambda: None):
    opt = torch.optim.SGD(params, lr=1e-3, momentum=0.9)

    def step():
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        after()
    return step


def old_zero(self, tensor, grid):       # before: a full-size mask built for every zeroing
    tensor.masked_fill_(self.expand(grid.to(torch.bool)), 0)


def main(batches) -> None:
    torch.set_num_threads(2)
    for phase in ("dense", "sparse"):
        run_phase(phase, batches)


def run_phase(phase: str, batches) -> None:
    torch.manual_seed(0)
    plain = mlp()
    pruned = planc.compile(mlp(), planc.load_plan(PLAN.replace("PHASE", phase)), torch.randn(64, 64))
    scale, zero = BlockView.scale, BlockView.zero_blocks_
    for batch in batches:
        x, y = torch.randn(batch, 64), torch.randint(0, 10, (batch,))
        masked_params = pruned.param_groups(lr=1e-3)
        steps = {"plain": stepper(plain, plain.parameters(), x, y),
                 "masked": stepper(pruned.module, masked_params, x, y, pruned.step)}
        pruned.attach(torch.optim.SGD(masked_params, lr=1e-3))

        def expanded():                      # the same step with the old way of masking and zeroing
            BlockView.scale = lambda self, w, g: w * self.expand(g)
            BlockView.zero_blocks_ = old_zero
            try:
                steps["masked"]()
            finally:
                BlockView.scale, BlockView.zero_blocks_ = scale, zero

        t = interleaved({**steps, "expanded": expanded}, 31)
        print(f"batch {batch}: plain {t['plain']:.2f} ms, SA++ {phase} phase {t['masked']:.2f} ms "
              f"({t['masked'] / t['plain']:.2f}x); with the expanded mask {t['expanded']:.2f} ms "
              f"({t['expanded'] / t['plain']:.2f}x)")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [64, 512])
