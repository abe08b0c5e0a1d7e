"""Sparse phases on the block-sparse kernels: while a layer's support is fixed, its
forward and backward run on the kept blocks only.

The runtime calls `KernelPhases.enter(kind)` at every phase edge and `support_changed()`
after every pruning update. In `sparse` and `finetune` phases (support fixed) and in
`sparsify` phases (support fixed between updates) the graphs the model trains through
go to the kernel form (planc.passes.kernel_form); in `dense` phases back to the dense
form. The plan's `schedule.sparse_kernels` decides per layer: `false` never switches,
`true` runs every eligible layer on the kernels, `auto` (the default) lets each layer big
enough to gain (`MIN_ELEMENTS`) time both on its first training call once its density is
at most `MAX_DENSITY`, keeping the faster; a timing holds, across phases, while the
layer's density stays within a factor 2 of the one it was made at. The decisions are
part of the runtime's state, so a resumed run computes exactly what the uninterrupted
one did.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import fx

from planc.mask import BlockMask
from planc.passes.kernel_form import (DECISION, DENSE, KERNELS, MEASURE, MEASURED_AT, dense_form, eligible,
                                      kernel_form)

SETTINGS = ("auto", True, False)
MIN_ELEMENTS = 1 << 16      # smaller weights: the kernels' per-call cost exceeds what they save
MAX_DENSITY = 0.5
KERNEL_PHASES = ("sparse", "finetune", "sparsify")
KERNEL_DECISIONS = (DENSE, KERNELS, MEASURE)


def big_enough(mask: BlockMask) -> bool:
    R, C = mask.view.matrix_shape
    return R * C >= MIN_ELEMENTS


def _set(mask: BlockMask, decision: Optional[str], measured_at: Optional[float] = None) -> None:
    object.__setattr__(mask, DECISION, decision)       # plain attributes: never saved with the model
    object.__setattr__(mask, MEASURED_AT, measured_at)


def _near(density: float, timed_at: float) -> bool:
    """A timing still holds while the density is within a factor 2 of the one it was made at."""
    return timed_at / 2 < density <= timed_at * 2


def valid_state(kernels: Any, masks: Mapping[str, BlockMask]) -> bool:
    """The shape of KernelPhases.state(): decisions and timings of known layers only."""
    if not isinstance(kernels, Mapping) or set(kernels) - {"now", "timed"}:
        return False
    now, timed = kernels.get("now", {}), kernels.get("timed", {})
    if not isinstance(now, Mapping) or not isinstance(timed, Mapping) or set(now) - set(masks) \
            or set(timed) - set(masks):
        return False
    return (all(v in KERNEL_DECISIONS for v in now.values())
            and all(isinstance(v, (list, tuple)) and len(v) == 2 and v[0] in KERNEL_DECISIONS
                    and isinstance(v[1], (int, float)) and not isinstance(v[1], bool) for v in timed.values()))


class KernelPhases:
    """Switches the graphs a model trains through between the dense form and the kernel
    form at phase edges, and keeps the per-layer decisions (part of the runtime state).
    A layer's timing is remembered with the density it was made at, across phases: a
    later phase at about the same density (the next cycle's sparse phase, the finetune
    after a sparsify) reuses it instead of timing again."""

    def __init__(self, module: torch.nn.Module, masks: Mapping[str, BlockMask],
                 weight, setting="auto"):
        if setting not in SETTINGS:
            raise ValueError(f"expected sparse_kernels in {SETTINGS}, got {setting!r}")
        self.masks = dict(masks)
        self.weight = weight
        self.setting = setting
        self.graphs: List[fx.GraphModule] = [module] if isinstance(module, fx.GraphModule) else []
        self.active = False
        self.timed: Dict[str, Tuple[str, float]] = {}     # layer -> (decision, density it was timed at)

    def add_graph(self, gm: fx.GraphModule) -> None:
        """Another graph over the same masks (a distillation view): switched with the rest."""
        if any(g is gm for g in self.graphs):
            return
        self.graphs.append(gm)
        if self.active:
            kernel_form(gm)

    def enter(self, kind: str) -> None:
        """At a phase edge: the kernel form in sparse, finetune and sparsify phases, the
        dense form in dense phases."""
        if kind in KERNEL_PHASES and self.setting is not False:
            self._decide()
            self._switch_on()
        else:
            self.off()

    def support_changed(self) -> None:
        """After a pruning update: each layer's decision again for its new density (a
        layer whose density left the factor 2 around its last timing is timed again)."""
        if self.active:
            self._decide()

    def state(self) -> dict:
        """Plain data: the decisions in force ('now', empty while off) and the timings
        remembered ('timed': layer -> [decision, density])."""
        self._remember()
        now = {name: getattr(m, DECISION) for name, m in self.masks.items()
               if self.active and getattr(m, DECISION, None)}
        return {"now": now, "timed": {name: [d, at] for name, (d, at) in sorted(self.timed.items())}}

    def restore(self, state: Mapping[str, Any], kind: Optional[str]) -> None:
        """After loading a state (checked by the runtime): the switch and the decisions
        exactly as they were."""
        self.off()
        self.timed = {name: (str(d), float(at)) for name, (d, at) in state.get("timed", {}).items()}
        if kind in KERNEL_PHASES and self.setting is not False:
            now = state.get("now", {})
            for name, mask in self.masks.items():
                _set(mask, now.get(name) if eligible(mask, self.weight(name)) else None)
            self._switch_on()

    def forget(self) -> None:
        """Drop every remembered timing and time the layers again from their next call:
        a timing holds for the batch shape it was made with, so call this when it changes."""
        active = self.active
        self.off()
        self.timed.clear()
        if active:
            self._decide()
            self._switch_on()

    def decisions(self) -> Dict[str, str]:
        """Layer -> 'kernels' | 'dense' | 'measure' while on; {} while off."""
        return self.state()["now"]

    def off(self) -> None:
        self._remember()
        for gm in self.graphs:
            dense_form(gm)
        for mask in self.masks.values():
            _set(mask, None)
        self.active = False

    def _switch_on(self) -> None:
        if not self.active:
            for gm in self.graphs:
                kernel_form(gm)
        self.active = True

    def _remember(self) -> None:
        for name, mask in self.masks.items():
            decision, at = getattr(mask, DECISION, None), getattr(mask, MEASURED_AT, None)
            if at is not None and decision in (DENSE, KERNELS):
                self.timed[name] = (decision, float(at))

    def _decide(self) -> None:
        self._remember()
        for name, mask in self.masks.items():
            if not eligible(mask, self.weight(name)):
                _set(mask, None)
            elif self.setting is True:
                _set(mask, KERNELS)
            elif getattr(mask, DECISION, None) == MEASURE:
                continue                                   # not timed yet: its first call will
            elif name in self.timed and _near(mask.density, self.timed[name][1]):
                _set(mask, *self.timed[name])
            elif big_enough(mask) and mask.density <= MAX_DENSITY:
                _set(mask, MEASURE)
            else:
                _set(mask, DENSE)
