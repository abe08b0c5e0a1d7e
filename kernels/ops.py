"""The public block-sparse linear op and its module, stk-style:

    block_sparse_linear(x, bsm, bias)  →  torch.ops.planc.bsr_linear (kernels/library.py:
                                          a registered op with its gradients)  →  launcher
                                          (kernels/backends.py: Triton on CUDA, kernels/cpu.py on CPU)

One frozen BlockSparseMatrix carries the support; its values are an explicit input of
the op so that a trainable Parameter gets gradients, on the support only (a sparse
phase can train through the lowered layer; pruned blocks stay absent).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from planc.kernels import library
from planc.kernels.format import BlockSparseMatrix


def block_sparse_linear(x: torch.Tensor, bsm: BlockSparseMatrix, bias: Optional[torch.Tensor] = None,
                        *, backend: str = "auto", strategy: str | None = None) -> torch.Tensor:
    """y = x·Wᵀ + bias with W the block-sparse matrix `bsm`; x (..., C) → (..., R).

    backend: "auto" (by x's device) or a backend of kernels/backends.py. strategy: the CPU formulation (kernels/cpu.py), chosen
    per shape by kernels/cost.py when None."""
    index = tuple(getattr(bsm, name) for name in library.INDEX_NAMES)
    return library.apply(x, bsm.values, "row", index, bias, bsm.shape, backend, strategy)


class BlockSparseLinear(nn.Module):
    """A Linear whose weight is block-sparse. `values` (nnz, r, c) is the trainable
    parameter; the support (index buffers) is fixed. Built by the lower pass.

    `order` is how `values` are stored (kernels/library.py): "col" (grouped by
    block-column) is what the CPU forward reads, so a layer lowered for the CPU holds its
    kept blocks once and in that order; "row" suits Triton. The layer computes the same
    either way, gradients included."""

    def __init__(self, bsm: BlockSparseMatrix, bias: Optional[torch.Tensor] = None, *,
                 backend: str = "auto", strategy: str | None = None, order: str = "row"):
        super().__init__()
        if order not in ("row", "col"):
            raise ValueError(f"expected order 'row' or 'col', got {order!r}")
        self.shape, self.block = tuple(bsm.shape), tuple(bsm.block)
        self.backend, self.strategy, self.order = backend, strategy, order
        values = bsm.values if order == "row" else bsm.grouped_by_column()
        self.values = nn.Parameter(values.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        for name in library.INDEX_NAMES:
            self.register_buffer(name, getattr(bsm, name).clone())
        # The CPU kernels return Yᵀ's transposed view, what a following sparse layer reads;
        # the lower pass sets this when the output goes elsewhere (attention, residual adds,
        # layer norms run slower, or fall off their fused kernels, on that layout).
        self.contiguous_output = False

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    def matrix(self) -> BlockSparseMatrix:
        """The BlockSparseMatrix (values in block-row order) over the current values."""
        index = tuple(getattr(self, name) for name in library.INDEX_NAMES)
        return BlockSparseMatrix.stored(self.values, self.order, index, self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        index = tuple(getattr(self, name) for name in library.INDEX_NAMES)
        return library.apply(x, self.values, self.order, index, self.bias, self.shape, self.backend, self.strategy,
                             "c" if self.contiguous_output else "t")

    def extra_repr(self) -> str:
        gr, gc = -(-self.shape[0] // self.block[0]), -(-self.shape[1] // self.block[1])
        return (f"in_features={self.shape[1]}, out_features={self.shape[0]}, block={self.block}, "
                f"nnz={self.values.shape[0]}/{gr * gc}, backend={self.backend}, order={self.order}"
                + (", contiguous output" if self.contiguous_output else ""))
