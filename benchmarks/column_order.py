"""What storing a lowered layer's kept blocks by block-column saves on the CPU: the
column-panel forward reads blocks grouped by column, so blocks stored by row are gathered
on every call (`values[tperm]`). Interleaved medians in one process, fp32, 2 threads,
random weights at the given block density. Not a test; figures in docs/benchmarks.md.

    python benchmarks/column_order.py
"""
from __future__ import annotations

import torch

from planc.timing import interleaved as timeit_interleaved
from planc.kernels.format import BlockSparseMatrix
from planc.kernels.ops import BlockSparseLinear

CASES = [  # (out, in, tokens, block, sparsity)
    (4096, 4096, 512, 32, 0.9), (4096, 4096, 512, 32, 0.7),
    (1536, 384, 8192, 32, 0.9), (384, 1536, 8192, 32, 0.9), (384, 384, 8192, 32, 0.7),
]


def main() -> None:
    torch.set_num_threads(2)
    g = torch.Generator().manual_seed(0)
    for R, C, M, blk, s in CASES:
        alive = torch.rand(R // blk, C // blk, generator=g) > s
        bsm = BlockSparseMatrix.from_weight(torch.randn(R, C, generator=g), (blk, blk), alive)
        layers = {order: BlockSparseLinear(bsm, backend="cpu", strategy="cols", order=order) for order in ("row", "col")}
        x = torch.randn(M, C, generator=g)
        with torch.inference_mode():
            t = timeit_interleaved({o: (lambda o=o: layers[o](x)) for o in layers}, 15)
        print(f"{R}x{C}, {M} tokens, {blk}x{blk} blocks, sparsity {s}: stored by row (gather each call) "
              f"{t['row']:.2f} ms, by column {t['col']:.2f} ms: x{t['row'] / t['col']:.2f}")


if __name__ == "__main__":
    main()
