"""Triton kernels for the block-sparse linear map Y = X·Wᵀ + b, W in BlockSparseMatrix form.

Layout: tokens are the M dimension, tiled by BLOCK_M; each program
owns one block-row of W (r output features) and walks its nonzero blocks through the row
pointers, so the weight block never sets the M tile (PyTorch's BSR kernel's weakness).

- forward  grid (M tiles, block-rows):  acc[BLOCK_M, r] += X[:, cols of block] · blockᵀ
- dX       grid (M tiles, block-cols):  through the transposed index (tcrow, trow, tperm)
- dW       grid (nnz,):                 one program per nonzero block, reducing over tokens

Block sizes. tl.dot on a GPU needs every dimension ≥ 16 (K ≥ 16 for 16-bit types). The
contraction dimension packs PACK consecutive nonzero blocks of a row into one
PACK·BLOCK_C ≥ 16 panel (8×8 blocks: two per dot). The block's own sizes are padded to
the next power of two ≥ 16 with masks (BLOCK_R, BLOCK_C), which makes 5, 10, 20 (the
paper's Criteo blocks) and partial edge blocks a correct general path; power-of-two
blocks 16–128 take it with every mask true.

The interpreter (TRITON_INTERPRET=1, read when this module is imported) runs these on
CPU tensors; its bf16 tl.dot is wrong, so UPCAST makes the dot fp32 there. It does not
enforce the GPU's dot limits, so `check_dot_shape` does, in Python, on every launch.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from planc.kernels.format import BlockSparseMatrix

INTERPRET = bool(triton.knobs.runtime.interpret)

# Every autotune key must be a real argument of the kernels (tests check it); the
# autotuner adds the dtypes of tensor arguments to the key by itself.
AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "R_BLK", "C_BLK", "DENSITY_BUCKET"]

_DOT_MIN = 16
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _pow2_at_least(n: int, floor: int = _DOT_MIN) -> int:
    return max(floor, triton.next_power_of_2(int(n)))


def check_dot_shape(m: int, n: int, k: int, dtype: torch.dtype) -> None:
    """The GPU's tl.dot limits, checked in Python because the interpreter does not:
    every dimension a power of two and at least 16 (K ≥ 16 is the one that bites for
    16-bit types; fp32 goes through tf32 with the same minimum)."""
    for name, v in (("M", m), ("N", n), ("K", k)):
        if v < _DOT_MIN or v & (v - 1):
            raise ValueError(f"tl.dot {name} tile must be a power of two >= {_DOT_MIN} for {dtype}, got {v}")


def block_meta(block) -> dict:
    """Padded tile sizes and packing for a weight block (r, c)."""
    r, c = int(block[0]), int(block[1])
    block_r = _pow2_at_least(r)
    block_c = triton.next_power_of_2(c)
    pack = max(1, _DOT_MIN // block_c)                # 8-wide blocks: pack 2 along K
    block_c_out = _pow2_at_least(c)                   # c as the N dim of the dX dot
    block_r_in = triton.next_power_of_2(r)
    pack_t = max(1, _DOT_MIN // block_r_in)           # r as the K dim of the dX dot
    return dict(BLOCK_R=block_r, BLOCK_C=block_c, PACK=pack, BLOCK_C_OUT=block_c_out,
                BLOCK_R_IN=block_r_in, PACK_T=pack_t)


def autotune_configs(kernel: str = "fwd"):
    """Autotune candidates; the interpreter gets exactly one (more fail without a GPU)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32}, num_warps=4, num_stages=1)]
    out = []
    for bm in (64, 128, 256):
        for warps in (4, 8):
            for stages in (2, 3, 4):
                if bm == 256 and warps == 4:
                    continue
                out.append(triton.Config({"BLOCK_M": bm}, num_warps=warps, num_stages=stages))
    if kernel == "dw":   # BLOCK_M is the reduction tile there: smaller ones are fine
        out = [c for c in out if c.kwargs["BLOCK_M"] <= 128]
    return out


def _buckets(M: int, bsm: BlockSparseMatrix):
    return triton.next_power_of_2(max(1, M)), int(round(bsm.density * 20))


# ---------------------------------------------------------------- forward ----------
@triton.autotune(configs=autotune_configs("fwd"), key=AUTOTUNE_KEY)
@triton.jit
def _bsr_fwd_kernel(
    x_ptr, values_ptr, crow_ptr, col_ptr, bias_ptr, y_ptr,
    M, N, K, R_BLK, C_BLK, M_BUCKET, DENSITY_BUCKET,
    stride_xm, stride_xk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PACK: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)                       # the block-row this program owns
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, PACK * BLOCK_C)
    q = offs_k // BLOCK_C                          # which packed block
    kk = offs_k % BLOCK_C                          # column inside that block
    start = tl.load(crow_ptr + pid_n)
    end = tl.load(crow_ptr + pid_n + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    # ---- walk the nonzero blocks of this block-row, PACK at a time
    for p in range(start, end, PACK):
        pq = p + q
        live = pq < end
        valid = live & (kk < C_BLK)
        j = tl.load(col_ptr + pq, mask=live, other=0)
        xcol = j * C_BLK + kk
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + xcol[None, :] * stride_xk
        x = tl.load(x_ptrs, mask=(offs_m[:, None] < M) & valid[None, :] & (xcol[None, :] < K), other=0.0)
        # blockᵀ: element [k, n] = values[pq, n, kk]
        w_ptrs = values_ptr + pq.to(tl.int64)[:, None] * (R_BLK * C_BLK) + offs_n[None, :] * C_BLK + kk[:, None]
        w = tl.load(w_ptrs, mask=valid[:, None] & (offs_n[None, :] < R_BLK), other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc += tl.dot(x, w)
    # ---- epilogue: bias, cast, masked store
    out_n = pid_n * R_BLK + offs_n
    n_ok = (offs_n < R_BLK) & (out_n < N)
    if HAS_BIAS:
        b = tl.load(bias_ptr + out_n, mask=n_ok, other=0.0)
        acc += b.to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + out_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & n_ok[None, :])


# ---------------------------------------------------------------- dX ---------------
@triton.autotune(configs=autotune_configs("dx"), key=AUTOTUNE_KEY)
@triton.jit
def _bsr_dx_kernel(
    dy_ptr, values_ptr, tcrow_ptr, trow_ptr, tperm_ptr, dx_ptr,
    M, N, K, R_BLK, C_BLK, M_BUCKET, DENSITY_BUCKET,
    stride_dym, stride_dyn, stride_dxm, stride_dxk,
    UPCAST: tl.constexpr,
    BLOCK_R_IN: tl.constexpr, BLOCK_C_OUT: tl.constexpr, PACK_T: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)                       # the block-column of W (input features)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_C_OUT)
    offs_r = tl.arange(0, PACK_T * BLOCK_R_IN)
    q = offs_r // BLOCK_R_IN
    rr = offs_r % BLOCK_R_IN
    start = tl.load(tcrow_ptr + pid_k)
    end = tl.load(tcrow_ptr + pid_k + 1)
    acc = tl.zeros((BLOCK_M, BLOCK_C_OUT), dtype=tl.float32)
    # ---- walk the nonzero blocks of this block-column through the transposed index
    for t in range(start, end, PACK_T):
        tq = t + q
        live = tq < end
        valid = live & (rr < R_BLK)
        i = tl.load(trow_ptr + tq, mask=live, other=0)
        p = tl.load(tperm_ptr + tq, mask=live, other=0)
        dycol = i * R_BLK + rr
        dy_ptrs = dy_ptr + offs_m[:, None] * stride_dym + dycol[None, :] * stride_dyn
        dy = tl.load(dy_ptrs, mask=(offs_m[:, None] < M) & valid[None, :] & (dycol[None, :] < N), other=0.0)
        # block: element [k, n] = values[p, rr, n]
        w_ptrs = values_ptr + p.to(tl.int64)[:, None] * (R_BLK * C_BLK) + rr[:, None] * C_BLK + offs_c[None, :]
        w = tl.load(w_ptrs, mask=valid[:, None] & (offs_c[None, :] < C_BLK), other=0.0)
        if UPCAST:
            dy = dy.to(tl.float32)
            w = w.to(tl.float32)
        acc += tl.dot(dy, w)
    out_k = pid_k * C_BLK + offs_c
    k_ok = (offs_c < C_BLK) & (out_k < K)
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + out_k[None, :] * stride_dxk
    tl.store(dx_ptrs, acc.to(dx_ptr.dtype.element_ty), mask=(offs_m[:, None] < M) & k_ok[None, :])


# ---------------------------------------------------------------- dW (support) -----
@triton.autotune(configs=autotune_configs("dw"), key=AUTOTUNE_KEY)
@triton.jit
def _bsr_dw_kernel(
    x_ptr, dy_ptr, row_ptr, col_ptr, dv_ptr,
    M, N, K, R_BLK, C_BLK, M_BUCKET, DENSITY_BUCKET,
    stride_xm, stride_xk, stride_dym, stride_dyn,
    UPCAST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C_OUT: tl.constexpr, BLOCK_M: tl.constexpr,
):
    p = tl.program_id(0)                           # one nonzero block
    i = tl.load(row_ptr + p)
    j = tl.load(col_ptr + p)
    offs_r = tl.arange(0, BLOCK_R)
    offs_c = tl.arange(0, BLOCK_C_OUT)
    rows = i * R_BLK + offs_r
    cols = j * C_BLK + offs_c
    r_ok = (offs_r < R_BLK) & (rows < N)
    c_ok = (offs_c < C_BLK) & (cols < K)
    acc = tl.zeros((BLOCK_R, BLOCK_C_OUT), dtype=tl.float32)
    # ---- reduce dYᵀ[rows, :] · X[:, cols] over the tokens
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_ok = offs_m < M
        dyt = tl.load(dy_ptr + offs_m[None, :] * stride_dym + rows[:, None] * stride_dyn,
                      mask=r_ok[:, None] & m_ok[None, :], other=0.0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + cols[None, :] * stride_xk,
                    mask=m_ok[:, None] & c_ok[None, :], other=0.0)
        if UPCAST:
            dyt = dyt.to(tl.float32)
            x = x.to(tl.float32)
        acc += tl.dot(dyt, x)
    dv_ptrs = dv_ptr + p.to(tl.int64) * (R_BLK * C_BLK) + offs_r[:, None] * C_BLK + offs_c[None, :]
    tl.store(dv_ptrs, acc.to(dv_ptr.dtype.element_ty), mask=(offs_r[:, None] < R_BLK) & (offs_c[None, :] < C_BLK))


# ---------------------------------------------------------------- launchers --------
def _check_inputs(x: torch.Tensor, bsm: BlockSparseMatrix, what: str, width: int) -> None:
    if x.dim() != 2 or x.shape[1] != width:
        raise ValueError(f"expected {what} of shape (M, {width}), got {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"expected {what} in {SUPPORTED_DTYPES}, got {x.dtype}")
    if bsm.values.dtype != x.dtype:
        raise ValueError(f"expected block values of dtype {x.dtype} (as {what}), got {bsm.values.dtype}")
    if x.device != bsm.values.device:
        raise ValueError(f"expected {what} on {bsm.values.device}, got {x.device}")
    if x.device.type != "cuda" and not INTERPRET:
        raise ValueError("the Triton kernels need a CUDA tensor, or TRITON_INTERPRET=1 set before "
                         "planc.kernels.triton_bsr is imported")


def _upcast(dtype: torch.dtype) -> bool:
    return INTERPRET and dtype == torch.bfloat16


def _check_tiles(configs, m_dim_names, meta, dtype) -> None:
    for cfg in configs:
        bm = cfg.kwargs["BLOCK_M"]
        dims = {"BLOCK_M": bm, **meta}
        m, n, k = (dims[name] for name in m_dim_names)
        check_dot_shape(m, n, k, dtype)


@functools.lru_cache(maxsize=None)
def _checked(block, dtype):
    meta = block_meta(block)
    pk = dict(meta, PACK_K=meta["PACK"] * meta["BLOCK_C"], PACK_T_K=meta["PACK_T"] * meta["BLOCK_R_IN"])
    _check_tiles(_bsr_fwd_kernel.configs, ("BLOCK_M", "BLOCK_R", "PACK_K"), pk, dtype)
    _check_tiles(_bsr_dx_kernel.configs, ("BLOCK_M", "BLOCK_C_OUT", "PACK_T_K"), pk, dtype)
    _check_tiles(_bsr_dw_kernel.configs, ("BLOCK_R", "BLOCK_C_OUT", "BLOCK_M"), pk, dtype)
    return meta


def forward_stored(x: torch.Tensor, values: torch.Tensor, order: str, index, bias: torch.Tensor | None,
                   shape, strategy: str = "auto") -> torch.Tensor:
    """The forward of a lowered layer from its stored blocks (kernels/library.py's op)."""
    return forward(x, BlockSparseMatrix.stored(values, order, index, shape), bias)


def forward(x: torch.Tensor, bsm: BlockSparseMatrix, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Y = x·Wᵀ + bias, x (M, C) → (M, R), in x's dtype (fp32 accumulation)."""
    _check_inputs(x, bsm, "x", bsm.shape[1])
    if bias is not None and tuple(bias.shape) != (bsm.shape[0],):
        raise ValueError(f"expected bias of shape ({bsm.shape[0]},), got {tuple(bias.shape)}")
    meta = _checked(bsm.block, x.dtype)
    (R, C), (r, c), (gr, gc) = bsm.shape, bsm.block, bsm.grid
    M = x.shape[0]
    y = torch.empty(M, R, device=x.device, dtype=x.dtype)
    if M == 0:
        return y
    mb, db = _buckets(M, bsm)
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]), gr)  # noqa: E731
    _bsr_fwd_kernel[grid](
        x, bsm.values, bsm.crow, bsm.col, bias if bias is not None else y, y,
        M, R, C, r, c, mb, db,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, UPCAST=_upcast(x.dtype),
        BLOCK_R=meta["BLOCK_R"], BLOCK_C=meta["BLOCK_C"], PACK=meta["PACK"],
    )
    return y


def grad_input(dy: torch.Tensor, bsm: BlockSparseMatrix) -> torch.Tensor:
    """dX = dy·W, dy (M, R) → (M, C)."""
    _check_inputs(dy, bsm, "dy", bsm.shape[0])
    meta = _checked(bsm.block, dy.dtype)
    (R, C), (r, c), (gr, gc) = bsm.shape, bsm.block, bsm.grid
    M = dy.shape[0]
    dx = torch.empty(M, C, device=dy.device, dtype=dy.dtype)
    if M == 0:
        return dx
    mb, db = _buckets(M, bsm)
    grid = lambda META: (triton.cdiv(M, META["BLOCK_M"]), gc)  # noqa: E731
    _bsr_dx_kernel[grid](
        dy, bsm.values, bsm.tcrow, bsm.trow, bsm.tperm, dx,
        M, R, C, r, c, mb, db,
        dy.stride(0), dy.stride(1), dx.stride(0), dx.stride(1),
        UPCAST=_upcast(dy.dtype),
        BLOCK_R_IN=meta["BLOCK_R_IN"], BLOCK_C_OUT=meta["BLOCK_C_OUT"], PACK_T=meta["PACK_T"],
    )
    return dx


def grad_values(dy: torch.Tensor, x: torch.Tensor, bsm: BlockSparseMatrix) -> torch.Tensor:
    """dW on the support only, (nnz, r, c)."""
    _check_inputs(dy, bsm, "dy", bsm.shape[0])
    _check_inputs(x, bsm, "x", bsm.shape[1])
    if dy.shape[0] != x.shape[0]:
        raise ValueError(f"expected dy and x with the same token count, got {dy.shape[0]} and {x.shape[0]}")
    meta = _checked(bsm.block, dy.dtype)
    (R, C), (r, c) = bsm.shape, bsm.block
    M = dy.shape[0]
    dv = torch.zeros(bsm.nnz, r, c, device=dy.device, dtype=bsm.values.dtype)
    if bsm.nnz == 0 or M == 0:
        return dv
    mb, db = _buckets(M, bsm)
    _bsr_dw_kernel[(bsm.nnz,)](
        x, dy, bsm.row, bsm.col, dv,
        M, R, C, r, c, mb, db,
        x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
        UPCAST=_upcast(dy.dtype),
        BLOCK_R=meta["BLOCK_R"], BLOCK_C_OUT=meta["BLOCK_C_OUT"],
    )
    return dv
