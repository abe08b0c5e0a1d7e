"""The pruning methods planc knows: one record each, read by every other module.

A record says everything a method is besides its block score: its plan name, the plan
keys it takes (their types: the JSON Schema's `method.properties`; their defaults:
planc.plan.types.Method), the BlockMask mode it drives, its schedule presets (the first
is its default), which key, if any, names a preset, which presets may leave a phase
empty, the keys explain and the report show, and the name of its strategy class in
planc.runtime.methods (the block score). The JSON Schema's method section is generated
from these records (planc.plan.schema), and so are the loader's key table, the presets,
the mask modes, explain's and the report's method lines. Adding a method is one record
here, one strategy class, and its docs (docs/architecture.md).

No torch here: `planc validate` reads this.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction as F
from typing import Callable, Dict, List, Mapping, Optional, Tuple


@dataclass(frozen=True)
class Part:
    """One phase of a preset: its kind and its exact share of train.steps."""

    kind: str
    weight: F
    curve: Optional[str] = None       # sparsify only


def cycles(warmup: F, final: F, n_cycles: int) -> List[Part]:
    """Dense warm-up; `n_cycles` cycles of sparsify–sparse–dense, the last replaced by a
    single sparsify; a final sparse fine-tune. The middle share is cut into
    3·(n_cycles−1)+1 equal phases, so every sparsify phase prunes at the same pace."""
    n = 3 * (n_cycles - 1) + 1
    unit = (1 - warmup - final) / n
    parts = [Part("dense", warmup)]
    for _ in range(n_cycles - 1):
        parts += [Part("sparsify", unit, "exponential"), Part("sparse", unit), Part("dense", unit)]
    parts += [Part("sparsify", unit, "exponential"), Part("finetune", final)]
    return parts


def alternating(warmup: F, final: F, compressed: int) -> List[Part]:
    """Dense warm-up; compressed and decompressed phases of equal length, the last
    decompressed one twice as long; a final compressed fine-tune. The middle share is cut
    into 2·compressed+1 units: (C D)×(compressed−1), C, D D."""
    unit = (1 - warmup - final) / (2 * compressed + 1)
    parts = [Part("dense", warmup)]
    for _ in range(compressed - 1):
        parts += [Part("sparse", unit), Part("dense", unit)]
    parts += [Part("sparse", unit), Part("dense", 2 * unit), Part("finetune", final)]
    return parts


@dataclass(frozen=True)
class MethodSpec:
    name: str                                          # as written in plans
    title: str                                         # as written in prose
    keys: Tuple[str, ...]                              # plan keys besides `name`
    mask_mode: str                                     # planc.mask.BlockMask mode it drives
    presets: Mapping[str, Callable[[], List[Part]]]    # preset -> its phases; the first is the default
    strategy: str                                      # class in planc.runtime.methods: the block score
    shown: Tuple[str, ...] = ()                        # keys the report's method line shows
    preset_key: Optional[str] = None                   # a key whose value names a preset (both given: must agree)
    may_be_empty: Tuple[str, ...] = ()                 # presets whose one phase may get zero steps
    doc: str = field(default="", repr=False)

    @property
    def default_preset(self) -> str:
        return next(iter(self.presets))


_SPECS = (
    MethodSpec(
        name="sequential_attention_pp", title="SequentialAttention++", strategy="SequentialAttentionPP",
        keys=("score", "c", "update_every", "clip", "logits_lr", "logits_weight_decay"), shown=("score", "c"),
        mask_mode="attention",
        presets={"paper": lambda: cycles(F(1, 10), F(15, 100), 7),           # ImageNet
                 "criteo": lambda: cycles(F(2, 10), F(2, 10), 10),
                 "simple": lambda: [Part("dense", F(3, 10)), Part("sparsify", F(3, 10), "exponential"),
                                    Part("finetune", F(4, 10))]},
        doc="softmax attention over block logits, gradual sparsify phases (Yasuda et al. 2024)"),
    MethodSpec(
        name="acdc", title="ACDC", strategy="ACDC", keys=(), mask_mode="support",
        presets={"paper": lambda: alternating(F(1, 10), F(15, 100), 7),     # ImageNet: 5%-units
                 "criteo": lambda: alternating(F(2, 10), F(2, 10), 10)},
        doc="alternating compressed/decompressed phases, top-k by block norm (Peste et al. 2021)"),
    MethodSpec(
        name="magnitude", title="magnitude pruning", strategy="Magnitude", keys=("variant", "update_every"),
        shown=("variant",), mask_mode="support", preset_key="variant", may_be_empty=("pretrained",),
        presets={"oneshot": lambda: [Part("dense", F(85, 100)), Part("finetune", F(15, 100))],
                 "gradual": lambda: [Part("dense", F(1, 10)), Part("sparsify", F(75, 100), "cubic"),
                                     Part("finetune", F(15, 100))],
                 "pretrained": lambda: [Part("finetune", F(1))]},
        doc="prune once (or gradually, Zhu & Gupta 2017) by block norm, then fine-tune"),
    MethodSpec(
        name="powerprop", title="PowerPropagation", strategy="PowerProp", keys=("alpha", "granularity"),
        shown=("alpha", "granularity"), mask_mode="powerprop",
        presets={"paper": lambda: [Part("dense", F(85, 100)), Part("finetune", F(15, 100))]},
        doc="V·|V|^(α−1) reparameterisation while dense, then magnitude pruning (Schwarz et al. 2021)"),
)

METHODS: Dict[str, MethodSpec] = {spec.name: spec for spec in _SPECS}
DEFAULT_METHOD = _SPECS[0].name


def spec(name: str) -> MethodSpec:
    """The record of method `name` (KeyError names the known ones)."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"no method {name!r}; known methods: {', '.join(METHODS)}") from None
