"""The block-sparse linear map as a registered PyTorch operator: `torch.ops.planc.bsr_linear`.

Why an operator and not only an autograd Function: a graph that calls a registered op
with a fake (shape-only) implementation can be traced by torch.export, compiled by
torch.compile and saved as data (planc.artifact) — the lowered model becomes a program
of aten and planc ops over tensors, loadable without any of the model's own code.

    bsr_linear(x (M, C), values (nnz, r, c), crow, col, row, tcrow, trow, tperm,
               bias (R,) or None, R, C, backend, strategy, order) -> (M, R)

The index tensors are a BlockSparseMatrix's (kernels/format.py). `backend` is "cpu",
"triton", "dense" or "auto" (by the input's device); `strategy` the CPU formulation (kernels/cpu.py), or "auto": chosen
inside the op for each call's row count (kernels/cost.py), so that a traced graph does
not fix it to the example's batch size. The result's strides are part of the contract,
since torch.compile plans later ops from the fake result: the CPU backend returns Yᵀ's
transposed view (strides (1, M), what the next sparse layer wants) whatever the
strategy, the others a contiguous matrix; the fake implementation says the same.

`order` says how `values` are stored: "row" (block-row-major, a BlockSparseMatrix's
`values`) or "col" (grouped by block-column, its `grouped_by_column()`): the CPU forward
reads blocks by column, so a lowered layer for the CPU stores them that way and no call
gathers them (the gather cost 10–40% of a layer's time; docs/benchmarks.md), while
training and the other paths rebuild the row order when they need it.

Gradients (registered with the op): dx through the transposed index, dvalues on the
support only, dbias the column sums; nothing for the indices.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from planc.kernels import cpu as _cpu
from planc.kernels.cost import choose_cpu_strategy
from planc.kernels.format import BlockSparseMatrix

def _triton():
    # Imported lazily: importing it decorates the kernels, and whether they run in the
    # interpreter is decided by TRITON_INTERPRET at that moment.
    from planc.kernels import triton_bsr

    return triton_bsr


def _matrix(values, crow, col, row, tcrow, trow, tperm, R: int, C: int) -> BlockSparseMatrix:
    r, c = int(values.shape[1]), int(values.shape[2])
    return BlockSparseMatrix(shape=(R, C), block=(r, c), values=values, crow=crow, col=col, row=row,
                             tcrow=tcrow, trow=trow, tperm=tperm)


def concrete_backend(backend: str, device: torch.device) -> str:
    """"auto" is the CPU path for CPU tensors and Triton for CUDA ones (a loaded program
    says "auto", so it runs on whichever device its tensors are moved to)."""
    if backend == "auto":
        return "triton" if device.type == "cuda" else "cpu"
    return backend


def returns_transposed(backend: str, device: torch.device) -> bool:
    return concrete_backend(backend, device) == "cpu"


def inverse(perm: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes `perm`."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return inv


def row_values(values: torch.Tensor, order: str, tperm: torch.Tensor) -> torch.Tensor:
    """The blocks in block-row-major order, from values stored in `order`."""
    return values if order == "row" else values[inverse(tperm)]


@torch.library.custom_op("planc::bsr_linear", mutates_args=())
def bsr_linear(x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, row: torch.Tensor,
               tcrow: torch.Tensor, trow: torch.Tensor, tperm: torch.Tensor, bias: Optional[torch.Tensor],
               R: int, C: int, backend: str, strategy: str, order: str) -> torch.Tensor:
    backend = concrete_backend(backend, x.device)
    if backend == "cpu" and strategy == "auto":
        nnz, (r, c) = values.shape[0], values.shape[1:]
        density = nnz / max(1, (-(-R // r)) * (-(-C // c)))
        strategy = choose_cpu_strategy(x.shape[0], (R, C), (r, c), density, x.dtype)
    if backend == "cpu" and strategy == "cols" and order == "col":
        y = _cpu.forward_columns(x, values, tcrow, trow, (R, C), bias)       # no gather: stored by column
    else:
        bsm = _matrix(row_values(values, order, tperm), crow, col, row, tcrow, trow, tperm, R, C)
        if backend == "triton":
            return _triton().forward(x, bsm, bias)
        if backend == "dense":
            return torch.nn.functional.linear(x, bsm.to_dense(), bias)
        y = _cpu.forward(x, bsm, bias, strategy=strategy)
    if y.stride() != (1, y.shape[0]):          # the contract the fake implementation states
        y = y.t().contiguous().t()
    return y


@bsr_linear.register_fake
def _(x, values, crow, col, row, tcrow, trow, tperm, bias, R, C, backend, strategy, order):
    M = x.shape[0]
    if returns_transposed(backend, x.device):
        return x.new_empty((R, M)).t()
    return x.new_empty((M, R))


def _setup_context(ctx, inputs, output) -> None:
    x, values, crow, col, row, tcrow, trow, tperm, bias, R, C, backend, strategy, order = inputs
    ctx.save_for_backward(x, values, crow, col, row, tcrow, trow, tperm)
    ctx.R, ctx.C, ctx.backend, ctx.has_bias = R, C, concrete_backend(backend, x.device), bias is not None
    ctx.order = order


def _backward(ctx, dy):
    x, values, crow, col, row, tcrow, trow, tperm = ctx.saved_tensors
    bsm = _matrix(row_values(values, ctx.order, tperm), crow, col, row, tcrow, trow, tperm, ctx.R, ctx.C)
    kernels = _triton() if ctx.backend == "triton" else _cpu
    if ctx.backend == "triton":
        dy = dy.contiguous()
    dx = kernels.grad_input(dy, bsm) if ctx.needs_input_grad[0] else None
    dv = kernels.grad_values(dy, x, bsm) if ctx.needs_input_grad[1] else None
    if dv is not None and ctx.order == "col":
        dv = dv[tperm]                        # the gradient in the order the values are stored
    db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[8] else None
    return dx, dv, None, None, None, None, None, None, db, None, None, None, None, None


bsr_linear.register_autograd(_backward, setup_context=_setup_context)


def call(x2: torch.Tensor, bsm: BlockSparseMatrix, bias: Optional[torch.Tensor], backend: str,
         strategy: str) -> torch.Tensor:
    """torch.ops.planc.bsr_linear on a BlockSparseMatrix (values in block-row order)."""
    R, C = bsm.shape
    return torch.ops.planc.bsr_linear(x2, bsm.values, bsm.crow, bsm.col, bsm.row, bsm.tcrow, bsm.trow, bsm.tperm,
                                      bias, R, C, backend, strategy, "row")


INDEX_NAMES: List[str] = ["crow", "col", "row", "tcrow", "trow", "tperm"]
