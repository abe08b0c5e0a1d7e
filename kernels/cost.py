"""A small predictor of whether the block-sparse op beats dense for a layer, used by the
lower pass (min_speedup) and by the op to pick a CPU formulation.

Deliberately simple and explained: a roofline-ish model whose constants were fitted to
one run of `planc bench` on this machine (2-core AMD EPYC, torch 2.13 CPU; see
docs/benchmarks.md) and, for the GPU, to the efficiencies reported for block-sparse
kernels of this shape (design.md: PyTorch's BSR kernel reaches ~0.45 of ideal at 64×64).
It answers "clearly faster", "clearly not" and "about even" correctly; it is not a timer.
"""
from __future__ import annotations

from dataclasses import dataclass
import math

import torch

# CPU (fitted): dense GEMM rate, the column-panel path's GEMM efficiency by block width,
# its per-block-column call overhead, and its intermediate traffic rate.
_CPU_DENSE_FLOPS = 1.7e11
_CPU_DENSE_OVERHEAD_S = 1.5e-5
_CPU_COL_CALL_S = 1.2e-5
_CPU_BYTES_PER_S = 4.0e10
# GPU (assumed, unmeasured here): fraction of the ideal speedup by padded block size.
_GPU_EFF = {16: 0.3, 32: 0.5, 64: 0.75, 128: 0.8}
_GPU_LAUNCH_S = 8e-6
_GPU_DENSE_FLOPS = {torch.float32: 4.0e14, torch.float16: 7.0e14, torch.bfloat16: 7.0e14}


def _cpu_gemm_eff(c: int, r: int) -> float:
    # K = c for the column-panel GEMMs: narrow panels run far below MKL's peak
    k = min(c, 128)
    return max(0.08, min(0.85, 0.25 * math.log2(max(k, 2)) - 0.45)) * min(1.0, r / 8)


@dataclass(frozen=True)
class Prediction:
    backend: str
    dense_s: float
    sparse_s: float

    @property
    def speedup(self) -> float:
        return self.dense_s / self.sparse_s if self.sparse_s > 0 else float("inf")


def predict(tokens: int, shape, block, density: float, dtype: torch.dtype = torch.float32,
            backend: str = "cpu") -> Prediction:
    """Predicted dense and block-sparse times (seconds) of Y = X·Wᵀ for X (tokens, C)."""
    (R, C), (r, c) = (int(s) for s in shape), (int(b) for b in block)
    gr, gc = -(-R // r), -(-C // c)
    flops = 2.0 * tokens * R * C
    nnz = density * gr * gc
    if backend == "triton":
        peak = _GPU_DENSE_FLOPS.get(dtype, 4.0e14)
        dense = flops / peak + _GPU_LAUNCH_S
        pad = max(16, 1 << (max(r, 1) - 1).bit_length()) * max(16, 1 << (max(c, 1) - 1).bit_length())
        size = max(16, min(128, 1 << (max(min(r, c), 1) - 1).bit_length()))
        eff = _GPU_EFF.get(size, 0.3) * (r * c) / pad
        sparse = 2.0 * tokens * nnz * r * c / (peak * eff) + _GPU_LAUNCH_S
        return Prediction(backend, dense, sparse)
    # CPU: column panels (kernels/cpu.py): GEMMs of k·r × c × tokens per block-column,
    # each product written once and scatter-added once
    dense = flops / _CPU_DENSE_FLOPS + _CPU_DENSE_OVERHEAD_S
    gemm = 2.0 * tokens * nnz * r * c / (_CPU_DENSE_FLOPS * _cpu_gemm_eff(c, r))
    traffic = 3.0 * 4.0 * nnz * r * tokens / _CPU_BYTES_PER_S
    transpose = 4.0 * 2 * tokens * (R + C) / _CPU_BYTES_PER_S
    sparse = gemm + traffic + transpose + gc * _CPU_COL_CALL_S + _CPU_DENSE_OVERHEAD_S
    return Prediction("cpu", dense, sparse)


def predict_speedup(tokens: int, shape, block, density: float, dtype: torch.dtype = torch.float32,
                    backend: str = "cpu") -> float:
    return predict(tokens, shape, block, density, dtype, backend).speedup


def choose_cpu_strategy(tokens: int, shape, block, density: float, dtype: torch.dtype = torch.float32) -> str:
    """The CPU formulation for one call: column panels unless the model says a dense
    GEMM over the materialised weight is faster (small or dense layers). Blocks 16 wide
    or narrower starve the column-panel GEMMs (K = c); there torch.sparse BSR ("mkl",
    fp32/fp64, square blocks) measured faster, so it takes those."""
    if density >= 1.0 or predict_speedup(tokens, shape, block, density, dtype, "cpu") < 1.0:
        return "dense" if density > 0.0 else "cols"
    r, c = (int(b) for b in block)
    if c <= 16 and r == c and dtype in (torch.float32, torch.float64):
        return "mkl"
    return "cols"
