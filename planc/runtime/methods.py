"""The paper's four methods as small strategies over one shared mechanism.

The mechanism (planc.runtime.runtime.Runtime) owns the supports and the phase schedule:
dense phases revive every block at zero, sparsify phases prune gradually along a curve,
sparse/finetune phases reach the target at once and then hold the support. What a
method decides is only *which* alive blocks matter least — its block score — plus the
mask mode it needs and its default sparsify curve:

- SequentialAttention++: the softmax attention A of the block (or, with the block-norm
  score, the Frobenius norm of the effective block W_b·A_b);
- ACDC and magnitude pruning: the Frobenius norm of the block (Peste et al.; the paper's
  baseline; Zhu & Gupta's gradual variant uses the cubic curve);
- PowerPropagation: the Frobenius norm of the *effective* block ‖V_b‖·V_b (or V⊙|V|^(α−1)).

Block OBS (planc.obs) is not a score: it prunes every layer once, from calibration
batches, before the first step, and reconstructs the kept weights; the runtime then
holds its supports.

Which strategy a plan's method uses, and the mask mode it needs, come from its record in
planc.plan.registry (`strategy`, `mask_mode`): the classes here carry no method names.

`select_prune` turns scores into the blocks to prune, lowest first, ties broken by
block index, so every layer lands on exactly its target count, deterministically.
"""
from __future__ import annotations

from typing import Dict, Type

import torch

from planc.errors import RuntimeStateError
from planc.mask import BlockMask
from planc.plan.registry import METHODS
from planc.plan.types import Method


class PruningMethod:
    """Base strategy: block importance is the Frobenius norm of the effective weight."""

    default_curve = "exponential"
    # False: pruned raw weights are zeroed and held at zero, revived blocks restart at
    # zero (pruning). True: they keep their values behind the zero mask and come back
    # with them (masking: the paper's ACDC on Criteo).
    keeps_pruned_weights = False
    # True: the method chooses its blocks from data before the first step (planc.obs), so
    # the runtime must find every layer already at its target where a phase prunes
    calibrated = False

    def __init__(self, method: Method):
        self.method = method
        self.name = method.name
        self.mode = METHODS[method.name].mask_mode

    def check(self, name: str, mask: BlockMask) -> None:
        if mask.mode != self.mode:
            raise RuntimeStateError(f"method {self.name!r} needs masks in mode {self.mode!r}, "
                                    f"layer {name!r} has a mask in mode {mask.mode!r}")

    @torch.no_grad()
    def score(self, mask: BlockMask, weight: torch.Tensor) -> torch.Tensor:
        """(gr, gc) importance of every block; higher is kept. Only alive blocks are ranked."""
        return mask.view.block_norms(mask.effective_weight(weight).detach())


class SequentialAttentionPP(PruningMethod):
    @torch.no_grad()
    def score(self, mask: BlockMask, weight: torch.Tensor) -> torch.Tensor:
        if self.method.score != "attention":
            return super().score(mask, weight)
        # A = n·softmax(L) is monotone in L, so ranking by the logits is ranking by A —
        # and unlike the (optionally clipped) A it never ties blocks that a clip flattened.
        return mask.logits.detach().clone()


class ACDC(PruningMethod):
    @property
    def keeps_pruned_weights(self) -> bool:
        return bool(self.method.masking)


class Magnitude(PruningMethod):
    default_curve = "cubic"          # the gradual variant is Zhu & Gupta's


class PowerProp(PruningMethod):
    pass


class OBS(PruningMethod):
    """Block OBS (planc.obs) prunes from calibration data before the first step; the
    runtime then only holds the supports. Its score (the block norm) is never used to prune."""
    calibrated = True


def make_method(method: Method) -> PruningMethod:
    """The strategy of the plan's method, by its registry record."""
    if method.name not in METHODS:
        raise RuntimeStateError(f"expected method in {sorted(METHODS)}, got {method.name!r}")
    cls = globals().get(METHODS[method.name].strategy)
    if not (isinstance(cls, type) and issubclass(cls, PruningMethod)):
        raise RuntimeStateError(f"method {method.name!r}: no strategy class {METHODS[method.name].strategy!r} "
                                "in planc.runtime.methods")
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
