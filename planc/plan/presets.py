"""Schedule presets: a method's named schedule, expanded over `train.steps` into explicit
phases.

A preset is a list of (kind, weight) with exact rational weights that sum to 1. Steps
are apportioned by the largest-remainder rule: every phase gets floor(weight · N), and
the steps left over go, one each, to the phases with the largest remainders (ties: the
earlier phase). So phases always sum exactly to N, and no phase is off by more than one
step from its exact share. A preset that would give some phase zero steps is an error
(the plan names the minimum), except `magnitude: pretrained`, whose one phase may be
empty. docs/plan-format.md tabulates every preset.
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction as F
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from planc.plan.types import Phase


@dataclass(frozen=True)
class Part:
    kind: str
    weight: F
    curve: Optional[str] = None       # sparsify only


def _cycles(warmup: F, final: F, cycles: int) -> List[Part]:
    """SequentialAttention++: dense warm-up; `cycles` cycles of sparsify–sparse–dense, the
    last replaced by a single sparsify; a final sparse fine-tune. The middle share is cut
    into 3·(cycles−1)+1 equal phases, so every sparsify phase prunes at the same pace."""
    n = 3 * (cycles - 1) + 1
    unit = (1 - warmup - final) / n
    parts = [Part("dense", warmup)]
    for _ in range(cycles - 1):
        parts += [Part("sparsify", unit, "exponential"), Part("sparse", unit), Part("dense", unit)]
    parts += [Part("sparsify", unit, "exponential"), Part("finetune", final)]
    return parts


def _acdc(warmup: F, final: F, compressed: int) -> List[Part]:
    """AC/DC: dense warm-up; compressed and decompressed phases of equal length, the last
    decompressed one twice as long; a final compressed fine-tune. The middle share is cut
    into 2·compressed+1 units: (C D)×(compressed−1), C, D D."""
    unit = (1 - warmup - final) / (2 * compressed + 1)
    parts = [Part("dense", warmup)]
    for _ in range(compressed - 1):
        parts += [Part("sparse", unit), Part("dense", unit)]
    parts += [Part("sparse", unit), Part("dense", 2 * unit), Part("finetune", final)]
    return parts


# method -> preset -> parts. The first preset of a method is its default.
PRESETS: Dict[str, Dict[str, Callable[[], List[Part]]]] = {
    "sequential_attention_pp": {
        "paper": lambda: _cycles(F(1, 10), F(15, 100), 7),      # ImageNet
        "criteo": lambda: _cycles(F(2, 10), F(2, 10), 10),
        "simple": lambda: [Part("dense", F(3, 10)), Part("sparsify", F(3, 10), "exponential"),
                           Part("finetune", F(4, 10))],
    },
    "acdc": {
        "paper": lambda: _acdc(F(1, 10), F(15, 100), 7),        # ImageNet: 5%-units
        "criteo": lambda: _acdc(F(2, 10), F(2, 10), 10),
    },
    "magnitude": {
        "oneshot": lambda: [Part("dense", F(85, 100)), Part("finetune", F(15, 100))],
        "gradual": lambda: [Part("dense", F(1, 10)), Part("sparsify", F(75, 100), "cubic"),
                            Part("finetune", F(15, 100))],
        "pretrained": lambda: [Part("finetune", F(1))],
    },
    "powerprop": {
        "paper": lambda: [Part("dense", F(85, 100)), Part("finetune", F(15, 100))],
    },
}


def default_preset(method: str) -> str:
    return next(iter(PRESETS[method]))


def apportion(weights: Sequence[F], total: int) -> List[int]:
    """Largest-remainder split of `total` by exact `weights` (summing to 1)."""
    quotas = [w * total for w in weights]
    steps = [int(q) for q in quotas]        # floor: quotas are non-negative
    left = total - sum(steps)
    order = sorted(range(len(quotas)), key=lambda i: (-(quotas[i] - steps[i]), i))
    for i in order[:left]:
        steps[i] += 1
    return steps


def min_steps(method: str, preset: str) -> int:
    """A train.steps from which on every phase of the preset gets at least one step:
    ceil(1 / smallest weight), since then every floor(weight · N) is already ≥ 1."""
    if (method, preset) == ("magnitude", "pretrained"):
        return 0
    smallest = min(p.weight for p in PRESETS[method][preset]())
    return -(-smallest.denominator // smallest.numerator)


def expand(method: str, preset: str, total: int, *, c: float = 4.0, every: int = 1) -> Tuple[Phase, ...]:
    """The preset's phases over `total` steps. Raises ValueError if a phase would be
    empty (the loader turns that into a PlanError naming min_steps)."""
    parts = PRESETS[method][preset]()
    steps = apportion([p.weight for p in parts], total)
    if 0 in steps and (method, preset) != ("magnitude", "pretrained"):
        raise ValueError(f"train.steps = {total} leaves a phase of preset {preset!r} empty")
    phases, start = [], 0
    for part, n in zip(parts, steps):
        if part.kind == "sparsify":
            phases.append(Phase(part.kind, start, n, curve=part.curve,
                                c=float(c) if part.curve == "exponential" else None, every=every))
        else:
            phases.append(Phase(part.kind, start, n))
        start += n
    return tuple(phases)


def target_fraction(phase: Phase, at_end: bool) -> float:
    """The fraction of a layer's target sparsity the schedule asks for at the start or
    the end of `phase` (dense: 0; sparsify: `initial` → 1; sparse, finetune: 1)."""
    if phase.kind == "dense":
        return 0.0
    if phase.kind == "sparsify":
        return 1.0 if at_end else float(phase.initial)
    return 1.0
