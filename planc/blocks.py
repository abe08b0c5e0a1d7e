"""The block view of a weight: the one place that reshapes weights into block grids.

A Linear weight (out, in) is the matrix R×C = out×in. A Conv2d weight (out, in, kh, kw)
is viewed as (out, kh·kw·in) with the input channel fastest — `permute(0, 2, 3, 1)` —
so that a block is a set of input channels at one kernel tap, and the column order is
that of a channels-last im2col. A transposed linear (GPT-2's Conv1D: weight stored
(in, out), applied as `x @ W`) is viewed as W.T, its true (out, in) matrix, so a block
(r, c) always means r output features × c input features, whatever the storage.
With block (r, c) the grid is (ceil(R/r), ceil(C/c));
edge blocks may be partial. Everything else in planc (masks, methods, kernels, reports)
goes through a BlockView rather than reshaping weights by hand.
"""
from __future__ import annotations

from dataclasses import dataclass
import math
from typing import Tuple

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class BlockView:
    weight_shape: Tuple[int, ...]   # as stored: (out, in), (in, out) if transposed, or (out, in, kh, kw)
    block: Tuple[int, int]          # (r, c) rows × columns of the matrix view
    transposed: bool = False        # a 2-D weight stored (in, out) (Conv1D-style linear)

    def __post_init__(self):
        if len(self.weight_shape) not in (2, 4):
            raise ValueError(f"expected a 2-D (Linear) or 4-D (Conv2d) weight shape, got {tuple(self.weight_shape)}")
        if self.transposed and len(self.weight_shape) != 2:
            raise ValueError(f"expected a 2-D weight for a transposed linear, got {tuple(self.weight_shape)}")
        if len(self.block) != 2 or any(int(b) <= 0 for b in self.block):
            raise ValueError(f"expected a block of two positive integers, got {list(self.block)}")

    # ---- the matrix view ---------------------------------------------------------
    @property
    def is_conv(self) -> bool:
        return len(self.weight_shape) == 4

    @property
    def matrix_shape(self) -> Tuple[int, int]:
        if self.is_conv:
            out, cin, kh, kw = self.weight_shape
            return out, kh * kw * cin
        if self.transposed:
            return self.weight_shape[1], self.weight_shape[0]
        return tuple(self.weight_shape)  # type: ignore[return-value]

    @property
    def grid(self) -> Tuple[int, int]:
        (R, C), (r, c) = self.matrix_shape, self.block
        return -(-R // r), -(-C // c)

    @property
    def num_blocks(self) -> int:
        gr, gc = self.grid
        return gr * gc

    @property
    def padded_shape(self) -> Tuple[int, int]:
        (gr, gc), (r, c) = self.grid, self.block
        return gr * r, gc * c

    def to_matrix(self, weight: torch.Tensor) -> torch.Tensor:
        """The stored weight -> (R, C). A view for Linear (transposed or not), a copy for Conv2d."""
        self._check(weight)
        if self.is_conv:
            return weight.permute(0, 2, 3, 1).flatten(1)
        return weight.t() if self.transposed else weight

    def from_matrix(self, matrix: torch.Tensor) -> torch.Tensor:
        """(R, C) -> the weight's own shape (inverse of to_matrix)."""
        if tuple(matrix.shape) != self.matrix_shape:
            raise ValueError(f"expected a matrix of shape {self.matrix_shape}, got {tuple(matrix.shape)}")
        if self.is_conv:
            out, cin, kh, kw = self.weight_shape
            return matrix.reshape(out, kh, kw, cin).permute(0, 3, 1, 2)
        return matrix.t() if self.transposed else matrix

    # ---- blocks ------------------------------------------------------------------
    def to_blocks(self, weight: torch.Tensor) -> torch.Tensor:
        """(gr, gc, r, c): the weight's blocks, zero-padded at partial edges."""
        (R, C), (Rp, Cp), (gr, gc), (r, c) = self.matrix_shape, self.padded_shape, self.grid, self.block
        m = self.to_matrix(weight)
        if (Rp, Cp) != (R, C):
            m = F.pad(m, (0, Cp - C, 0, Rp - R))
        return m.reshape(gr, r, gc, c).transpose(1, 2)

    def from_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """Inverse of to_blocks: (gr, gc, r, c) -> weight shape (padding dropped)."""
        (R, C), (gr, gc), (r, c) = self.matrix_shape, self.grid, self.block
        if tuple(blocks.shape) != (gr, gc, r, c):
            raise ValueError(f"expected blocks of shape {(gr, gc, r, c)}, got {tuple(blocks.shape)}")
        m = blocks.transpose(1, 2).reshape(gr * r, gc * c)[:R, :C]
        return self.from_matrix(m.contiguous())

    def block_norms(self, weight: torch.Tensor) -> torch.Tensor:
        """(gr, gc) Frobenius norm of every block (padding contributes zero)."""
        return self.to_blocks(weight).pow(2).sum(dim=(-1, -2)).sqrt()

    def expand(self, grid: torch.Tensor) -> torch.Tensor:
        """A per-block grid (gr, gc) -> a tensor of the weight's shape, each block's value
        repeated over its entries. Differentiable, so it carries attention gradients."""
        if tuple(grid.shape) != self.grid:
            raise ValueError(f"expected a grid of shape {self.grid}, got {tuple(grid.shape)}")
        (R, C), (r, c) = self.matrix_shape, self.block
        m = grid.repeat_interleave(r, dim=0).repeat_interleave(c, dim=1)[:R, :C]
        return self.from_matrix(m)

    def scale(self, weight: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
        """weight ⊙ expand(grid), as one broadcast multiply over a blocked view of the
        weight when the blocks tile it exactly (no expanded copy of the grid is made,
        forward or backward: the mask's cost in training); otherwise through expand."""
        if tuple(grid.shape) != self.grid:
            raise ValueError(f"expected a grid of shape {self.grid}, got {tuple(grid.shape)}")
        blocked = self.blocked(weight)
        if blocked is not None:
            if type(weight) in _PLAIN and type(grid) in _PLAIN:
                return _ScaleBlocks.apply(weight, grid, self.block)
            return (blocked * grid[:, None, :, None]).view(self.weight_shape)
        (R, C), (r, c), (gr, gc) = self.matrix_shape, self.block, self.grid
        if R % r or C % c or not weight.is_contiguous():
            return weight * self.expand(grid)
        if self.is_conv:
            out, cin, kh, kw = self.weight_shape
            if cin % c:
                return weight * self.expand(grid)
            # matrix columns are (tap, channel) with the channel fastest: a block is c channels at one tap
            g = grid.view(gr, kh, kw, cin // c).permute(0, 3, 1, 2)[:, None, :, None]
            return (weight.view(gr, r, cin // c, c, kh, kw) * g).view(self.weight_shape)
        # transposed: stored (in, out) = (C, R)
        return (weight.view(gc, c, gr, r) * grid.t()[:, None, :, None]).view(self.weight_shape)

    def blocked(self, weight: torch.Tensor) -> torch.Tensor | None:
        """A (gr, r, gc, c) view of a Linear weight (matrix rows and columns blocked) when
        the blocks tile it exactly and it is stored (out, in); else None."""
        (R, C), (r, c), (gr, gc) = self.matrix_shape, self.block, self.grid
        if self.is_conv or self.transposed or R % r or C % c or not weight.is_contiguous():
            return None
        return weight.view(gr, r, gc, c)

    @torch.no_grad()
    def zero_blocks_(self, tensor: torch.Tensor, grid: torch.Tensor) -> None:
        """tensor[blocks where grid is True] = 0, in place, for a tensor of the weight's
        shape: through the blocked view when there is one (no full-size mask is built,
        which matters after every optimizer step), else through expand."""
        blocked = self.blocked(tensor)
        if blocked is not None:
            blocked.masked_fill_(grid.to(device=tensor.device, dtype=torch.bool)[:, None, :, None], 0)
        else:
            tensor.masked_fill_(self.expand(grid.to(torch.bool)).to(tensor.device), 0)

    def _check(self, weight: torch.Tensor) -> None:
        if tuple(weight.shape) != tuple(self.weight_shape):
            raise ValueError(f"expected a weight of shape {tuple(self.weight_shape)}, got {tuple(weight.shape)}")

    # ---- block-sparse row format ---------------------------------------------------
    def to_bsr(self, weight: torch.Tensor, alive: torch.Tensor | None = None):
        """Block compressed rows of the matrix view: (values (nnz, r, c), crow (gr+1,),
        col (nnz,)), blocks in row-major order. `alive` (gr, gc) bool selects the blocks;
        by default every block with a nonzero entry. Partial edge blocks are zero-padded."""
        blocks = self.to_blocks(weight)
        if alive is None:
            alive = blocks.ne(0).any(dim=-1).any(dim=-1)
        if tuple(alive.shape) != self.grid:
            raise ValueError(f"expected an alive grid of shape {self.grid}, got {tuple(alive.shape)}")
        alive = alive.to(torch.bool)
        counts = alive.sum(dim=1)
        crow = torch.zeros(self.grid[0] + 1, dtype=torch.int64, device=weight.device)
        crow[1:] = torch.cumsum(counts, 0)
        rows, cols = alive.nonzero(as_tuple=True)
        return blocks[rows, cols].contiguous(), crow, cols.to(torch.int64)

    def from_bsr(self, values: torch.Tensor, crow: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        """Dense weight (the weight's own shape) from to_bsr's triple."""
        (gr, gc), (r, c) = self.grid, self.block
        blocks = values.new_zeros(gr, gc, r, c)
        rows = torch.repeat_interleave(torch.arange(gr, device=values.device), crow[1:] - crow[:-1])
        blocks[rows, col] = values
        return self.from_blocks(blocks)


_PLAIN = (torch.Tensor, torch.nn.Parameter)   # not a tensor subclass (DTensor): those take plain ops


class _ScaleBlocks(torch.autograd.Function):
    """weight ⊙ expand(grid) for a contiguous (out, in) weight its blocks tile, with a
    backward that reads the incoming gradient once: per slab of block rows (about 1 MB,
    so it is still in cache for the second use) it reduces ⟨G_b, W_b⟩ into the grid's
    gradient and writes G ⊙ grid into the weight's. Autograd's own backward of the
    broadcast multiply makes three full-size passes and a strided reduction instead;
    in an SA++ dense phase that difference is most of what the masks cost a step."""

    SLAB_ELEMENTS = 1 << 18

    @staticmethod
    def forward(ctx, weight, grid, block):
        (gr, gc), (r, c) = grid.shape, block
        ctx.save_for_backward(weight, grid)
        ctx.block = block
        native = _native()
        ctx.native = native.scales_blocks(weight, grid)
        if ctx.native:                 # one pass, the copy streamed (kernels/native.c)
            return native.scale_blocks(weight.detach(), grid.detach(), block)
        return (weight.view(gr, r, gc, c) * grid[:, None, :, None]).view(weight.shape)

    @staticmethod
    def backward(ctx, grad):
        weight, grid = ctx.saved_tensors
        (gr, gc), (r, c) = grid.shape, ctx.block
        want_weight, want_grid = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled():
            # a differentiable backward (create_graph=True: a gradient penalty, a second
            # derivative): plain ops, which autograd can record; the fast paths below cannot
            g = grad.reshape(gr, r, gc, c)
            grad_weight = (g * grid[:, None, :, None]).view(weight.shape) if want_weight else None
            grad_grid = (g * weight.view(gr, r, gc, c)).sum(dim=(1, 3)) if want_grid else None
            return grad_weight, grad_grid, None
        if ctx.native and want_grid and grad.dtype == torch.float32:
            grad_weight, grad_grid = _native().scale_blocks_backward(grad, weight.detach(), grid.detach(),
                                                                     ctx.block, want_weight)
            return grad_weight, grad_grid, None
        g = grad.reshape(gr, r, gc, c)
        w = weight.view(gr, r, gc, c)
        scale = grid[:, None, :, None]
        if not want_grid:
            return (g * scale).view(weight.shape) if want_weight else None, None, None
        grad_grid = torch.empty_like(grid)
        grad_weight = torch.empty_like(g) if want_weight else None
        rows = max(1, _ScaleBlocks.SLAB_ELEMENTS // (r * gc * c))
        for i in range(0, gr, rows):
            s = slice(i, i + rows)
            torch.sum(torch.linalg.vecdot(g[s], w[s], dim=3), dim=1, out=grad_grid[s])
            if want_weight:
                torch.mul(g[s], scale[s], out=grad_weight[s])
        return (None if grad_weight is None else grad_weight.view(weight.shape)), grad_grid, None


def _native():
    """planc.kernels.native (its `scales_blocks` says whether its library is built here)."""
    from planc.kernels import native   # lazy: planc.kernels imports this module

    return native


def sparsify_grid_count(num_blocks: int, sparsity: float) -> int:
    """How many blocks to prune so a layer of `num_blocks` reaches `sparsity`.

    One rule for every method, so they land on the same count for a layer: keep
    round-half-up(n·(1−s)) blocks, and always at least one (a sparsity below 1 never
    empties a layer; Python's round() would, at 9.5 → 10 of 10)."""
    keep = max(1, math.floor(num_blocks * (1.0 - float(sparsity)) + 0.5))
    return max(0, num_blocks - keep) if sparsity > 0 else 0
