"""The public block-sparse linear op and its module, stk-style:

    block_sparse_linear(x, bsm, bias)  →  BlockSparseLinearFn (autograd)  →  launcher
                                          (Triton on CUDA, kernels/cpu.py on CPU)

One frozen BlockSparseMatrix carries the support; its values are an explicit input of
the autograd Function so that a trainable Parameter gets gradients, on the support only
(a sparse phase can train through the lowered layer; pruned blocks stay absent).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from planc.kernels import cpu as _cpu
from planc.kernels.format import BlockSparseMatrix

BACKENDS = ("auto", "triton", "cpu", "dense")


def _triton():
    # Imported lazily: importing it decorates the kernels, and whether they run in the
    # interpreter is decided by TRITON_INTERPRET at that moment.
    from planc.kernels import triton_bsr

    return triton_bsr


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"expected a backend in {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "cpu"
    return backend


class BlockSparseLinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, values, bias, bsm: BlockSparseMatrix, backend: str, strategy: str):
        if values is not bsm.values:
            bsm = bsm.with_values(values)
        if backend == "triton":
            y = _triton().forward(x, bsm, bias)
        elif backend == "dense":
            y = torch.nn.functional.linear(x, bsm.to_dense(), bias)
        else:
            y = _cpu.forward(x, bsm, bias, strategy=strategy)
        ctx.save_for_backward(x)
        ctx.bsm, ctx.backend, ctx.has_bias = bsm, backend, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        bsm = ctx.bsm
        dx = dv = db = None
        if ctx.backend == "triton":
            dy = dy.contiguous()
            if ctx.needs_input_grad[0]:
                dx = _triton().grad_input(dy, bsm)
            if ctx.needs_input_grad[1]:
                dv = _triton().grad_values(dy, x, bsm)
        else:
            if ctx.needs_input_grad[0]:
                dx = _cpu.grad_input(dy, bsm)
            if ctx.needs_input_grad[1]:
                dv = _cpu.grad_values(dy, x, bsm)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.sum(0)
        return dx, dv, db, None, None, None


def block_sparse_linear(x: torch.Tensor, bsm: BlockSparseMatrix, bias: Optional[torch.Tensor] = None,
                        *, backend: str = "auto", strategy: str | None = None) -> torch.Tensor:
    """y = x·Wᵀ + bias with W the block-sparse matrix `bsm`; x (..., C) → (..., R).

    backend: "auto" (Triton on CUDA, the CPU path elsewhere) | "triton" | "cpu" | "dense"
    (materialise W; a reference). strategy: the CPU formulation (kernels/cpu.py), chosen
    per shape by kernels/cost.py when None."""
    R, C = bsm.shape
    if x.shape[-1] != C:
        raise ValueError(f"expected x with last dimension {C}, got shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (R,):
        raise ValueError(f"expected bias of shape ({R},), got {tuple(bias.shape)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, C)
    backend = resolve_backend(backend, x.device)
    if strategy is None:
        from planc.kernels.cost import choose_cpu_strategy

        strategy = choose_cpu_strategy(x2.shape[0], bsm.shape, bsm.block, bsm.density, x.dtype)
    y = BlockSparseLinearFn.apply(x2, bsm.values, bias, bsm, backend, strategy)
    return y.reshape(*lead, R)


class BlockSparseLinear(nn.Module):
    """A Linear whose weight is block-sparse. `values` (nnz, r, c) is the trainable
    parameter; the support (index buffers) is fixed. Built by the lower pass."""

    def __init__(self, bsm: BlockSparseMatrix, bias: Optional[torch.Tensor] = None, *,
                 backend: str = "auto", strategy: str | None = None):
        super().__init__()
        self.shape, self.block = tuple(bsm.shape), tuple(bsm.block)
        self.backend, self.strategy = backend, strategy
        self.values = nn.Parameter(bsm.values.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        for name in ("crow", "col", "row", "tcrow", "trow", "tperm"):
            self.register_buffer(name, getattr(bsm, name).clone())
        self._cache = None   # (key, bsm) for inference

    @property
    def in_features(self) -> int:
        return self.shape[1]

    @property
    def out_features(self) -> int:
        return self.shape[0]

    def matrix(self) -> BlockSparseMatrix:
        """The BlockSparseMatrix over the current values. Without grad, the column-grouped
        values are cached until the values change (no gather per call)."""
        v = self.values
        training = torch.is_grad_enabled() and v.requires_grad
        key = (v.data_ptr(), v._version, v.device, v.dtype)
        if not training and self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        bsm = BlockSparseMatrix(shape=self.shape, block=self.block, values=v, crow=self.crow, col=self.col,
                                row=self.row, tcrow=self.tcrow, trow=self.trow, tperm=self.tperm)
        if not training:
            bsm = bsm.for_inference()
            self._cache = (key, bsm)
        return bsm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_sparse_linear(x, self.matrix(), self.bias, backend=self.backend, strategy=self.strategy)

    def extra_repr(self) -> str:
        gr, gc = -(-self.shape[0] // self.block[0]), -(-self.shape[1] // self.block[1])
        return (f"in_features={self.shape[1]}, out_features={self.shape[0]}, block={self.block}, "
                f"nnz={self.values.shape[0]}/{gr * gc}, backend={self.backend}")
