"""Conv2d lowered to the block-sparse linear op through im2col.

The weight's matrix view (planc.blocks) is (out, kh·kw·in) with the input channel
fastest, so the im2col here produces columns in the same order: kernel tap major,
input channel fastest (a channels-last im2col). A block of the weight is then a set of
input channels at one kernel tap, and each nonzero block reads one contiguous slab of
the patch matrix.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected an input of shape (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        n = x.shape[0]
        cols, ho, wo = im2col(x, self.kernel_size, self.stride, self.padding, self.dilation)
        y = self.linear(cols)                                   # (N·Ho·Wo, out)
        return y.reshape(n, ho, wo, self.out_channels).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}")
