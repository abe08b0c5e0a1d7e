"""Conv2d lowered to block-sparse kernels: an implicit GEMM on the CPU, im2col elsewhere.

The weight's matrix view (planc.blocks) is (out, kh·kw·in) with the input channel
fastest: a block of the weight is a set of input channels at one kernel tap.

- **Implicit GEMM** (`torch.ops.planc.bsr_conv2d`, CPU, stride 1, blocks within one
  tap, inference: a module in eval mode): no patch matrix; each kept block reads its
  channels of the padded input at its tap's token offset, a view (`implicit_forward`).
- **im2col** otherwise (training the lowered values, strides, a GPU): a channels-last
  patch matrix (kernel tap major, input channel fastest, the weight's column order)
  through the block-sparse linear op, whose autograd the values train through.
  The patch matrix is kh·kw copies of the input: on issue 15's 256-channel 3×3 convs it
  cost 3.3× a whole dense conv.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from planc.kernels import library
from planc.kernels.cpu import accumulate_panels, compute_dtype
from planc.kernels.format import BlockSparseMatrix
from planc.kernels.ops import BlockSparseLinear


def _pair(v) -> Tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(a) for a in v)  # type: ignore[return-value]


def im2col(x: torch.Tensor, kernel_size, stride=1, padding=0, dilation=1) -> Tuple[torch.Tensor, int, int]:
    """x (N, C, H, W) → patches (N·Ho·Wo, kh·kw·C), tap-major and channel-fastest, and
    (Ho, Wo)."""
    if x.dim() != 4:
        raise ValueError(f"expected an input of shape (N, C, H, W), got {tuple(x.shape)}")
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = _pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation)
    n, cin, h, w = x.shape
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    if (kh, kw) == (1, 1) and (ph, pw) == (0, 0):
        # 1×1: the patch matrix is the strided input itself, channels-last
        xs = x[:, :, ::sh, ::sw]
        return xs.permute(0, 2, 3, 1).reshape(n * ho * wo, cin), ho, wo
    cols = F.unfold(x, (kh, kw), dilation=(dh, dw), padding=(ph, pw), stride=(sh, sw))   # (N, C·kh·kw, L)
    cols = cols.view(n, cin, kh * kw, ho * wo).permute(0, 3, 2, 1)                       # (N, L, taps, C)
    return cols.reshape(n * ho * wo, kh * kw * cin), ho, wo


def implicit_ok(in_channels: int, block, stride, x: torch.Tensor) -> bool:
    """Whether `implicit_forward` applies: a CPU input, stride 1, and blocks that do not
    straddle two kernel taps (in_channels a multiple of the block's columns)."""
    return x.device.type == "cpu" and _pair(stride) == (1, 1) and in_channels % int(block[1]) == 0


def implicit_forward(x: torch.Tensor, values_t: torch.Tensor, tcrow: torch.Tensor, trow: torch.Tensor,
                     bias: Optional[torch.Tensor], out_channels: int, kernel_size, padding=0,
                     dilation=1) -> torch.Tensor:
    """The conv (stride 1) without a patch matrix: an implicit GEMM over the kept blocks.

    The input is copied once, zero-padded and channel-major, into X (C, N·Hp·Wp + a
    tail): with the output computed at every padded position q = (n, i, j), kernel tap
    (a, b) reads X[:, q + a·dh·Wp + b·dw], so the slab a block reads (c channels at one
    tap) is X's rows shifted by a constant token offset — a strided view, no copy. The
    CPU column-panel loop (kernels/cpu.py) runs on those views; outputs at positions
    outside the valid Ho×Wo are computed and dropped ((Hp·Wp)/(Ho·Wo) more work: 1.13×
    for a 3×3 'same' conv on 32×32). im2col instead writes kh·kw copies of the input.
    `values_t` (nnz, r, c) grouped by block-column with its `tcrow`/`trow`; returns
    (N, out, Ho, Wo) contiguous, in x's dtype."""
    (kh, kw), (ph, pw), (dh, dw) = _pair(kernel_size), _pair(padding), _pair(dilation)
    n, cin, h, w = x.shape
    hp, wp = h + 2 * ph, w + 2 * pw
    ho, wo = hp - dh * (kh - 1), wp - dw * (kw - 1)
    if ho <= 0 or wo <= 0:
        raise ValueError(f"expected an input at least as large as the dilated kernel, got {tuple(x.shape)}")
    out_dtype, cd = x.dtype, compute_dtype(x.dtype)
    L = n * hp * wp
    tail = dh * (kh - 1) * wp + dw * (kw - 1)      # the last tap reads this far past the last position
    padded = torch.zeros(cin, L + tail, dtype=cd, device=x.device)
    padded[:, :L].view(cin, n, hp, wp)[:, :, ph:ph + h, pw:pw + w].copy_(x.detach().permute(1, 0, 2, 3))
    r, c = int(values_t.shape[1]), int(values_t.shape[2])
    gr, gc = -(-out_channels // r), tcrow.numel() - 1
    sources = []
    for g in range(gc):                             # block-column g: channels (g·c mod C).. at tap (g·c div C)
        tap, channel = divmod(g * c, cin)
        a, b = divmod(tap, kw)
        sources.append((channel, a * dh * wp + b * dw))
    yt = torch.empty(gr, r, L, dtype=cd, device=x.device)
    init = None if bias is None else F.pad(bias.detach().to(cd), (0, gr * r - out_channels)).view(gr, r, 1)
    panels = values_t.detach().to(cd).reshape(values_t.shape[0] * r, c)
    accumulate_panels(yt, init, panels, padded, tcrow, trow, r, c, sources=sources)
    y = yt.view(gr * r, n, hp, wp)[:out_channels, :, :ho, :wo]
    return y.permute(1, 0, 2, 3).contiguous().to(out_dtype)


@torch.library.custom_op("planc::bsr_conv2d", mutates_args=())
def bsr_conv2d(x: torch.Tensor, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor, row: torch.Tensor,
               tcrow: torch.Tensor, trow: torch.Tensor, tperm: torch.Tensor, bias: Optional[torch.Tensor],
               R: int, C: int, kh: int, kw: int, ph: int, pw: int, dh: int, dw: int, order: str) -> torch.Tensor:
    """The stride-1 conv of x (N, C/(kh·kw), H, W) by the block-sparse (R, C) weight:
    (N, R, Ho, Wo), contiguous. The implicit GEMM on the CPU; on another device, or
    blocks that straddle taps, the patch matrix through bsr_linear (same result)."""
    cin = C // (kh * kw)
    index = (crow, col, row, tcrow, trow, tperm)
    block = tuple(values.shape[1:])
    if implicit_ok(cin, block, 1, x):
        values_t = (values if order == "col"
                    else BlockSparseMatrix.stored(values, order, index, (R, C)).grouped_by_column())
        return implicit_forward(x, values_t, tcrow, trow, bias, R, (kh, kw), (ph, pw), (dh, dw))
    n = x.shape[0]
    cols, ho, wo = im2col(x, (kh, kw), 1, (ph, pw), (dh, dw))
    y = library.apply(cols, values, order, index, bias, (R, C), "auto", None)
    return y.reshape(n, ho, wo, R).permute(0, 3, 1, 2).contiguous()


@bsr_conv2d.register_fake
def _(x, values, crow, col, row, tcrow, trow, tperm, bias, R, C, kh, kw, ph, pw, dh, dw, order):
    n, _, h, w = x.shape
    return x.new_empty((n, R, h + 2 * ph - dh * (kh - 1), w + 2 * pw - dw * (kw - 1)))


def _no_backward(ctx, dy):
    raise RuntimeError("planc.bsr_conv2d is the lowered conv's inference path (eval mode); to train a "
                       "lowered conv's values, put the model in train mode (.train()): it then runs through "
                       "im2col and bsr_linear, which have gradients")


bsr_conv2d.register_autograd(_no_backward)


class BlockSparseConv2d(nn.Module):
    """A Conv2d (groups=1, zero padding) whose weight is block-sparse in the
    (out, kh·kw·in) view; built by the lower pass."""

    def __init__(self, bsm: BlockSparseMatrix, bias: Optional[torch.Tensor], *, in_channels: int,
                 kernel_size, stride=1, padding=0, dilation=1, backend: str = "auto", strategy: str | None = None,
                 order: str = "row"):
        super().__init__()
        kh, kw = _pair(kernel_size)
        if bsm.shape[1] != kh * kw * in_channels:
            raise ValueError(f"expected a matrix with {kh * kw * in_channels} columns (kh·kw·in), got {bsm.shape[1]}")
        self.in_channels, self.out_channels = int(in_channels), bsm.shape[0]
        self.kernel_size, self.stride = (kh, kw), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.linear = BlockSparseLinear(bsm, bias, backend=backend, strategy=strategy, order=order)
        # "auto": the implicit GEMM where it applies (_implicit), else im2col; "im2col" always
        self.patches = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected an input of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if self._implicit(x):
            lin = self.linear
            (kh, kw), (ph, pw), (dh, dw) = self.kernel_size, self.padding, self.dilation
            index = tuple(getattr(lin, name) for name in library.INDEX_NAMES)
            return torch.ops.planc.bsr_conv2d(x, lin.values, *index, lin.bias, lin.shape[0], lin.shape[1],
                                              kh, kw, ph, pw, dh, dw, lin.order)
        n = x.shape[0]
        cols, ho, wo = im2col(x, self.kernel_size, self.stride, self.padding, self.dilation)
        y = self.linear(cols)                                   # (N·Ho·Wo, out)
        return y.reshape(n, ho, wo, self.out_channels).permute(0, 3, 1, 2)

    def _implicit(self, x: torch.Tensor) -> bool:
        """The implicit GEMM serves inference on the CPU: eval mode (the op has no backward;
        in train mode the values train through im2col and bsr_linear), stride 1, blocks
        within one tap, the CPU's column-panel path (no other strategy forced), and
        `patches` not set to "im2col"."""
        return (not self.training and self.patches != "im2col" and self.linear.strategy in (None, "auto", "cols")
                and self.linear.backend in ("auto", "cpu") and implicit_ok(self.in_channels, self.linear.block,
                                                                            self.stride, x))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}")
