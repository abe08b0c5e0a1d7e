"""The implicit-GEMM conv (kernels/conv.py): equal to F.conv2d on random inputs, used
for inference and exported as one op, never in training."""
import pytest
import torch
import torch.nn.functional as F

from planc.blocks import BlockView
from planc.kernels.conv import BlockSparseConv2d, implicit_forward
from planc.kernels.format import BlockSparseMatrix


def _sparse_weight(shape, block, density=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    view = BlockView(tuple(shape), block)
    view.zero_blocks_(w, torch.rand(view.grid, generator=g) > density)
    return w


def rel(a, b):
    return float((a - b).detach().abs().max() / b.abs().max())


@pytest.mark.parametrize("cin,cout,kernel,padding,dilation,block,x_shape", [
    (64, 48, (3, 3), (1, 1), (1, 1), (16, 16), (2, 9, 7)),
    (32, 32, (3, 3), (0, 0), (1, 1), (8, 8), (1, 6, 6)),          # no padding
    (16, 40, (3, 3), (2, 2), (2, 2), (8, 16), (3, 10, 8)),        # dilation; 40 rows in 8-row blocks
    (32, 30, (1, 1), (0, 0), (1, 1), (16, 32), (2, 5, 5)),        # 1×1; a partial last block-row
    (32, 24, (3, 5), (1, 2), (1, 1), (8, 8), (2, 7, 9)),          # a non-square kernel
])
@pytest.mark.parametrize("bias", [True, False])
def test_implicit_gemm_equals_conv2d(cin, cout, kernel, padding, dilation, block, x_shape, bias):
    w = _sparse_weight((cout, cin, *kernel), block)
    b = torch.randn(cout) if bias else None
    bsm = BlockSparseMatrix.from_weight(w, block)
    x = torch.randn(x_shape[0], cin, *x_shape[1:])
    got = implicit_forward(x, bsm.grouped_by_column(), bsm.tcrow, bsm.trow, b, cout, kernel, padding, dilation)
    ref = F.conv2d(x, w, b, 1, padding, dilation)
    assert got.shape == ref.shape and got.is_contiguous()
    assert rel(got, ref) <= 1e-5


@pytest.mark.parametrize("order", ["row", "col"])
def test_an_eval_conv_runs_the_implicit_op_and_a_training_one_im2col(order):
    w = _sparse_weight((48, 64, 3, 3), (16, 16))
    b = torch.randn(48)
    conv = BlockSparseConv2d(BlockSparseMatrix.from_weight(w, (16, 16)), b, in_channels=64, kernel_size=3,
                             padding=1, backend="cpu", order=order)
    x = torch.randn(2, 64, 9, 7)
    ref = F.conv2d(x, w, b, 1, 1)
    conv.eval()
    graph = torch.export.export(conv, (x,), strict=False).graph
    assert [n.target for n in graph.nodes if n.op == "call_function"] == [torch.ops.planc.bsr_conv2d.default]
    assert rel(conv(x), ref) <= 1e-5
    conv.train()                                   # the values train through im2col and bsr_linear
    y = conv(x)
    assert rel(y, ref) <= 1e-5
    y.square().sum().backward()
    assert conv.linear.values.grad is not None and conv.linear.values.grad.abs().sum() > 0


def test_backward_through_the_inference_op_says_what_to_do():
    w = _sparse_weight((16, 16, 3, 3), (8, 8))
    conv = BlockSparseConv2d(BlockSparseMatrix.from_weight(w, (8, 8)), None, in_channels=16, kernel_size=3,
                             padding=1, backend="cpu").eval()
    y = conv(torch.randn(1, 16, 5, 5))
    with pytest.raises(RuntimeError, match="train mode"):
        y.sum().backward()


def test_the_op_falls_back_to_patches_when_blocks_straddle_taps():
    """24 input channels in 16-column blocks: a block spans two kernel taps, which no
    shifted view covers; the op computes through im2col instead, with the same result."""
    w = _sparse_weight((32, 24, 3, 3), (16, 16))
    bsm = BlockSparseMatrix.from_weight(w, (16, 16))
    x = torch.randn(2, 24, 6, 6)
    y = torch.ops.planc.bsr_conv2d(x, bsm.values, bsm.crow, bsm.col, bsm.row, bsm.tcrow, bsm.trow, bsm.tperm,
                                   None, 32, 24 * 9, 3, 3, 1, 1, 1, 1, "row")
    assert rel(y, F.conv2d(x, w, None, 1, 1)) <= 1e-5
    conv = BlockSparseConv2d(bsm, None, in_channels=24, kernel_size=3, padding=1, backend="cpu").eval()
    assert not conv._implicit(x)
