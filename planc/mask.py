"""BlockMask: the module every targeted weight flows through after insert_masks.

It holds a bool `alive` grid (the support) and, in attention mode, a logits grid `L`.
Its forward takes the raw weight and returns the effective weight:

- attention (SequentialAttention++): W ⊙ expand(A · alive), A = n · softmax(L) over the
  layer's n blocks, so that L = 0 gives A = 1 (the dense model); optionally clipped.
  The softmax runs over *all* blocks, alive or not, so pruning a block never rescales
  the others: a phase edge changes the function only by the blocks it prunes.
- support (ACDC, magnitude): W ⊙ expand(alive).
- powerprop: block variant V_b · ‖V_b‖_F^(α−1) (α = 2, the default, is the paper's
  ‖V_b‖_F · V_b, the group analogue of Schwarz et al.'s α = 2), element variant
  V ⊙ |V|^(α−1); times the support.

The mask's forward never edits the weight; the runtime owns the support and keeps
pruned raw weights at exactly zero (planc.runtime). One exception, at insertion: a
powerprop mask re-parameterises its layer's weight once (`reparameterize_`) so that
the effective weight starts equal to the dense model's.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from planc.blocks import BlockView

MODES = ("attention", "support", "powerprop")
CLIP_DENSITY = "density"


def clip_range(clip, sparsity: float) -> Optional[Tuple[float, float]]:
    """The [low, high] a plan's `method.clip` gives a layer of target `sparsity`.

    `"density"` is the paper's clip (Appendix C.1): it states the range as
    [n·density, n/density] for weights whose uniform value is n; planc's A = n·softmax(L)
    has uniform value 1 (mean(A) = 1), so the same range is [density, 1/density] here,
    density = 1 − the layer's target sparsity. (Read literally on A, n·density > 1 would
    put the low end above the mean and clip every block to one constant.) A pair is
    used as given; None means no clipping."""
    if clip is None:
        return None
    if clip == CLIP_DENSITY:
        density = 1.0 - float(sparsity)
        if not 0.0 < density <= 1.0:
            raise ValueError(f"expected a target sparsity in [0, 1), got {sparsity!r}")
        return (density, 1.0 / density)
    if isinstance(clip, str):
        raise ValueError(f"expected clip {CLIP_DENSITY!r}, [low, high] or None, got {clip!r}")
    return (float(clip[0]), float(clip[1]))
# The block norm's gradient is undefined at zero (a block pruned and revived at zero):
# clamp its square so the gradient stays finite.
_NORM_EPS = 1e-12


class BlockMask(nn.Module):
    def __init__(
        self,
        weight_shape: Tuple[int, ...],
        block: Tuple[int, int],
        mode: str = "attention",
        *,
        clip: Optional[Tuple[float, float]] = None,
        alpha: float = 2.0,
        granularity: str = "block",
        transposed: bool = False,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"expected mode in {MODES}, got {mode!r}")
        if granularity not in ("block", "element"):
            raise ValueError(f"expected granularity 'block' or 'element', got {granularity!r}")
        self.view = BlockView(tuple(int(s) for s in weight_shape), (int(block[0]), int(block[1])), bool(transposed))
        self.mode = mode
        self.clip = None if clip is None else (float(clip[0]), float(clip[1]))
        self.alpha = float(alpha)
        self.granularity = granularity
        self.register_buffer("alive", torch.ones(self.view.grid, dtype=torch.bool))
        if mode == "attention":
            self.logits = nn.Parameter(torch.zeros(self.view.grid))
        else:
            self.logits = None

    # ---- views the runtime and reports use -----------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.view.num_blocks

    @property
    def density(self) -> float:
        return float(self.alive.float().mean())

    def attention(self) -> torch.Tensor:
        """A = n · softmax(L) over all blocks, (gr, gc); clipped if the plan says so."""
        if self.logits is None:
            raise ValueError(f"attention weights exist only in attention mode, this mask is in {self.mode!r} mode")
        n = self.logits.numel()
        a = n * torch.softmax(self.logits.flatten(), dim=0).view_as(self.logits)
        if self.clip is not None:
            a = a.clamp(self.clip[0], self.clip[1])
        return a

    # ---- forward -----------------------------------------------------------------
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        support = self.alive.to(weight.dtype)
        if self.mode == "attention":
            return self.view.scale(weight, self.attention().to(weight.dtype) * support)
        if self.mode == "support":
            return self.view.scale(weight, support)
        # powerprop
        if self.granularity == "element":
            return self.view.scale(weight * weight.abs().pow(self.alpha - 1), support)
        return self.view.scale(weight, self._block_norms(weight).pow(self.alpha - 1) * support)

    def kept_values(self, weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The effective weight's blocks at (rows[k], cols[k]), (nnz, r, c), computed from
        those blocks alone: what `forward` gives there, without building the full-size
        effective weight. For a weight whose blocks tile it exactly, stored (out, in)
        (`view.blocked`); the sparse-phase kernels (planc.runtime.sparse_phases) train
        through it, so its gradients reach the weight and the logits as forward's do."""
        blocked = self.view.blocked(weight)
        if blocked is None:
            raise ValueError(f"kept_values needs a Linear weight stored (out, in) that its blocks "
                             f"{self.view.block} tile exactly, got {tuple(weight.shape)}")
        kept = blocked[rows, :, cols, :]            # (nnz, r, c): the advanced indices come first
        if self.mode == "attention":
            return kept * self.attention()[rows, cols].to(weight.dtype)[:, None, None]
        if self.mode == "support":
            return kept
        if self.granularity == "element":
            return kept * kept.abs().pow(self.alpha - 1)
        norms = kept.pow(2).sum(dim=(-1, -2)).clamp_min(_NORM_EPS).sqrt()
        return kept * norms.pow(self.alpha - 1)[:, None, None]

    def _block_norms(self, weight: torch.Tensor) -> torch.Tensor:
        sq = self.view.to_blocks(weight).pow(2).sum(dim=(-1, -2))
        return sq.clamp_min(_NORM_EPS).sqrt()

    @torch.no_grad()
    def reparameterize_(self, weight: torch.Tensor) -> None:
        """PowerProp only: replace the dense weight W by the V whose effective weight is
        W, in place — V_b = W_b·‖W_b‖^((1−α)/α) (block), V = sign(W)·|W|^(1/α) (element) —
        so the reparameterised model starts as the dense model (Schwarz et al.'s
        initialisation; without it the effective block ‖W_b‖·W_b of α = 2 starts several
        times smaller than W_b). insert_masks calls it once, when the mask is inserted."""
        if self.mode != "powerprop":
            raise ValueError(f"reparameterize_ applies to powerprop masks, this mask is in {self.mode!r} mode")
        if self.granularity == "element":
            weight.copy_(weight.sign() * weight.abs().pow(1.0 / self.alpha))
            return
        norms = self.view.to_blocks(weight).pow(2).sum(dim=(-1, -2)).sqrt()
        factor = torch.where(norms > 0, norms.clamp_min(_NORM_EPS ** 0.5).pow((1.0 - self.alpha) / self.alpha),
                             torch.ones_like(norms))
        weight.copy_(self.view.scale(weight, factor.to(weight.dtype)))

    @torch.no_grad()
    def effective_weight(self, weight: torch.Tensor) -> torch.Tensor:
        return self.forward(weight)

    def extra_repr(self) -> str:
        gr, gc = self.view.grid
        stored = " stored (in, out)" if self.view.transposed else ""
        return (f"mode={self.mode}, weight={tuple(self.view.weight_shape)}{stored}, block={self.view.block}, "
                f"grid={gr}x{gc}, alive={int(self.alive.sum())}/{self.num_blocks}")
