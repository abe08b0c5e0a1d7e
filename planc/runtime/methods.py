"""The paper's four methods as small strategies over one shared mechanism.

The mechanism (planc.runtime.runtime.Runtime) owns the supports and the phase schedule:
dense phases revive every block at zero, sparsify phases prune gradually along a curve,
sparse/finetune phases reach the target at once and then hold the support. What a
method decides is only *which* alive blocks matter least — its block score — plus the
mask mode it needs and its default sparsify curve:

- sequential_attention_pp: the softmax attention A of the block (or, with
  `score: magnitude`, the Frobenius norm of the effective block W_b·A_b);
- acdc, magnitude: the Frobenius norm of the block (Peste et al.; the paper's baseline;
  Zhu & Gupta's gradual variant uses the cubic curve);
- powerprop: the Frobenius norm of the *effective* block ‖V_b‖·V_b (or V⊙|V|^(α−1)).

`select_prune` turns scores into the blocks to prune, lowest first, ties broken by
block index, so every layer lands on exactly its target count, deterministically.
"""
from __future__ import annotations

from typing import Dict, Type

import torch

from planc.errors import RuntimeStateError
from planc.mask import BlockMask
from planc.plan.types import Method


class PruningMethod:
    """Base strategy: block importance is the Frobenius norm of the effective weight."""

    name = ""
    modes: tuple = ("attention", "support", "powerprop")   # BlockMask modes it can drive
    default_curve = "exponential"

    def __init__(self, method: Method):
        self.method = method

    def check(self, name: str, mask: BlockMask) -> None:
        if mask.mode not in self.modes:
            raise RuntimeStateError(
                f"method {self.name!r} needs masks in mode {' or '.join(self.modes)}, "
                f"layer {name!r} has a mask in mode {mask.mode!r}")

    @torch.no_grad()
    def score(self, mask: BlockMask, weight: torch.Tensor) -> torch.Tensor:
        """(gr, gc) importance of every block; higher is kept. Only alive blocks are ranked."""
        return mask.view.block_norms(mask.effective_weight(weight).detach())


class SequentialAttentionPP(PruningMethod):
    name = "sequential_attention_pp"
    modes = ("attention",)

    @torch.no_grad()
    def score(self, mask: BlockMask, weight: torch.Tensor) -> torch.Tensor:
        if self.method.score == "magnitude":
            return super().score(mask, weight)
        # A = n·softmax(L) is monotone in L, so ranking by the logits is ranking by A —
        # and unlike the (optionally clipped) A it never ties blocks that a clip flattened.
        return mask.logits.detach().clone()


class ACDC(PruningMethod):
    name = "acdc"


class Magnitude(PruningMethod):
    name = "magnitude"
    default_curve = "cubic"          # the gradual variant is Zhu & Gupta's


class PowerProp(PruningMethod):
    name = "powerprop"
    modes = ("powerprop",)


METHOD_CLASSES: Dict[str, Type[PruningMethod]] = {
    cls.name: cls for cls in (SequentialAttentionPP, ACDC, Magnitude, PowerProp)
}


def make_method(method: Method) -> PruningMethod:
    try:
        cls = METHOD_CLASSES[method.name]
    except KeyError:
        raise RuntimeStateError(
            f"expected method in {sorted(METHOD_CLASSES)}, got {method.name!r}") from None
    return cls(method)


def select_prune(scores: torch.Tensor, alive: torch.Tensor, total_pruned: int) -> torch.Tensor:
    """A bool grid of the alive blocks to prune now so that `total_pruned` blocks are dead
    in all: the lowest-scoring alive blocks, ties broken by the lower flat block index
    first (a stable sort). NaN scores rank lowest. Never revives a block."""
    alive_flat = alive.flatten()
    need = int(total_pruned) - int((~alive_flat).sum())
    out = torch.zeros_like(alive_flat)
    if need <= 0:
        return out.view_as(alive)
    candidates = alive_flat.nonzero().flatten()          # ascending block index
    s = torch.nan_to_num(scores.detach().flatten().to(torch.float64)[candidates], nan=float("-inf"))
    order = candidates[torch.argsort(s, stable=True)]
    out[order[:need]] = True
    return out.view_as(alive)
