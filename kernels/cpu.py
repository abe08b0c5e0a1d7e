"""The CPU path of the block-sparse linear map Y = X·Wᵀ + b (and its backward).

Measured on this machine (2 cores, torch 2.13, MKL; see docs/benchmarks.md): the fastest
correct formulation is *column panels*, not MKL BSR. Keep activations token-minor
(Xᵀ, C×M) and, for each block-column j of W, multiply the stacked nonzero blocks of
that column (k·r × c) by the contiguous slab Xᵀ[j·c:(j+1)·c] (c × M), then scatter-add
the k result blocks into Yᵀ. Every GEMM reads its X slab in place (no gather), has
M = k·r rows (large enough for MKL), and the scatter is one `index_add_` per column.
The result is returned as Yᵀ's transpose, a view: the next sparse layer wants Xᵀ
contiguous anyway, so chained sparse layers never transpose (elementwise ops between
them keep the layout).

Strategies, chosen per shape by `choose_strategy` (kernels/cost.py):
- "cols":  column panels as above (forward); the mirror image for dX; per block-row
           GEMMs for dW on the support only.
- "mkl":   torch.sparse BSR in its fast formulation (W_bsr @ Xᵀ)ᵀ (fp32/fp64 only).
- "dense": materialise W and call F.linear (small layers, high density).
16-bit inputs are computed in fp32 on CPU (MKL's half GEMMs are slower and the
scatter-add would round every partial sum) and cast back.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from planc.kernels.format import BlockSparseMatrix

STRATEGIES = ("cols", "mkl", "dense")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _token_minor(x: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """xᵀ as a contiguous (rows, M) matrix, zero-padded from x.shape[1] to `rows`."""
    xt = x.t().to(dtype).contiguous()   # a no-op when x is already a transposed view
    if rows > xt.shape[0]:
        xt = F.pad(xt, (0, 0, 0, rows - xt.shape[0]))
    return xt


def _check(x: torch.Tensor, bsm: BlockSparseMatrix, bias: torch.Tensor | None) -> None:
    if x.dim() != 2 or x.shape[1] != bsm.shape[1]:
        raise ValueError(f"expected x of shape (M, {bsm.shape[1]}), got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (bsm.shape[0],):
        raise ValueError(f"expected bias of shape ({bsm.shape[0]},), got {tuple(bias.shape)}")


def forward(x: torch.Tensor, bsm: BlockSparseMatrix, bias: torch.Tensor | None = None,
            strategy: str = "cols") -> torch.Tensor:
    """Y = x·Wᵀ + bias for x (M, C); returns (M, R) in x's dtype."""
    _check(x, bsm, bias)
    out_dtype, cd = x.dtype, _compute_dtype(x.dtype)
    (R, C), (r, c), (gr, gc) = bsm.shape, bsm.block, bsm.grid
    M = x.shape[0]
    if strategy == "dense":
        return F.linear(x.to(cd), bsm.to_dense().to(cd), None if bias is None else bias.to(cd)).to(out_dtype)
    if strategy == "mkl":
        if cd not in (torch.float32, torch.float64):
            raise ValueError(f"torch.sparse BSR on CPU supports float32/float64, got {cd}")
        if r != c:
            raise ValueError(f"torch.sparse BSR on CPU (MKL) needs square blocks, got {r}×{c}")
        with warnings.catch_warnings():   # "BSR support is in beta state"
            warnings.simplefilter("ignore")
            w = torch.sparse_bsr_tensor(bsm.crow, bsm.col, bsm.values.to(cd), size=(gr * r, gc * c),
                                        check_invariants=False)
        yt = (w @ _token_minor(x, gc * c, cd))[:R]
        y = yt.t()
        return (y if bias is None else y + bias.to(cd)).to(out_dtype)
    if strategy != "cols":
        raise ValueError(f"expected a CPU strategy in {STRATEGIES}, got {strategy!r}")

    xt = _token_minor(x, gc * c, cd)
    # start from the bias: saves a pass over Y
    if bias is None:
        yt = torch.zeros(gr, r, M, dtype=cd, device=x.device)
    else:
        b = F.pad(bias.detach().to(cd), (0, gr * r - R)).view(gr, r, 1)
        yt = b.expand(gr, r, M).contiguous()
    if bsm.nnz:
        panels = bsm.grouped_by_column().to(cd).reshape(bsm.nnz * r, c)
        _accumulate_panels(yt, panels, xt, bsm.tcrow.tolist(), bsm.trow.long(), r, c)
    return yt.view(gr * r, M)[:R].t().to(out_dtype)


def _accumulate_panels(out: torch.Tensor, panels: torch.Tensor, src_t: torch.Tensor, ptr, dest: torch.Tensor,
                       out_width: int, in_width: int) -> None:
    """The column-panel scheme shared by forward and dX. Group g of blocks (ptr[g] to
    ptr[g+1], stacked in `panels` as (k·out_width, in_width)) all read the same slab
    src_t[g·in_width : (g+1)·in_width] (token-minor), so one GEMM serves the group; its
    k block products are scatter-added into `out` (groups, out_width, M) at `dest`."""
    M = src_t.shape[1]
    for g in range(len(ptr) - 1):
        a, e = ptr[g], ptr[g + 1]
        if a == e:
            continue
        prod = torch.mm(panels[a * out_width:e * out_width], src_t[g * in_width:(g + 1) * in_width])
        out.index_add_(0, dest[a:e], prod.view(e - a, out_width, M))


def grad_input(dy: torch.Tensor, bsm: BlockSparseMatrix) -> torch.Tensor:
    """dX = dY·W for dy (M, R); returns (M, C). Block-rows of W are the column panels
    of Wᵀ, so this is forward's scheme through the row pointers."""
    if dy.dim() != 2 or dy.shape[1] != bsm.shape[0]:
        raise ValueError(f"expected dy of shape (M, {bsm.shape[0]}), got {tuple(dy.shape)}")
    out_dtype, cd = dy.dtype, _compute_dtype(dy.dtype)
    (R, C), (r, c), (gr, gc) = bsm.shape, bsm.block, bsm.grid
    M = dy.shape[0]
    dxt = torch.zeros(gc, c, M, dtype=cd, device=dy.device)
    if bsm.nnz:
        dyt = _token_minor(dy, gr * r, cd)
        panels = bsm.values.detach().to(cd).transpose(1, 2).reshape(bsm.nnz * c, r)   # Wᵀ blocks
        _accumulate_panels(dxt, panels, dyt, bsm.crow.tolist(), bsm.col.long(), c, r)
    return dxt.view(gc * c, M)[:C].t().to(out_dtype)


def grad_values(dy: torch.Tensor, x: torch.Tensor, bsm: BlockSparseMatrix) -> torch.Tensor:
    """dW on the support only: (nnz, r, c), block p = dY[:, rows_p]ᵀ · X[:, cols_p]."""
    out_dtype, cd = bsm.values.dtype, _compute_dtype(dy.dtype)
    (R, C), (r, c), (gr, gc) = bsm.shape, bsm.block, bsm.grid
    M = dy.shape[0]
    dv = torch.zeros(bsm.nnz, r, c, dtype=cd, device=dy.device)
    if bsm.nnz:
        dyt = _token_minor(dy, gr * r, cd)
        xb = _token_minor(x, gc * c, cd).view(gc, c, M)
        col = bsm.col.long()
        rc = bsm.crow.tolist()
        for i in range(gr):
            a, e = rc[i], rc[i + 1]
            if a == e:
                continue
            xs = xb[col[a:e]].view((e - a) * c, M)                       # live column slabs
            g = torch.mm(dyt[i * r:(i + 1) * r], xs.t())                 # (r, k·c)
            dv[a:e] = g.view(r, e - a, c).transpose(0, 1)
    return dv.to(out_dtype)
