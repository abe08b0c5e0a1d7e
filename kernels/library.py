"""The block-sparse linear map as a registered PyTorch operator: `torch.ops.planc.bsr_linear`.

Why an operator and not only an autograd Function: a graph that calls a registered op
with a fake (shape-only) implementation can be traced by torch.export, compiled by
torch.compile and saved as data (planc.artifact) — the lowered model becomes a program
of aten and planc ops over tensors, loadable without any of the model's own code.

    bsr_linear(x (M, C), values (nnz, r, c), crow, col, row, tcrow, trow, tperm,
               bias (R,) or None, R, C, backend, strategy, order, layout="t") -> (M, R)

The index tensors are a BlockSparseMatrix's (kernels/format.py). `backend` names a
record of kernels/backends.py, or "auto" (by the input's device: a loaded program says
"auto", so it runs wherever its tensors are moved); the op calls that backend's kernel
module. `strategy` is the CPU formulation (kernels/cpu.py), or "auto": chosen inside the
op for each call's row count (kernels/cost.py), so that a traced graph does not fix it
to the example's batch size. The result's strides are part of the contract, since
torch.compile plans later ops from the fake result: with `layout` "t" a backend whose
record says `transposed_output` (the CPU path) returns Yᵀ's transposed view (strides
(1, M), what the next sparse layer wants) whatever the strategy, the others a contiguous
matrix; with "c" every backend returns a contiguous matrix (the lower pass asks for it
where the consumer is not a lowered layer, and the CPU's block-rows path then writes Y
row-major directly instead of transposing). The fake implementation says the same.

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

from planc.kernels import backends
from planc.kernels.format import BlockSparseMatrix


def _stored_matrix(values, order, index, R: int, C: int) -> BlockSparseMatrix:
    return BlockSparseMatrix.stored(values, order, index, (R, C))


def returns_transposed(backend: str, device: torch.device) -> bool:
    return backends.resolve(backend, device).transposed_output


@torch.library.custom_op("planc::bsr_linear", mutates_args=())
def bsr_linear(x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, row: torch.Tensor,
               tcrow: torch.Tensor, trow: torch.Tensor, tperm: torch.Tensor, bias: Optional[torch.Tensor],
               R: int, C: int, backend: str, strategy: str, order: str, layout: str = "t") -> torch.Tensor:
    chosen = backends.resolve(backend, x.device)
    index = (crow, col, row, tcrow, trow, tperm)
    if chosen.transposed_output:             # the CPU path: it can write either layout
        y = chosen.module().forward_stored(x, values, order, index, bias, (R, C), strategy, layout=layout)
    else:
        y = chosen.module().forward_stored(x, values, order, index, bias, (R, C), strategy)
    if layout == "c":
        return y.contiguous()
    if chosen.transposed_output:
        if y.stride() != (1, y.shape[0]):      # the contract the fake implementation states
            y = y.t().contiguous().t()
        return y
    return y.contiguous()


@bsr_linear.register_fake
def _(x, values, crow, col, row, tcrow, trow, tperm, bias, R, C, backend, strategy, order, layout="t"):
    M = x.shape[0]
    if layout != "c" and returns_transposed(backend, x.device):
        return x.new_empty((R, M)).t()
    return x.new_empty((M, R))


def _setup_context(ctx, inputs, output) -> None:
    x, values, crow, col, row, tcrow, trow, tperm, bias, R, C, backend, strategy, order = inputs[:14]
    ctx.save_for_backward(x, values, crow, col, row, tcrow, trow, tperm)
    ctx.R, ctx.C, ctx.has_bias, ctx.order = R, C, bias is not None, order
    ctx.backend = backends.resolve(backend, x.device)


def _backward(ctx, dy):
    x, values, crow, col, row, tcrow, trow, tperm = ctx.saved_tensors
    bsm = _stored_matrix(values, ctx.order, (crow, col, row, tcrow, trow, tperm), ctx.R, ctx.C)
    kernels = ctx.backend.module()
    dx = kernels.grad_input(dy, bsm) if ctx.needs_input_grad[0] else None
    dv = kernels.grad_values(dy, x, bsm) if ctx.needs_input_grad[1] else None
    if dv is not None and ctx.order == "col":
        dv = dv[tperm]                        # the gradient in the order the values are stored
    db = dy.sum(0) if ctx.has_bias and ctx.needs_input_grad[8] else None
    return dx, dv, None, None, None, None, None, None, db, None, None, None, None, None, None


bsr_linear.register_autograd(_backward, setup_context=_setup_context)


def apply(x: torch.Tensor, values: torch.Tensor, order: str, index, bias: Optional[torch.Tensor], shape,
          backend: str, strategy: Optional[str], layout: str = "t") -> torch.Tensor:
    """y = x·Wᵀ + bias through the op, for x (..., C) → (..., R): W's stored blocks
    `values` in `order`, its index tensors (INDEX_NAMES order) and shape (R, C).
    `layout` "c" asks for a contiguous result, "t" for the backend's own (the CPU's Yᵀ
    view)."""
    R, C = (int(v) for v in shape)
    if x.shape[-1] != C:
        raise ValueError(f"expected x with last dimension {C}, got shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (R,):
        raise ValueError(f"expected bias of shape ({R},), got {tuple(bias.shape)}")
    y = torch.ops.planc.bsr_linear(x.reshape(-1, C), values, *index, bias, R, C,
                                   backends.resolve(backend, x.device).name, strategy or "auto", order, layout)
    return y.reshape(*x.shape[:-1], R)


INDEX_NAMES: List[str] = ["crow", "col", "row", "tcrow", "trow", "tperm"]
