"""The last step of `planc apply`: lower the baked model as the plan's `lower:` section
says, check that the lowered model computes what the baked one does, and measure both in
the same process, so the run's report states a measured ratio, not a prediction. A layer
is lowered only if predicted and timed faster alone (passes/lower.py, measure=True), and
the lowering as a whole is kept only if the whole model also measured faster."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from planc.passes.lower import lower, report
from planc.plan.types import Plan
from planc.timing import interleaved


def lower_and_measure(baked: torch.nn.Module, plan: Plan, inputs: Sequence[torch.Tensor], repeats: int = 20) -> dict:
    """{backend, layers (per-layer decisions), max_rel_error, baked_ms, lowered_ms, speedup}.
    `lowered_ms`/`speedup` are measured on `inputs` (the plan's example inputs)."""
    return lower_for_run(baked, plan, inputs, repeats)[0]


def lower_for_run(baked: torch.nn.Module, plan: Plan, inputs: Sequence[torch.Tensor],
                  repeats: int = 20) -> Tuple[dict, Optional[torch.nn.Module]]:
    """(lower_and_measure's summary, the lowered model, or None when no layer was lowered
    or the whole lowered model measured slower and the model stays dense)."""
    dtype = getattr(torch, plan.lower.dtype) if plan.lower.dtype else None
    # measure=True: a layer the cost model would lower stays dense if it times slower here
    lowered = lower(baked, backend=plan.lower.backend, dtype=dtype, min_speedup=plan.lower.min_speedup,
                    tokens=int(inputs[0].shape[0]) if inputs and inputs[0].dim() else None, measure=True).eval()
    rows = report(lowered)
    with torch.inference_mode():
        ref, out = baked(*inputs), lowered(*inputs)
    err = float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))
    summary = {
        "backend": plan.lower.backend,
        "layers": rows,
        "lowered_layers": sum(r["action"] == "lowered" for r in rows),
        "max_rel_error": err,
        "inputs": [list(t.shape) for t in inputs],
        "threads": torch.get_num_threads(),
    }
    if summary["lowered_layers"]:
        with torch.inference_mode():
            t = interleaved({"baked": lambda: baked(*inputs), "lowered": lambda: lowered(*inputs)}, repeats)
        baked_ms, lowered_ms = t["baked"], t["lowered"]
        summary.update(baked_ms=baked_ms, lowered_ms=lowered_ms, speedup=baked_ms / lowered_ms)
        if summary["speedup"] < plan.lower.min_speedup:
            # Layers that time faster alone can still slow the whole model (the CPU path
            # returns a transposed view the next op may copy): keep the model dense.
            why = (f"the whole lowered model measured {summary['speedup']:.2f}x < min_speedup "
                   f"{plan.lower.min_speedup:g}: kept dense")
            for row in rows:
                if row["action"] == "lowered":
                    row.update(action="dense", backend="dense", reason=f"{why} (alone: {row['reason']})")
            summary.update(lowered_layers=0, kept_dense=why)
    return summary, (lowered if summary["lowered_layers"] else None)
