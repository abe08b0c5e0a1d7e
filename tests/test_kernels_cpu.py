"""The format, the CPU path, the autograd op, Conv2d through im2col and the cost model."""
import os

import pytest
import torch
import torch.nn.functional as F

from planc.blocks import BlockView
from planc.kernels import cpu
from planc.kernels.conv import BlockSparseConv2d, im2col
from planc.kernels.cost import choose_cpu_strategy, predict_speedup
from planc.kernels.format import BlockSparseMatrix
from planc.kernels.ops import BlockSparseLinear, block_sparse_linear

from _kernel_cases import SHAPES, SPARSITIES, TOL, make, rel_err

DTYPES = [torch.float64, torch.float32, torch.bfloat16]


# ---- format ------------------------------------------------------------------------

@pytest.mark.parametrize("R,C,block", SHAPES)
def test_format_round_trip_and_transposed_index(R, C, block):
    bsm, alive = make(R, C, block, 0.6, torch.float64)
    w = bsm.to_dense()
    assert torch.equal(BlockSparseMatrix.from_weight(w, block, alive).to_dense(), w)
    assert torch.equal(bsm.alive(), alive)
    # the transposed index lists the same blocks, grouped by column, rows ascending
    gc = bsm.grid[1]
    for j in range(gc):
        t0, t1 = int(bsm.tcrow[j]), int(bsm.tcrow[j + 1])
        rows = bsm.trow[t0:t1].tolist()
        assert rows == sorted(rows) and rows == alive[:, j].nonzero().flatten().tolist()
        assert bool((bsm.col[bsm.tperm[t0:t1]] == j).all())


def test_format_from_conv_weight_uses_the_block_view():
    w = torch.randn(8, 4, 3, 3)
    view = BlockView(tuple(w.shape), (4, 4))
    alive = torch.rand(view.grid) > 0.5
    w = w * view.expand(alive.float())
    bsm = BlockSparseMatrix.from_weight(w, (4, 4))
    assert bsm.shape == (8, 36)
    assert torch.equal(bsm.to_dense(), view.to_matrix(w))


def test_format_rejects_bad_inputs():
    bsm, _ = make(48, 64, (16, 16), 0.5, torch.float32)
    with pytest.raises(ValueError, match="values of shape"):
        bsm.with_values(torch.zeros(bsm.nnz + 1, 16, 16))
    with pytest.raises(ValueError, match="row pointers"):
        BlockSparseMatrix.from_bsr((48, 64), (16, 16), bsm.values, bsm.crow[:-1], bsm.col)


# ---- the CPU path ----------------------------------------------------------------------

@pytest.mark.parametrize("R,C,block", SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("strategy", ["cols", "rows", "mkl", "dense"])
def test_cpu_path_matches_float64_reference(R, C, block, sparsity, dtype, strategy):
    if strategy == "mkl" and dtype == torch.bfloat16:
        pytest.skip("torch.sparse BSR on CPU is fp32/fp64 only")
    if strategy == "mkl" and block[0] != block[1]:
        with pytest.raises(ValueError, match="square"):
            cpu.forward(torch.randn(3, C, dtype=dtype), make(R, C, block, sparsity, dtype)[0], strategy="mkl")
        return
    bsm, alive = make(R, C, block, sparsity, dtype, seed=R + C)
    g = torch.Generator().manual_seed(2)
    M = 37
    x = torch.randn(M, C, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(M, R, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(R, generator=g, dtype=torch.float64).to(dtype)
    w, xd, dyd = bsm.to_dense().double(), x.double(), dy.double()
    y = cpu.forward(x, bsm, bias, strategy=strategy)
    assert y.dtype == dtype and y.shape == (M, R)
    assert rel_err(y, xd @ w.t() + bias.double()) <= TOL[dtype]
    if strategy == "cols":
        dx = cpu.grad_input(dy, bsm)
        assert dx.shape == (M, C)
        if bsm.nnz:
            assert rel_err(dx, dyd @ w) <= TOL[dtype]
            ref_dv = BlockSparseMatrix.from_weight(dyd.t() @ xd, block, alive).values
            assert rel_err(cpu.grad_values(dy, x, bsm), ref_dv) <= TOL[dtype]
        else:
            assert torch.count_nonzero(dx) == 0 and cpu.grad_values(dy, x, bsm).shape[0] == 0


@pytest.fixture
def split_threads(monkeypatch):
    """Force the multi-thread split of the "cols" path even on tiny shapes, over 3
    threads so the row ranges are uneven; restores torch's thread count."""
    threads = torch.get_num_threads()
    from planc.kernels import cost

    monkeypatch.setattr(cost, "MIN_FLOPS_PER_THREAD", 0.0)
    torch.set_num_threads(3)
    yield 3
    torch.set_num_threads(threads)


@pytest.mark.parametrize("R,C,block", SHAPES)
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 0.9, 1.0])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
def test_cpu_cols_split_across_threads_matches_reference(split_threads, R, C, block, sparsity, dtype):
    bsm, alive = make(R, C, block, sparsity, dtype, seed=R * C)
    g = torch.Generator().manual_seed(3)
    M = 29
    x = torch.randn(M, C, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(M, R, generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(R, generator=g, dtype=torch.float64).to(dtype)
    w, xd, dyd = bsm.to_dense().double(), x.double(), dy.double()
    assert rel_err(cpu.forward(x, bsm, bias), xd @ w.t() + bias.double()) <= TOL[dtype]
    assert rel_err(cpu.forward(x, bsm), xd @ w.t()) <= TOL[dtype]
    dx = cpu.grad_input(dy, bsm)
    dv = cpu.grad_values(dy, x, bsm)
    if bsm.nnz:
        assert rel_err(dx, dyd @ w) <= TOL[dtype]
        assert rel_err(dv, BlockSparseMatrix.from_weight(dyd.t() @ xd, block, alive).values) <= TOL[dtype]
    else:
        assert torch.count_nonzero(dx) == 0 and dv.shape[0] == 0
    assert torch.get_num_threads() == split_threads      # the split restores the setting


@pytest.mark.parametrize("R,C,block", [(40, 36, (16, 16)), (30, 45, (5, 10)), (64, 96, (32, 32))])
def test_cpu_cols_token_tiles_match_reference(split_threads, monkeypatch, R, C, block):
    # tiles of 64 tokens (the smallest): 150 rows → 3 tiles, the last one partial
    monkeypatch.setattr(cpu, "_TILE_BYTES", 1)
    bsm, alive = make(R, C, block, 0.5, torch.float32, seed=9)
    x, dy, bias = torch.randn(150, C), torch.randn(150, R), torch.randn(R)
    w = bsm.to_dense().double()
    assert rel_err(cpu.forward(x, bsm, bias), x.double() @ w.t() + bias.double()) <= 1e-5
    assert rel_err(cpu.grad_input(dy, bsm), dy.double() @ w) <= 1e-5


def test_cpu_cols_split_with_unsorted_columns(split_threads):
    # a hand-built BSR index whose columns descend within each block-row: the threads
    # of dX scatter in that order, and the result is still right
    bsm, _ = make(64, 96, (16, 16), 0.4, torch.float64, seed=8)
    order = torch.cat([torch.arange(int(a), int(e)).flip(0) for a, e in zip(bsm.crow[:-1], bsm.crow[1:])])
    shuffled = BlockSparseMatrix.from_bsr(bsm.shape, bsm.block, bsm.values[order], bsm.crow, bsm.col[order])
    assert torch.equal(shuffled.to_dense(), bsm.to_dense())
    dy = torch.randn(5, 64, dtype=torch.float64)
    x = torch.randn(5, 96, dtype=torch.float64)
    assert rel_err(cpu.grad_input(dy, shuffled), dy @ bsm.to_dense()) <= 1e-12
    assert rel_err(cpu.forward(x, shuffled), x @ bsm.to_dense().t()) <= 1e-12


@pytest.mark.parametrize("layout", ["token_minor", "column_slice"])
def test_cpu_cols_reads_strided_inputs(split_threads, layout):
    # x as the previous sparse layer returns it (a transposed view), or a column slice
    bsm, _ = make(64, 96, (32, 32), 0.5, torch.float32, seed=6)
    base = torch.randn(96, 21) if layout == "token_minor" else torch.randn(21, 130)
    x = base.t() if layout == "token_minor" else base[:, 17:113]
    assert not x.is_contiguous()
    ref = x.double() @ bsm.to_dense().double().t()
    assert rel_err(cpu.forward(x, bsm), ref) <= 1e-5


def test_gradcheck_cpu_op_split_across_threads(split_threads):
    bsm, _ = make(40, 36, (16, 16), 0.5, torch.float64, seed=5)
    values = bsm.values.clone().requires_grad_(True)
    bias = torch.randn(40, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 36, dtype=torch.float64, requires_grad=True)

    def f(x, values, bias):
        return block_sparse_linear(x, bsm.with_values(values), bias, backend="cpu", strategy="cols")

    assert torch.autograd.gradcheck(f, (x, values, bias))


def test_cpu_output_chains_without_transposes():
    # the CPU forward returns a token-minor view; feeding it to the next layer works and
    # matches the dense reference
    b1, _ = make(48, 64, (16, 16), 0.5, torch.float32, seed=1)
    b2, _ = make(40, 48, (16, 16), 0.5, torch.float32, seed=2)
    x = torch.randn(9, 64)
    y = cpu.forward(torch.relu(cpu.forward(x, b1)), b2)
    ref = torch.relu(x.double() @ b1.to_dense().double().t()) @ b2.to_dense().double().t()
    assert rel_err(y, ref) <= 1e-5


def test_cpu_rejects_bad_shapes():
    bsm, _ = make(48, 64, (16, 16), 0.5, torch.float32)
    with pytest.raises(ValueError, match=r"\(M, 64\)"):
        cpu.forward(torch.randn(3, 60), bsm)
    with pytest.raises(ValueError, match="bias"):
        cpu.forward(torch.randn(3, 64), bsm, torch.randn(3))
    with pytest.raises(ValueError, match="strategy"):
        cpu.forward(torch.randn(3, 64), bsm, strategy="magic")


# ---- the autograd op -------------------------------------------------------------------

@pytest.mark.parametrize("R,C,block", [(40, 36, (16, 16)), (13, 11, (5, 4)), (12, 16, (8, 8))])
def test_gradcheck_cpu_op(R, C, block):
    bsm, _ = make(R, C, block, 0.5, torch.float64, seed=5)
    values = bsm.values.clone().requires_grad_(True)
    bias = torch.randn(R, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, C, dtype=torch.float64, requires_grad=True)

    def f(x, values, bias):
        return block_sparse_linear(x, bsm.with_values(values), bias, backend="cpu", strategy="cols")

    assert torch.autograd.gradcheck(f, (x, values, bias))


def test_module_trains_on_the_support_only():
    bsm, alive = make(48, 64, (16, 16), 0.6, torch.float32, seed=7)
    layer = BlockSparseLinear(bsm, torch.zeros(48), backend="cpu")
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(16, 64)
    before = layer(x).detach()
    layer(x).pow(2).mean().backward()
    opt.step()
    assert layer.values.grad.shape == bsm.values.shape
    with torch.no_grad():
        after = layer(x)        # the inference cache must see the in-place update
        dense = F.linear(x, layer.matrix().to_dense(), layer.bias)
    assert not torch.allclose(before, after)
    assert rel_err(after, dense.double()) <= 1e-5
    assert torch.equal(layer.matrix().alive(), alive)   # pruned blocks stay absent


# ---- conv ----------------------------------------------------------------------------

@pytest.mark.parametrize("cin,cout,k,stride,padding,dilation,block", [
    (4, 8, 3, 1, 1, 1, (4, 4)),
    (6, 16, 3, 2, 0, 1, (8, 3)),
    (8, 8, 1, 2, 0, 1, (4, 4)),      # 1×1 strided: no unfold
    (3, 10, (3, 2), 1, (1, 0), 2, (5, 3)),
])
def test_conv_matches_f_conv2d(cin, cout, k, stride, padding, dilation, block):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(cin, cout, k, stride=stride, padding=padding, dilation=dilation).double()
    view = BlockView(tuple(conv.weight.shape), block)
    with torch.no_grad():
        conv.weight.mul_(view.expand((torch.rand(view.grid) > 0.4).double()))
    bsm = BlockSparseMatrix.from_weight(conv.weight, block)
    sparse = BlockSparseConv2d(bsm, conv.bias, in_channels=cin, kernel_size=conv.kernel_size, stride=stride,
                               padding=padding, dilation=dilation, backend="cpu")
    x = torch.randn(2, cin, 9, 7, dtype=torch.float64)
    assert rel_err(sparse(x), conv(x)) <= 1e-12


def test_im2col_columns_follow_the_block_view_order():
    x = torch.randn(1, 3, 4, 4)
    w = torch.randn(5, 3, 2, 2)
    cols, ho, wo = im2col(x, 2)
    m = BlockView(tuple(w.shape), (1, 1)).to_matrix(w)        # (out, kh·kw·in), in fastest
    y = (cols @ m.t()).view(1, ho, wo, 5).permute(0, 3, 1, 2)
    assert rel_err(y, F.conv2d(x, w).double()) <= 1e-5


# ---- cost model ------------------------------------------------------------------------

def test_cost_model_is_monotone_and_sane():
    shape = (4096, 4096)
    s = [predict_speedup(512, shape, (32, 32), d) for d in (0.05, 0.1, 0.2, 0.5)]
    assert s == sorted(s, reverse=True)
    assert s[1] > 1.0 > predict_speedup(512, shape, (32, 32), 0.9)
    assert predict_speedup(8192, shape, (64, 64), 0.1, torch.bfloat16, "triton") > 1.0
    # the torch formulations (no native kernel)
    assert choose_cpu_strategy(512, shape, (32, 32), 0.1, native=False) == "cols"
    assert choose_cpu_strategy(512, shape, (32, 32), 1.0, native=False) == "dense"
    # many tokens, few kept blocks per block-row: the block-rows path; many kept: columns
    assert choose_cpu_strategy(8192, (384, 1536), (32, 32), 0.1, native=False) == "rows"
    assert choose_cpu_strategy(8192, (384, 1536), (32, 32), 0.3, native=False) == "cols"
    assert choose_cpu_strategy(512, (384, 384), (32, 32), 0.1, native=False) != "rows"
    # with it: every sparse layer, and still dense when nothing is pruned
    assert choose_cpu_strategy(512, shape, (32, 32), 0.1, native=True) == "native"
    assert choose_cpu_strategy(512, shape, (32, 32), 1.0, native=True) == "dense"


@pytest.mark.parametrize("order", ["row", "col"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("row_major", [False, True])
def test_the_rows_path_reads_blocks_stored_in_either_order(order, threads, row_major):
    """forward_rows on a lowered layer's stored blocks (either order, no gather), its
    token tiles (more than one here) and its threads: equal to the dense product."""
    from planc.kernels import cpu as cpu_module

    bsm, _ = make(96, 80, (16, 16), 0.6, torch.float32, seed=3)
    x, bias = torch.randn(1500, 80), torch.randn(96)
    values = bsm.values if order == "row" else bsm.grouped_by_column()
    index = (bsm.crow, bsm.col, bsm.row, bsm.tcrow, bsm.trow, bsm.tperm)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        old = cpu_module._ROW_TILE_BYTES
        cpu_module._ROW_TILE_BYTES = 16 * 4 * 256          # 256-token tiles: six of them
        y = cpu_module.forward_stored(x, values, order, index, bias, (96, 80), "rows",
                                      layout="c" if row_major else "t")
    finally:
        cpu_module._ROW_TILE_BYTES = old
        torch.set_num_threads(before)
    assert rel_err(y, x.double() @ bsm.to_dense().double().t() + bias.double()) <= 1e-5
    assert y.stride() == ((96, 1) if row_major else (1, 1500))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_one_thread_child_runs_after_the_parent_used_the_thread_pool(split_threads):
    # A forked child (a DataLoader worker) inherits the pool object but not its threads;
    # with one torch thread, as DataLoader workers run (torch's own multi-threaded ops
    # hang in a forked child once the parent used OpenMP), the kernel must not touch it.
    import multiprocessing as mp

    bsm, _ = make(64, 96, (16, 16), 0.5, torch.float32, seed=5)
    x = torch.randn(40, 96)
    cpu.forward(x, bsm)                                    # the parent starts its pool
    with mp.get_context("fork").Pool(1) as pool:
        got = pool.apply_async(_forward_in_child, (x, bsm)).get(timeout=60)
    torch.testing.assert_close(got, x @ bsm.to_dense().t(), rtol=1e-5, atol=1e-5)


def _forward_in_child(x, bsm):
    torch.set_num_threads(1)
    return cpu.forward(x, bsm).contiguous()


def test_the_threaded_path_under_inference_mode_then_outside_it(split_threads):
    # Inference mode is per thread: the workers must write the caller's inference-mode
    # output, and buffers kept from an inference-mode call must serve a later normal call.
    bsm, _ = make(64, 96, (16, 16), 0.5, torch.float32, seed=4)
    x = torch.randn(40, 96)
    want = x.double() @ bsm.to_dense().double().t()
    with torch.inference_mode():
        assert rel_err(cpu.forward(x, bsm), want) <= 1e-5
    with torch.no_grad():
        assert rel_err(cpu.forward(x, bsm), want) <= 1e-5
    xg = x.clone().requires_grad_(True)
    y = block_sparse_linear(xg, bsm)
    y.sum().backward()
    assert rel_err(y.detach(), want) <= 1e-5 and xg.grad is not None


@pytest.mark.parametrize("strategy", ["cols", "rows", "mkl", "dense"])
@pytest.mark.parametrize("R,C,block", [(96, 64, (32, 32)), (40, 48, (16, 16))])
@pytest.mark.parametrize("layout", ["t", "c"])
def test_the_cpu_op_returns_the_layout_its_fake_says(strategy, R, C, block, layout):
    # the op's output strides are part of its contract (torch.compile plans from the fake):
    # the CPU path returns Yᵀ's transposed view whatever the strategy, or with layout "c"
    # a contiguous matrix
    from planc.kernels import library

    bsm, _ = make(R, C, block, 0.5, torch.float32)
    x, bias = torch.randn(24, C), torch.randn(R)
    index = [getattr(bsm, n) for n in library.INDEX_NAMES]
    args = (x, bsm.values, *index, bias, R, C, "cpu", strategy, "row", layout)
    y = torch.ops.planc.bsr_linear(*args)
    assert y.stride() == ((1, 24) if layout == "t" else (R, 1)) and tuple(y.shape) == (24, R)
    torch.testing.assert_close(y, F.linear(x, bsm.to_dense(), bias), rtol=1e-5, atol=1e-5)
    torch.library.opcheck(torch.ops.planc.bsr_linear.default, args, test_utils=("test_faketensor",))
