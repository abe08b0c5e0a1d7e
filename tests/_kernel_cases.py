"""Shared helpers of the kernel tests: random block-sparse weights and float64 references."""
import torch

from planc.blocks import BlockView
from planc.kernels.format import BlockSparseMatrix

# (R, C, block): aligned, partial edge blocks, 8×8 (packed), 5×10 / 20×20 (general path)
SHAPES = [
    (48, 64, (16, 16)),
    (40, 36, (16, 16)),
    (33, 50, (8, 8)),
    (30, 45, (5, 10)),
    (40, 40, (20, 20)),
    (64, 96, (32, 32)),
]
# fully dense, half, and fully empty; empty block-rows are forced in `make`
SPARSITIES = [0.0, 0.6, 1.0]
# max |err| / max |ref| allowed, per dtype (inputs rounded to the dtype; fp32 accumulation)
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float64: 1e-12}


def make(R, C, block, sparsity, dtype, seed=0, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    view = BlockView((R, C), block)
    alive = torch.rand(view.grid, generator=g) >= sparsity
    if empty_row and 0 < sparsity < 1 and view.grid[0] > 1:
        alive[1] = False          # an empty block-row
    w = torch.randn(R, C, generator=g, dtype=torch.float64) * view.expand(alive.double())
    bsm = BlockSparseMatrix.from_weight(w.to(dtype), block, alive)
    return bsm, alive


def rel_err(got, ref):
    return float((got.detach().double() - ref.detach()).abs().max() / ref.detach().abs().max().clamp_min(1e-12)) if ref.numel() else 0.0
