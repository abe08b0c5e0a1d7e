"""A small predictor of whether the block-sparse op beats dense for a layer, used by the
lower pass (min_speedup) and by the op to pick a CPU formulation.

Deliberately simple and explained: a roofline-ish model whose CPU constants were measured
on this machine (2-core AMD EPYC, torch 2.13 CPU, MKL; see docs/benchmarks.md) and, for
the GPU, taken from the efficiencies reported for block-sparse kernels of this shape
(PyTorch's own BSR Triton kernel reaches roughly 0.45 of the ideal speedup at 64×64
blocks on an A100). It answers "clearly
faster", "clearly not" and "about even" correctly; it is not a timer.
"""
from __future__ import annotations

from dataclasses import dataclass
import math

import torch

from planc.kernels import native

# CPU (measured on a quiet machine, benchmarks/bench_cpu_linear.py and single-core runs
# of the pieces; predicted/measured at 4096², 512 tokens, 90%: 0.9–1.0 for 16/32/64):
# dense F.linear rate on all cores and its fixed cost; the column-panel path's rate per
# core (its GEMMs run on one core each, see kernels/cpu.py), its scatter-add rate per
# core in bytes of panel products, its Python/dispatch cost per block-column per thread
# and its fixed cost (index split, thread hand-off); torch.sparse BSR's rate in useful
# flops (it ran ~2.3× dense at 10% density for 16-, 32- and 64-wide blocks alike).
_CPU_DENSE_FLOPS = 1.7e11
_CPU_DENSE_OVERHEAD_S = 1.5e-5
_CPU_CORE_FLOPS = 8.8e10
_CPU_SCATTER_BYTES_PER_S = 1.4e10
_CPU_COL_CALL_S = 1.0e-5
_CPU_COLS_OVERHEAD_S = 1.0e-4
_CPU_BSR_FLOPS = 4.0e10
# the native kernel, per core: its rate on the kept blocks' multiply-adds (the dense
# rate at 12+ kept blocks a block-row, 0.4–0.8 of it at 1–5), its streamed output and
# its fixed cost (packing check, ctypes call, thread hand-off); fitted to
# benchmarks/bench_cpu_linear.py and the MiniLM layers (docs/benchmarks.md, session 7)
_CPU_NATIVE_FLOPS = 8.0e10
_CPU_NATIVE_STORE_BYTES_PER_S = 1.2e10
_CPU_NATIVE_OVERHEAD_S = 3.0e-5
# GPU (assumed, unmeasured here): fraction of the ideal speedup by padded block size.
_GPU_EFF = {16: 0.3, 32: 0.5, 64: 0.75, 128: 0.8}
_GPU_LAUNCH_S = 8e-6
_GPU_DENSE_FLOPS = {torch.float32: 4.0e14, torch.float16: 7.0e14, torch.bfloat16: 7.0e14}

# Below this many flops per thread, handing work to another thread costs more than it
# saves (a pool round trip and two set_num_threads calls are ~0.1 ms).
MIN_FLOPS_PER_THREAD = 2e7


def thread_parts(flops: float, groups: int) -> int:
    """How many threads to split a product over: all of torch's threads, unless the
    product is too small to pay for the hand-off."""
    parts = min(torch.get_num_threads(), groups)
    while parts > 1 and flops < parts * MIN_FLOPS_PER_THREAD:
        parts -= 1
    return max(1, parts)


def _cpu_gemm_eff(c: int) -> float:
    """Fraction of a core's dense GEMM rate that the column panels reach: their K is the
    block width c. Measured 0.55 / 0.72 / 0.85 / 0.96 at c = 8 / 16 / 32 / 64."""
    return max(0.1, min(1.0, 0.137 * math.log2(max(c, 1)) + 0.15))


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
    dense = flops / _CPU_DENSE_FLOPS + _CPU_DENSE_OVERHEAD_S
    sparse = min(_cpu_cols_s(tokens, gr, gc, nnz, r, c), _cpu_bsr_s(tokens, nnz, r, c, dtype))
    if density <= NATIVE_MAX_DENSITY and _native_supports(r, dtype):
        sparse = min(sparse, _cpu_native_s(tokens, gr, nnz, r, c))
    return Prediction("cpu", dense, sparse)


def _native_supports(r: int, dtype: torch.dtype) -> bool:
    return native.supports(r, dtype, torch.device("cpu"))      # builds the kernel on first use


def _cpu_native_s(tokens: int, gr: int, nnz: float, r: int, c: int) -> float:
    """The native kernel (kernels/native.c): its multiply-adds at a core's rate, each
    output written once (streamed), split over the threads (by tokens, or by block-rows
    when the tokens are few) unless the product is too small to pay for the hand-off."""
    flops = 2.0 * tokens * nnz * r * c
    threads = torch.get_num_threads() if flops >= native.MIN_FLOPS_TO_SPLIT else 1
    parts = threads if tokens >= 64 * threads else max(1, min(threads, gr))
    one_thread = flops / _CPU_NATIVE_FLOPS + 4.0 * tokens * gr * r / _CPU_NATIVE_STORE_BYTES_PER_S
    return one_thread / parts + _CPU_NATIVE_OVERHEAD_S


def _cpu_cols_s(tokens: int, gr: int, gc: int, nnz: float, r: int, c: int) -> float:
    """Column panels (kernels/cpu.py): one GEMM per block-column, the products scatter-
    added once, the block-columns shared by torch's threads when the product is big enough."""

    sparse_flops = 2.0 * tokens * nnz * r * c
    work = sparse_flops / (_CPU_CORE_FLOPS * _cpu_gemm_eff(c)) + 4.0 * nnz * r * tokens / _CPU_SCATTER_BYTES_PER_S
    parts = thread_parts(sparse_flops, gc)
    # each extra thread's accumulator: zeroed, written, summed into the output
    reduce = (parts - 1) * 3 * 4.0 * gr * r * tokens / _CPU_SCATTER_BYTES_PER_S
    return work / parts + reduce + gc * _CPU_COL_CALL_S + _CPU_COLS_OVERHEAD_S


def _cpu_bsr_s(tokens: int, nnz: float, r: int, c: int, dtype: torch.dtype) -> float:
    """torch.sparse BSR (MKL): fp32/fp64 and square blocks only."""
    if r != c or dtype not in (torch.float32, torch.float64):
        return math.inf
    return 2.0 * tokens * nnz * r * c / _CPU_BSR_FLOPS + _CPU_DENSE_OVERHEAD_S


def predict_speedup(tokens: int, shape, block, density: float, dtype: torch.dtype = torch.float32,
                    backend: str = "cpu") -> float:
    return predict(tokens, shape, block, density, dtype, backend).speedup


def choose_cpu_strategy(tokens: int, shape, block, density: float, dtype: torch.dtype = torch.float32,
                        native: bool | None = None) -> str:
    """The CPU formulation for one call: the fastest of column panels ("cols"), torch.sparse
    BSR ("mkl") and a dense GEMM over the materialised weight ("dense"; small or dense
    layers) by the model above; then "rows" instead of a sparse choice for many tokens
    and few kept blocks per block-row (the rule below). With the threaded column
    panels, "mkl" is predicted (and measured) slower at every block size this was
    measured at (16–64). Before all of them, "native" where it is built for this block
    and dtype (`native` None: ask kernels/native.py) and the layer is sparse enough."""
    if density <= 0.0:
        return "cols"
    if density >= 1.0:
        return "dense"
    if native is None:
        native = _native_supports(int(block[0]), dtype)
    if native and density <= NATIVE_MAX_DENSITY:
        return "native"
    (R, C), (r, c) = (int(s) for s in shape), (int(b) for b in block)
    gr, gc = -(-R // r), -(-C // c)
    nnz = density * gr * gc
    times = {"cols": _cpu_cols_s(tokens, gr, gc, nnz, r, c), "mkl": _cpu_bsr_s(tokens, nnz, r, c, dtype),
             "dense": 2.0 * tokens * R * C / _CPU_DENSE_FLOPS + _CPU_DENSE_OVERHEAD_S}
    best = min(times, key=times.get)
    if best != "dense" and tokens >= ROWS_MIN_TOKENS and nnz / gr <= ROWS_MAX_BLOCKS_PER_ROW:
        return "rows"
    return best


# "rows" (kernels/cpu.py forward_rows) over "cols": a rule from measurements rather than
# a fitted time (docs/benchmarks.md, session 6, AMD EPYC, 2 threads): it won on MiniLM's
# 384×384, 384×1536 and 1536×384 layers at 1,024–8,192 tokens whenever a block-row kept
# at most ~5 blocks (1.1–1.7× the column panels' speed), and lost where rows kept ~14
# (384×1536 at 70%: 0.9×) or the tokens were few (4096×4096 at 512 tokens: 0.5–0.8×).
ROWS_MIN_TOKENS = 1024
ROWS_MAX_BLOCKS_PER_ROW = 8


# "native" (kernels/native.c) whenever it is built for the layer's block and dtype and the
# layer keeps at most this share of its blocks: it ran at the dense GEMM's rate per kept
# block on every shape measured (docs/benchmarks.md), so it wins below ~this density.
NATIVE_MAX_DENSITY = 0.6
