"""Sparse phases on the block-sparse kernels: while a layer's support is fixed (the
`sparse` and `finetune` phases), its forward and backward run on the kept blocks only.

The runtime calls `KernelPhases.enter(kind)` at every phase edge: in a fixed-support
phase the graphs the model trains through go to the kernel form
(planc.passes.kernel_form), elsewhere back to the dense form. The plan's
`schedule.sparse_kernels` decides per layer: `false` never switches, `true` runs every
eligible layer on the kernels, `auto` (the default) lets each layer big enough to gain
(`MIN_ELEMENTS`, density at most `MAX_DENSITY`) time both on its first training call of
the phase and keep the faster. The decisions are part of the runtime's state, so a
resumed run computes exactly what the uninterrupted one did.
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Optional

import torch
from torch import fx

from planc.mask import BlockMask
from planc.passes.kernel_form import DECISION, DENSE, KERNELS, MEASURE, dense_form, eligible, kernel_form

SETTINGS = ("auto", True, False)
MIN_ELEMENTS = 1 << 16      # smaller weights: the kernels' per-call cost exceeds what they save
MAX_DENSITY = 0.5


def worth_measuring(mask: BlockMask) -> bool:
    R, C = mask.view.matrix_shape
    return R * C >= MIN_ELEMENTS and mask.density <= MAX_DENSITY


class KernelPhases:
    """Switches the graphs a model trains through between the dense form and the kernel
    form at phase edges, and keeps the per-layer decisions (part of the runtime state)."""

    def __init__(self, module: torch.nn.Module, masks: Mapping[str, BlockMask],
                 weight, setting="auto"):
        if setting not in SETTINGS:
            raise ValueError(f"expected sparse_kernels in {SETTINGS}, got {setting!r}")
        self.masks = dict(masks)
        self.weight = weight
        self.setting = setting
        self.graphs: List[fx.GraphModule] = [module] if isinstance(module, fx.GraphModule) else []
        self.active = False

    def add_graph(self, gm: fx.GraphModule) -> None:
        """Another graph over the same masks (a distillation view): switched with the rest."""
        if any(g is gm for g in self.graphs):
            return
        self.graphs.append(gm)
        if self.active:
            kernel_form(gm)

    def enter(self, kind: str) -> None:
        """At a phase edge: the kernels in sparse and finetune phases (fixed support), the
        dense form elsewhere. Decisions start afresh for each phase."""
        if kind in ("sparse", "finetune") and self.setting is not False:
            self._on({})
        else:
            self.off()

    def restore(self, decisions: Optional[Mapping[str, str]], kind: Optional[str]) -> None:
        """After loading a state: the switch as it was, with the decisions it had made."""
        if kind in ("sparse", "finetune") and self.setting is not False:
            self._on(dict(decisions or {}))
        else:
            self.off()

    def decisions(self) -> Dict[str, str]:
        """Layer -> 'kernels' | 'dense' | 'measure' while on (plain data); {} while off."""
        if not self.active:
            return {}
        return {name: getattr(m, DECISION) for name, m in self.masks.items() if getattr(m, DECISION, None)}

    def off(self) -> None:
        for gm in self.graphs:
            dense_form(gm)
        for mask in self.masks.values():
            object.__setattr__(mask, DECISION, None)
        self.active = False

    def _on(self, known: Dict[str, str]) -> None:
        for name, mask in self.masks.items():
            weight = self.weight(name)
            if not eligible(mask, weight):
                decision = None
            elif name in known:
                decision = known[name]
            elif self.setting is True:
                decision = KERNELS
            else:
                decision = MEASURE if worth_measuring(mask) else DENSE
            object.__setattr__(mask, DECISION, decision)
        if not self.active:
            for gm in self.graphs:
                kernel_form(gm)
        self.active = True
