"""Triton kernels (forward, dX, dW on the support) against a float64 dense reference,
in Triton's interpreter on CPU (tests/conftest.py sets TRITON_INTERPRET=1 there)."""
import inspect
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton_bsr decorates its kernels

from planc.kernels import triton_bsr as tb  # noqa: E402
from planc.kernels.format import BlockSparseMatrix  # noqa: E402
from planc.kernels.ops import block_sparse_linear  # noqa: E402

from _kernel_cases import SHAPES, SPARSITIES, TOL, make, rel_err  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not tb.INTERPRET,
                                reason="no CUDA and triton_bsr was imported without TRITON_INTERPRET=1")


@pytest.mark.parametrize("R,C,block", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_kernels_match_float64_reference(R, C, block, sparsity, dtype):
    bsm, alive = make(R, C, block, sparsity, dtype, seed=R * C)
    bsm = bsm.to(DEVICE)
    g = torch.Generator().manual_seed(1)
    M = 37                                          # odd token count: two partial M tiles
    x = torch.randn(M, C, generator=g).to(DEVICE, dtype)
    dy = torch.randn(M, R, generator=g).to(DEVICE, dtype)
    bias = torch.randn(R, generator=g).to(DEVICE, dtype)
    w = bsm.to_dense().double().cpu()
    xd, dyd = x.double().cpu(), dy.double().cpu()

    y = tb.forward(x, bsm, bias)
    assert y.dtype == dtype and y.shape == (M, R)
    ref = xd @ w.t() + bias.double().cpu()
    assert rel_err(y.cpu(), ref) <= TOL[dtype]

    dx = tb.grad_input(dy, bsm)
    assert dx.shape == (M, C)
    if bsm.nnz:
        assert rel_err(dx.cpu(), dyd @ w) <= TOL[dtype]
    else:
        assert torch.count_nonzero(dx) == 0

    dv = tb.grad_values(dy, x, bsm)
    assert dv.shape == bsm.values.shape
    if bsm.nnz:
        ref_dv = BlockSparseMatrix.from_weight(dyd.t() @ xd, block, alive).values
        assert rel_err(dv.cpu(), ref_dv) <= TOL[dtype]


def test_single_token_and_no_bias():
    bsm, _ = make(40, 36, (16, 16), 0.5, torch.float32)
    x = torch.randn(1, 36)
    y = tb.forward(x.to(DEVICE), bsm.to(DEVICE))
    assert rel_err(y.cpu(), x.double() @ bsm.to_dense().double().t()) <= 1e-5


def test_check_dot_shape_enforces_gpu_limits():
    tb.check_dot_shape(16, 16, 16, torch.bfloat16)
    with pytest.raises(ValueError, match="K tile"):
        tb.check_dot_shape(32, 32, 8, torch.float16)
    with pytest.raises(ValueError, match="power of two"):
        tb.check_dot_shape(32, 24, 16, torch.float32)


@pytest.mark.parametrize("block", [(8, 8), (5, 10), (10, 5), (20, 20), (16, 16), (128, 128), (4, 64)])
def test_every_launch_uses_legal_dot_tiles(block):
    meta = tb._checked(block, torch.bfloat16)     # raises if a dot tile breaks the GPU limits
    assert meta["PACK"] * meta["BLOCK_C"] >= 16 and meta["PACK_T"] * meta["BLOCK_R_IN"] >= 16
    if block == (8, 8):
        assert meta["PACK"] == 2                   # two 8-wide blocks per 16-wide panel


def test_autotune_keys_are_real_kernel_arguments():
    for kernel in (tb._bsr_fwd_kernel, tb._bsr_dx_kernel, tb._bsr_dw_kernel):
        names = set(kernel.arg_names)
        assert set(tb.AUTOTUNE_KEY) <= names, set(tb.AUTOTUNE_KEY) - names
        for cfg in kernel.configs:
            assert set(cfg.kwargs) <= names
    for which in ("fwd", "dx", "dw"):
        configs = tb.autotune_configs(which)
        assert configs and all("BLOCK_M" in c.kwargs for c in configs)
        if tb.INTERPRET:
            assert len(configs) == 1


def test_wrappers_reject_bad_inputs():
    bsm, _ = make(48, 64, (16, 16), 0.5, torch.float32)
    bsm = bsm.to(DEVICE)
    with pytest.raises(ValueError, match="shape"):
        tb.forward(torch.randn(4, 63, device=DEVICE), bsm)
    with pytest.raises(ValueError, match="dtype"):
        tb.forward(torch.randn(4, 64, device=DEVICE, dtype=torch.float16), bsm)
    with pytest.raises(ValueError, match="bias"):
        tb.forward(torch.randn(4, 64, device=DEVICE), bsm, torch.randn(47, device=DEVICE))
    with pytest.raises(ValueError, match="shape"):
        tb.grad_input(torch.randn(4, 64, device=DEVICE), bsm)


@pytest.mark.parametrize("R,C,block", [(40, 36, (16, 16)), (33, 50, (8, 8))])
def test_autograd_through_triton_matches_dense(R, C, block):
    bsm, alive = make(R, C, block, 0.5, torch.float32, seed=3)
    bsm = bsm.to(DEVICE)
    values = bsm.values.clone().requires_grad_(True)
    bias = torch.randn(R, device=DEVICE, requires_grad=True)
    x = torch.randn(2, 9, C, device=DEVICE, requires_grad=True)
    y = block_sparse_linear(x, bsm.with_values(values), bias, backend="triton")
    (y * torch.linspace(-1, 1, R, device=DEVICE)).sum().backward()

    w = bsm.to_dense().detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    b2 = bias.detach().clone().requires_grad_(True)
    y2 = torch.nn.functional.linear(x2, w, b2)
    (y2 * torch.linspace(-1, 1, R, device=DEVICE)).sum().backward()
    assert rel_err(y.detach().cpu(), y2.detach().double().cpu()) <= 1e-5
    assert rel_err(x.grad.cpu(), x2.grad.double().cpu()) <= 1e-5
    assert rel_err(bias.grad.cpu(), b2.grad.double().cpu()) <= 1e-5
    ref_dv = BlockSparseMatrix.from_weight(w.grad.cpu(), block, alive.cpu()).values
    assert rel_err(values.grad.cpu(), ref_dv.double()) <= 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_large_shape(dtype):
    bsm, _ = make(512, 768, (64, 64), 0.8, dtype)
    bsm = bsm.to("cuda")
    x = torch.randn(1000, 768, device="cuda", dtype=dtype)
    y = tb.forward(x, bsm)
    assert rel_err(y.cpu(), x.double().cpu() @ bsm.to_dense().double().cpu().t()) <= TOL[dtype]


def test_kernel_signatures_follow_the_argument_order():
    # pointers, then sizes, then strides, then constexpr meta-parameters in UPPER_SNAKE
    for kernel in (tb._bsr_fwd_kernel, tb._bsr_dx_kernel, tb._bsr_dw_kernel):
        names = kernel.arg_names
        kinds = ["ptr" if n.endswith("_ptr") else "stride" if n.startswith("stride_") else "size" for n in names
                 if not n.isupper() or n in ("M", "N", "K") or n in tb.AUTOTUNE_KEY]
        assert kinds == sorted(kinds, key=["ptr", "size", "stride"].index)
        fn = inspect.signature(kernel.fn.fn if hasattr(kernel.fn, "fn") else kernel.fn)
        assert list(fn.parameters) == names
