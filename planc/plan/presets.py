"""Schedule presets: a method's named schedule (planc.plan.registry), expanded over
`train.steps` into explicit phases, and the arithmetic of schedules (scaling a plan to
another number of steps).

A preset is a list of (kind, weight) with exact rational weights that sum to 1. Steps
are apportioned by the largest-remainder rule: every phase gets floor(weight · N), and
the steps left over go, one each, to the phases with the largest remainders (ties: the
earlier phase). So phases always sum exactly to N, and no phase is off by more than one
step from its exact share. A preset that would give some phase zero steps is an error
(the plan names the minimum), except the presets a method's record lists in
`may_be_empty` (pruning a pretrained model with no training at all). docs/plan-format.md tabulates every preset.
"""
from __future__ import annotations

import dataclasses
from fractions import Fraction as F
from typing import List, Sequence, Tuple

from planc.plan.registry import Part, spec
from planc.errors import PlanError
from planc.plan.types import Phase, Plan, Schedule


def parts(method: str, preset: str) -> List[Part]:
    """The phases of a method's preset (planc.plan.registry defines them)."""
    return spec(method).presets[preset]()


def names(method: str) -> List[str]:
    """A method's presets; the first is its default."""
    return list(spec(method).presets)


def default_preset(method: str) -> str:
    return spec(method).default_preset


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
    if preset in spec(method).may_be_empty:
        return 0
    smallest = min(p.weight for p in parts(method, preset))
    return -(-smallest.denominator // smallest.numerator)


def expand(method: str, preset: str, total: int, *, c: float = 4.0, every: int = 1) -> Tuple[Phase, ...]:
    """The preset's phases over `total` steps. Raises ValueError if a phase would be
    empty (the loader turns that into a PlanError naming min_steps)."""
    chosen = parts(method, preset)
    steps = apportion([p.weight for p in chosen], total)
    if 0 in steps and preset not in spec(method).may_be_empty:
        raise ValueError(f"train.steps = {total} leaves a phase of preset {preset!r} empty")
    phases, start = [], 0
    for part, n in zip(chosen, steps):
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


def scale_schedule(plan: Plan, steps: int) -> Plan:
    """The plan with train.steps = `steps`: a preset is expanded again over the new
    length (planc.plan.presets); explicit phases are scaled proportionally (boundaries
    rounded, sparsify intervals kept). Used by `planc apply --steps`."""
    if steps <= 0:
        raise PlanError([plan.problem("train.steps", f"expected a positive number of steps, got {steps}")])
    m = plan.method
    if plan.schedule.preset is not None:
        try:
            phases = expand(m.name, plan.schedule.preset, steps, c=m.c, every=m.update_every)
        except ValueError as err:
            need = min_steps(m.name, plan.schedule.preset)
            raise PlanError([plan.problem("train.steps",
                                          f"{err}; preset {plan.schedule.preset!r} needs at least {need} steps")]) from None
    else:
        old = plan.schedule.total_steps or plan.train.steps
        bounds = [p.start for p in plan.schedule.phases] + [old]
        new = [int(round(b * steps / old)) if old else 0 for b in bounds]
        phases = tuple(dataclasses.replace(p, start=new[i], steps=new[i + 1] - new[i])
                       for i, p in enumerate(plan.schedule.phases))
    return dataclasses.replace(plan, train=dataclasses.replace(plan.train, steps=steps),
                               schedule=dataclasses.replace(plan.schedule, phases=phases))
