"""The block-sparse matrix that travels between the lower pass, the op and the kernels.

One frozen object instead of ten positional tensors (stk's lesson): the values of the
nonzero blocks in block-row-major order, the row pointers and column indices (BSR), and
the transposed index (the same blocks grouped by block-column) that the backward pass
for dX and the CPU forward use. It is built from a weight through planc.blocks.BlockView,
the one module that reshapes weights, so a Conv2d weight uses the (out, kh·kw·in) view.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence, Tuple

import torch

from planc.blocks import BlockView


@dataclass(frozen=True, eq=False)
class BlockSparseMatrix:
    """An R×C matrix stored as (r, c) blocks; partial edge blocks are zero-padded.

    values  (nnz, r, c)  nonzero blocks, block-row-major (sorted by row, then column)
    crow    (gr+1,)      int32 row pointers into values
    col     (nnz,)       int32 block-column of each block
    row     (nnz,)       int32 block-row of each block
    tcrow   (gc+1,)      int32 column pointers into the transposed index
    trow    (nnz,)       int32 block-row of each block, blocks grouped by column
    tperm   (nnz,)       int64 position in `values` of each block of the transposed index
    """

    shape: Tuple[int, int]
    block: Tuple[int, int]
    values: torch.Tensor
    crow: torch.Tensor
    col: torch.Tensor
    row: torch.Tensor
    tcrow: torch.Tensor
    trow: torch.Tensor
    tperm: torch.Tensor
    # Inference-only cache: values[tperm] (blocks grouped by column), used by the CPU
    # forward. None while training, since the values change every step.
    values_t: Optional[torch.Tensor] = field(default=None, repr=False)

    # ---- construction ------------------------------------------------------------
    @classmethod
    def from_weight(cls, weight: torch.Tensor, block: Sequence[int], alive: torch.Tensor | None = None,
                    *, dtype: torch.dtype | None = None, view: BlockView | None = None) -> "BlockSparseMatrix":
        """From a (baked) Linear (out, in) or Conv2d (out, in, kh, kw) weight. `alive`
        (gr, gc) picks the blocks; by default every block holding a nonzero entry.
        `view`: the weight's block view when it is not the plain one of its shape (a
        transposed, Conv1D-style weight stored (in, out))."""
        view = view or BlockView(tuple(weight.shape), tuple(int(b) for b in block))
        values, crow, col = view.to_bsr(weight.detach(), alive)
        if dtype is not None:
            values = values.to(dtype)
        return cls.from_bsr(view.matrix_shape, view.block, values, crow, col)

    @classmethod
    def from_bsr(cls, shape: Sequence[int], block: Sequence[int], values: torch.Tensor,
                 crow: torch.Tensor, col: torch.Tensor) -> "BlockSparseMatrix":
        R, C = (int(s) for s in shape)
        r, c = (int(b) for b in block)
        gr, gc = -(-R // r), -(-C // c)
        if values.dim() != 3 or tuple(values.shape[1:]) != (r, c):
            raise ValueError(f"expected values of shape (nnz, {r}, {c}), got {tuple(values.shape)}")
        if crow.numel() != gr + 1:
            raise ValueError(f"expected {gr + 1} row pointers for {gr} block-rows, got {crow.numel()}")
        nnz = values.shape[0]
        if col.numel() != nnz or int(crow[-1]) != nnz:
            raise ValueError(f"expected {nnz} column indices and crow[-1] == {nnz}, got {col.numel()} and {int(crow[-1])}")
        dev = values.device
        crow64 = crow.to(device=dev, dtype=torch.int64)
        col64 = col.to(device=dev, dtype=torch.int64)
        row64 = torch.repeat_interleave(torch.arange(gr, device=dev), crow64[1:] - crow64[:-1])
        # transposed index: a stable sort by column keeps rows ascending within a column
        tperm = torch.sort(col64, stable=True).indices if nnz else col64.clone()
        tcounts = torch.bincount(col64, minlength=gc) if nnz else torch.zeros(gc, dtype=torch.int64, device=dev)
        tcrow = torch.zeros(gc + 1, dtype=torch.int64, device=dev)
        tcrow[1:] = torch.cumsum(tcounts, 0)
        i32 = torch.int32
        return cls(shape=(R, C), block=(r, c), values=values.contiguous(), crow=crow64.to(i32), col=col64.to(i32),
                   row=row64.to(i32), tcrow=tcrow.to(i32), trow=row64[tperm].to(i32), tperm=tperm)

    @classmethod
    def stored(cls, values: torch.Tensor, order: str, index: Sequence[torch.Tensor],
               shape: Sequence[int]) -> "BlockSparseMatrix":
        """The matrix of a lowered layer's stored blocks: `values` in `order` ("row":
        block-row-major; "col": grouped by block-column, i.e. `grouped_by_column()`), and
        its index tensors (crow, col, row, tcrow, trow, tperm). Column-ordered values are
        kept as the column-grouped cache and put in row order for `values`."""
        crow, col, row, tcrow, trow, tperm = index
        r, c = int(values.shape[1]), int(values.shape[2])
        if order not in ("row", "col"):
            raise ValueError(f"expected order 'row' or 'col', got {order!r}")
        rows = values if order == "row" else values[inverse(tperm)]
        return cls(shape=tuple(int(v) for v in shape), block=(r, c), values=rows, crow=crow, col=col, row=row,
                   tcrow=tcrow, trow=trow, tperm=tperm, values_t=values if order == "col" else None)

    def with_values(self, values: torch.Tensor) -> "BlockSparseMatrix":
        """The same support with other values (e.g. a trainable Parameter)."""
        if tuple(values.shape) != tuple(self.values.shape):
            raise ValueError(f"expected values of shape {tuple(self.values.shape)}, got {tuple(values.shape)}")
        return replace(self, values=values, values_t=None)

    def for_inference(self) -> "BlockSparseMatrix":
        """A copy that caches the column-grouped values (no gather per call)."""
        return replace(self, values_t=self.values.detach()[self.tperm].contiguous())

    def to(self, device=None, dtype=None) -> "BlockSparseMatrix":
        idx = {k: getattr(self, k).to(device) for k in ("crow", "col", "row", "tcrow", "trow", "tperm")}
        vt = None if self.values_t is None else self.values_t.to(device=device, dtype=dtype)
        return replace(self, values=self.values.to(device=device, dtype=dtype), values_t=vt, **idx)

    # ---- facts -------------------------------------------------------------------
    @property
    def grid(self) -> Tuple[int, int]:
        (R, C), (r, c) = self.shape, self.block
        return -(-R // r), -(-C // c)

    @property
    def nnz(self) -> int:
        return int(self.values.shape[0])

    @property
    def density(self) -> float:
        gr, gc = self.grid
        return self.nnz / max(1, gr * gc)

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    def grouped_by_column(self) -> torch.Tensor:
        """values in transposed-index order, (nnz, r, c)."""
        return self.values_t if self.values_t is not None else self.values[self.tperm]

    def to_dense(self) -> torch.Tensor:
        """The R×C matrix (padding dropped)."""
        (R, C), (r, c), (gr, gc) = self.shape, self.block, self.grid
        blocks = self.values.new_zeros(gr, gc, r, c)
        if self.nnz:
            blocks[self.row.long(), self.col.long()] = self.values
        return blocks.transpose(1, 2).reshape(gr * r, gc * c)[:R, :C]

    def alive(self) -> torch.Tensor:
        """(gr, gc) bool grid of the stored blocks."""
        grid = torch.zeros(self.grid, dtype=torch.bool, device=self.device)
        if self.nnz:
            grid[self.row.long(), self.col.long()] = True
        return grid


def inverse(perm: torch.Tensor) -> torch.Tensor:
    """The permutation that undoes `perm`."""
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device, dtype=perm.dtype)
    return inv
