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


def acdc_cycles(warmup: F, final: F, n_cycles: int, extension: F = F(0)) -> List[Part]:
    """ACDC as Kuznedelev et al. schedule it (the paper's §4.2): a dense warm-up;
    `n_cycles` equal compressed–decompressed (sparse–dense) phases, each half sparse and
    half dense, the last dense half extended by `extension`; a final compressed
    fine-tune. ImageNet: 10% + 7 × (5% + 5%) + 5% + 15% = 100%."""
    cycle = (1 - warmup - final - extension) / n_cycles
    parts = [Part("dense", warmup)]
    for i in range(n_cycles):
        last = i == n_cycles - 1
        parts += [Part("sparse", cycle / 2), Part("dense", cycle / 2 + (extension if last else 0))]
    return parts + [Part("finetune", final)]


def sapp_cycles(warmup: F, final: F, n_cycles: int, extension: F = F(0)) -> List[Part]:
    """SequentialAttention++ on ACDC's schedule (the paper's §4.2): each sparse–dense
    phase becomes sparsify–sparse–dense, and the last of the `n_cycles` phases, its
    extension included, is replaced by one sparsify phase. The paper does not say how a
    cycle splits between its three phases; planc keeps ACDC's halves — the dense half
    as it is, the sparse half cut into equal sparsify and sparse quarters — so SA++ and
    ACDC spend the same time dense, and removing the sparsify phases (Appendix D.1)
    gives back ACDC's schedule exactly. ImageNet: 10% + 6 × (2.5% + 2.5% + 5%) + 15%
    sparsify + 15% = 100%."""
    cycle = (1 - warmup - final - extension) / n_cycles
    parts = [Part("dense", warmup)]
    for _ in range(n_cycles - 1):
        parts += [Part("sparsify", cycle / 4, "exponential"), Part("sparse", cycle / 4), Part("dense", cycle / 2)]
    return parts + [Part("sparsify", cycle + extension, "exponential"), Part("finetune", final)]


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
    phase_kinds: Optional[Tuple[str, ...]] = None      # the only phase kinds its schedule may have (None: any)
    doc: str = field(default="", repr=False)

    @property
    def default_preset(self) -> str:
        return next(iter(self.presets))


_SPECS = (
    MethodSpec(
        name="sequential_attention_pp", title="SequentialAttention++", strategy="SequentialAttentionPP",
        keys=("score", "c", "update_every", "clip", "logits_lr", "logits_weight_decay"), shown=("score", "c"),
        mask_mode="attention",
        presets={"paper": lambda: sapp_cycles(F(1, 10), F(15, 100), 7, F(5, 100)),     # ImageNet
                 "criteo": lambda: sapp_cycles(F(2, 10), F(2, 10), 10),
                 "simple": lambda: [Part("dense", F(3, 10)), Part("sparsify", F(3, 10), "exponential"),
                                    Part("finetune", F(4, 10))],
                 # Appendix D.1's ablation: the sparsify phases removed, i.e. ACDC's schedule
                 "paper-no-sparsify": lambda: acdc_cycles(F(1, 10), F(15, 100), 7, F(5, 100))},
        doc="softmax attention over block logits, gradual sparsify phases (Yasuda et al. 2024)"),
    MethodSpec(
        name="acdc", title="ACDC", strategy="ACDC", keys=("masking",), shown=("masking",), mask_mode="support",
        presets={"paper": lambda: acdc_cycles(F(1, 10), F(15, 100), 7, F(5, 100)),     # ImageNet
                 "criteo": lambda: acdc_cycles(F(2, 10), F(2, 10), 10)},
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
    MethodSpec(
        name="obs", title="block OBS", strategy="OBS", keys=("calibration_batches", "damp"),
        shown=("calibration_batches",), mask_mode="support", may_be_empty=("pretrained",),
        phase_kinds=("sparse", "finetune"),
        presets={"pretrained": lambda: [Part("finetune", F(1))]},
        doc="prune once at step 0 from calibration batches, choosing blocks and reconstructing the kept "
            "weights layer by layer with the Optimal Brain Surgeon (planc.obs; Frantar & Alistarh 2022), then fine-tune"),
)

METHODS: Dict[str, MethodSpec] = {spec.name: spec for spec in _SPECS}
DEFAULT_METHOD = _SPECS[0].name


def spec(name: str) -> MethodSpec:
    """The record of method `name` (KeyError names the known ones)."""
    try:
        return METHODS[name]
    except KeyError:
        raise KeyError(f"no method {name!r}; known methods: {', '.join(METHODS)}") from None
