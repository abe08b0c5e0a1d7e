"""The CPU forward's two sparse formulations side by side (kernels/cpu.py): column panels
("cols") against block-rows ("rows"), and what `auto` picks (kernels/cost.py), on the
pretrained MiniLM's layer shapes (384×384, 384×1536, 1536×384) and the 4096×4096 layer,
random 32×32 block supports, timed interleaved with dense F.linear in one process
(planc.timing), inference, fp32. Not a test; figures in docs/benchmarks.md.

    python benchmarks/cpu_rows_cols.py [--threads 2] [--repeats 9]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from planc.blocks import BlockView
from planc.kernels import cpu
from planc.kernels.cost import choose_cpu_strategy
from planc.kernels.format import BlockSparseMatrix
from planc.timing import cpu_model, interleaved

CASES = [((R, C), M, s) for M in (1024, 8192) for (R, C) in ((384, 384), (384, 1536), (1536, 384)) for s in (0.9, 0.7)]
CASES += [((4096, 4096), 512, s) for s in (0.8, 0.9, 0.95)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{cpu_model()}, torch {torch.__version__}, {args.threads} threads, fp32, 32x32 blocks")
    print("| shape (out×in) | tokens | sparsity | dense ms | cols × dense | rows × dense | auto picks |")
    print("|---|---|---|---|---|---|---|")
    g = torch.Generator().manual_seed(0)
    for (R, C), M, s in CASES:
        w = torch.randn(R, C, generator=g)
        view = BlockView((R, C), (32, 32))
        view.zero_blocks_(w, torch.rand(view.grid, generator=g) < s)
        bsm, b, x = BlockSparseMatrix.from_weight(w, (32, 32)), torch.randn(R, generator=g), torch.randn(M, C, generator=g)
        ref = F.linear(x, w, b)
        with torch.inference_mode():
            for strategy in ("cols", "rows"):
                err = float((cpu.forward(x, bsm, b, strategy) - ref).abs().max() / ref.abs().max())
                assert err < 1e-5, (strategy, err)
            t = interleaved({"dense": lambda: F.linear(x, w, b), "cols": lambda: cpu.forward(x, bsm, b, "cols"),
                             "rows": lambda: cpu.forward(x, bsm, b, "rows")}, args.repeats)
        pick = choose_cpu_strategy(M, (R, C), (32, 32), bsm.density)
        print(f"| {R}×{C} | {M} | {s:.0%} | {t['dense']:.2f} | {t['dense'] / t['cols']:.2f}× | "
              f"{t['dense'] / t['rows']:.2f}× | {pick} |")


if __name__ == "__main__":
    main()
