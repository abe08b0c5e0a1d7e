"""Lowering with the whole-model check, for `planc apply` and `planc.lower`: lower the
baked model, check that the lowered model computes what the baked one does, and measure
both in the same process, so a report states a measured ratio, not a prediction. A layer
is lowered only if predicted and timed faster alone (passes/lower.py, measure=True), and
the lowering as a whole is kept only if the whole model also measured faster."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import fx
from torch.fx.passes.shape_prop import ShapeProp

from planc.passes.lower import REPORT_KEY, lower, report
from planc.plan.types import Plan
from planc.timing import interleaved


def lower_and_measure(baked: torch.nn.Module, plan: Plan, inputs: Sequence[torch.Tensor], repeats: int = 20) -> dict:
    """{backend, layers (per-layer decisions), max_rel_error, baked_ms, lowered_ms, speedup}.
    `lowered_ms`/`speedup` are measured on `inputs` (in `planc apply`, the plan's
    lower.example_inputs, else its model.example_inputs: planc.pruned.lowering_inputs_for)."""
    return lower_for_run(baked, plan, inputs, repeats)[0]


def lower_for_run(baked: torch.nn.Module, plan: Plan, inputs: Sequence[torch.Tensor],
                  repeats: int = 20) -> Tuple[dict, Optional[torch.nn.Module]]:
    """(lower_and_measure's summary, the lowered model, or None when no layer was lowered
    or the whole lowered model measured slower and the model stays dense)."""
    dtype = getattr(torch, plan.lower.dtype) if plan.lower.dtype else None
    record_shapes(baked, inputs)
    # measure=True: a layer the cost model would lower stays dense if it times slower here;
    # each layer is decided at its own row count (the shapes just recorded)
    lowered = lower(baked, backend=plan.lower.backend, dtype=dtype, min_speedup=plan.lower.min_speedup,
                    measure=True).eval()
    return check_whole_model(baked, lowered, inputs, plan.lower.min_speedup, backend=plan.lower.backend,
                             repeats=repeats)


def record_shapes(gm: torch.nn.Module, inputs: Sequence[torch.Tensor]) -> None:
    """Annotate every node of `gm` (a GraphModule) with the shape it has on `inputs`
    (`tensor_meta`), so the lower pass decides each layer at the row count it really
    sees: the model's first input dimension is not it (token ids (batch, seq) reach a
    Linear as batch·seq rows), and an exported graph's own shapes are symbolic."""
    if not isinstance(gm, fx.GraphModule) or not inputs:
        return
    before = {node: node.meta.get("tensor_meta") for node in gm.graph.nodes}
    try:
        with torch.inference_mode():
            ShapeProp(gm).propagate(*inputs)
    except Exception:      # noqa: BLE001 — only a better guess is lost: layers fall back to the graph's own shapes
        for node, meta in before.items():          # no half-annotated graph
            if meta is None:
                node.meta.pop("tensor_meta", None)
            else:
                node.meta["tensor_meta"] = meta


def check_whole_model(baked: torch.nn.Module, lowered: torch.nn.Module, inputs: Sequence[torch.Tensor],
                      min_speedup: float, *, backend: str = "auto",
                      repeats: int = 20) -> Tuple[dict, Optional[torch.nn.Module]]:
    """Check `lowered` against `baked` on `inputs`: the largest relative error, and when
    some layer was lowered, both timed interleaved in this process. Returns (summary,
    lowered), or (summary, None) when nothing was lowered or the whole model measured
    below `min_speedup`: then every row of the summary says it was kept dense, and why."""
    rows = report(lowered)
    with torch.inference_mode():
        ref, out = baked(*inputs), lowered(*inputs)
    err = float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))
    summary = {
        "backend": backend,
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
        if summary["speedup"] < min_speedup:
            # Layers that time faster alone can still slow the whole model (the CPU path
            # returns a transposed view the next op may copy): keep the model dense.
            why = (f"the whole lowered model measured {summary['speedup']:.2f}x < min_speedup "
                   f"{min_speedup:g}: kept dense")
            for row in rows:
                if row["action"] == "lowered":
                    row.update(action="dense", backend="dense", reason=f"{why} (alone: {row['reason']})")
            summary.update(lowered_layers=0, kept_dense=why)
    return summary, (lowered if summary["lowered_layers"] else None)


def inputs_from_graph(gm: torch.nn.Module, seed: int = 0) -> Optional[Tuple[torch.Tensor, ...]]:
    """Random inputs of the shapes and dtypes a traced graph's placeholders record
    (torch.export keeps them; a dynamic batch takes its example's size), or None when a
    placeholder records none (symbolic_trace)."""
    graph = getattr(gm, "graph", None)
    if graph is None:
        return None
    g = torch.Generator().manual_seed(seed)
    out = []
    for node in graph.nodes:
        if node.op != "placeholder":
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            return None
        try:
            shape = tuple(int(getattr(getattr(d, "node", None), "hint", None) or d) for d in val.shape)
        except (TypeError, ValueError, RuntimeError):
            return None
        if val.dtype.is_floating_point:
            out.append(torch.randn(shape, generator=g, dtype=val.dtype))
        elif val.dtype in (torch.int64, torch.int32):
            out.append(torch.randint(0, 100, shape, generator=g, dtype=val.dtype))
        else:
            return None
    return tuple(out)


def lower_checked(gm: torch.nn.Module, backend: str = "auto", *, example_inputs=None, min_speedup: float = 1.0,
                  measure: Optional[bool] = None, repeats: int = 20, **kwargs) -> torch.nn.Module:
    """planc.lower: the lower pass, then — when it lowered something by its measured or
    predicted speed (min_speedup > 0) and inputs are known (`example_inputs`, else the
    shapes the graph's placeholders record) — the whole-model check: if the lowered
    model measures below `min_speedup` against `gm`, a dense copy of `gm` comes back,
    its report rows saying why. So a model planc.lower returns never measured slower
    than its input here. Layers are also timed alone (`measure`, by default whenever
    min_speedup > 0). The check's summary is in the result's `meta["planc.lower_check"]`."""
    if measure is None:
        measure = min_speedup > 0
    inputs = example_inputs if example_inputs is not None else inputs_from_graph(gm)
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if inputs is not None and min_speedup > 0 and kwargs.get("tokens") is None:
        record_shapes(gm, tuple(inputs))                   # each layer decided at its own row count
    lowered = lower(gm, backend=backend, min_speedup=min_speedup, measure=measure, **kwargs)
    if min_speedup <= 0 or not any(r["action"] == "lowered" for r in report(lowered)):
        return lowered
    if inputs is None:
        return lowered
    summary, kept = check_whole_model(gm, lowered, tuple(inputs), min_speedup, backend=backend, repeats=repeats)
    if kept is None:
        kept = lower(gm, backend="dense")                  # a copy of gm, its layers reported
        kept.meta[REPORT_KEY] = summary["layers"]
    kept.meta[CHECK_KEY] = {k: v for k, v in summary.items() if k != "layers"}
    return kept


CHECK_KEY = "planc.lower_check"
