"""What the block masks cost a training step: an MLP 64→2048→2048→10 with 32×32 blocks,
SGD with momentum, timed as a plain model, and compiled for SequentialAttention++ in its
dense phase (masks and logits active) and in a sparse phase at 90% (pruned blocks zeroed
after every step), with the mask applied and the pruned blocks zeroed two ways: over a
blocked view of the weight (BlockView.scale and zero_blocks_, what planc does) and with
expanded full-size masks (BlockView.expand, what it did before).
Interleaved medians in one process, fp32, 2 threads. Not a test; figures in
docs/benchmarks.md.

With `--minilm`: the pretrained MiniLM's training step (batch 16 × 32 random token ids,
AdamW, 1 − cosine to fixed random targets), plain against SA++'s dense phase with 32×32
masks on all 36 encoder Linear layers (the shipped plans' targets; no distillation, so
the comparison is the masks alone).

    python benchmarks/mask_overhead.py [batch ...]        # default: 64 512
    python benchmarks/mask_overhead.py --minilm
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


MINILM_PLAN = """
version: 1
model: {example_inputs: [[2, 32]], input_dtype: int64}
targets:
  defaults: {block: [32, 32], sparsity: 0.7, min_blocks: 1}
  rules: [{match: {type: Linear, name: "bert.encoder.*"}}, {match: {}, skip: true}]
method: {name: sequential_attention_pp}
schedule: {phases: [{phase: dense, steps: 100000}]}
train: {steps: 100000}
"""


def minilm(repeats: int = 21) -> None:
    from planc.examples.minilm import model
    from planc.timing import cpu_model

    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (16, 32), generator=g)
    target = nn.functional.normalize(torch.randn(16, 384, generator=g), dim=-1)

    def adamw_step(module, params, after=lambda: None):
        opt = torch.optim.AdamW(params, lr=1e-5)

        def step():
            (1 - (module(ids) * target).sum(-1)).mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            after()
        return step, opt

    plain = model().train()
    pruned = planc.compile(model().train(), planc.load_plan(MINILM_PLAN), ids[:2])
    plain_step, _ = adamw_step(plain, plain.parameters())
    masked_step, opt = adamw_step(pruned.module, pruned.param_groups(lr=1e-5), pruned.step)
    pruned.attach(opt)
    t = interleaved({"plain": plain_step, "masked": masked_step}, repeats)
    print(f"MiniLM step, batch 16x32, AdamW, {cpu_model()}, {torch.get_num_threads()} threads: "
          f"plain {t['plain']:.1f} ms, SA++ dense phase ({len(pruned.masks)} masked layers) "
          f"{t['masked']:.1f} ms ({t['masked'] / t['plain']:.3f}x)")


if __name__ == "__main__":
    if sys.argv[1:] == ["--minilm"]:
        minilm()
    else:
        main([int(a) for a in sys.argv[1:]] or [64, 512])
