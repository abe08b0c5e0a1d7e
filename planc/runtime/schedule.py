"""The phase schedule as pure functions of the step: which phase a step is in, the
sparsification curves, and which steps of a `sparsify` phase are pruning updates.

Step convention: step t is the t-th optimizer step (0-based). "An update at step u" means
the mask changes *before* step u's forward pass, i.e. right after step u−1's
`pruned.step()` (or when the runtime starts, for u = 0).

Sparsify timing. A sparsify phase [p0, p0+N) with interval e prunes at the steps
u_k = p0 + k·e, k = 0..K, K = ⌊(N−1)/e⌋, at progress t_k = k/K (t = 1 when K = 0). The
first update is at t = 0 (the curve's initial value) and the last one reaches the
layer's target *inside* the phase, so the phase ends at its target whatever follows it
(also a dense phase) — Zhu & Gupta's t0, t0+Δt, …, t0+nΔt with n = K, Δt = e.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

from planc.plan.types import Phase


def exponential(t: float, c: float) -> float:
    """The paper's sparsification curve (1 − e^(−c·t)) / (1 − e^(−c)), from 0 at t = 0 to
    exactly 1 at t = 1. c → 0 is the linear curve."""
    t = min(max(float(t), 0.0), 1.0)
    if t >= 1.0:
        return 1.0
    c = float(c)
    if abs(c) < 1e-12:
        return t
    return math.expm1(-c * t) / math.expm1(-c)


def cubic(t: float) -> float:
    """Zhu & Gupta's curve as a fraction of the way from s_i to s_f: 1 − (1 − t)³."""
    t = min(max(float(t), 0.0), 1.0)
    return 1.0 - (1.0 - t) ** 3


def curve_value(curve: str, t: float, c: float) -> float:
    if curve == "exponential":
        return exponential(t, c)
    if curve == "cubic":
        return cubic(t)
    raise ValueError(f"expected curve 'exponential' or 'cubic', got {curve!r}")


def scheduled_sparsity(target: float, t: float, *, curve: str = "exponential", c: float = 4.0,
                       initial: float = 0.0) -> float:
    """The sparsity a layer with final sparsity `target` should have at progress t ∈ [0, 1]
    of a sparsify phase. `initial` is the fraction of the target already reached at t = 0
    (Zhu & Gupta's s_i = initial · s_f):

        s(t) = s_i + (s_f − s_i) · curve(t)

    With initial = 0 and the exponential curve this is the paper's
    s(t) = s_f · (1 − e^(−ct)) / (1 − e^(−c)); with the cubic curve it is Zhu & Gupta's
    s_t = s_f + (s_i − s_f)(1 − t)³. t ≥ 1 gives exactly s_f."""
    if t >= 1.0:
        return float(target)
    s_i = float(initial) * float(target)
    return s_i + (float(target) - s_i) * curve_value(curve, t, c)


def update_count(phase: Phase) -> int:
    """K: the index of the last pruning update of a sparsify phase (K + 1 updates)."""
    if phase.steps <= 0:
        return 0
    return (phase.steps - 1) // max(1, int(phase.every))


def update_progress(phase: Phase, step: int) -> Optional[float]:
    """If `step` is a pruning update of the sparsify `phase`, its progress t_k ∈ [0, 1];
    else None."""
    every = max(1, int(phase.every))
    offset = step - phase.start
    if phase.steps <= 0:
        return 1.0 if offset == 0 else None
    if offset < 0 or offset >= phase.steps or offset % every:
        return None
    k, K = offset // every, update_count(phase)
    if k > K:
        return None
    return 1.0 if K == 0 else k / K


def phases_starting_at(phases: Sequence[Phase], step: int) -> list:
    """Indices of the phases that start at `step`, in order (zero-length phases included,
    so that e.g. a zero-step `finetune` at step 0 still prunes a pretrained model)."""
    return [i for i, p in enumerate(phases) if p.start == step]


def phase_index_at(phases: Sequence[Phase], step: int) -> int:
    """The index of the phase that step `step` runs in: the last phase that started at or
    before it. After the schedule's end, the last phase (its support is held). -1 before
    the first phase or for an empty schedule."""
    idx = -1
    for i, p in enumerate(phases):
        if p.start <= step:
            idx = i
    return idx
