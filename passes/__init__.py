"""planc's fx graph passes, usable on their own (installed as `planc.passes`).

Each pass is a function (below) and a pass object for pipelines (TracePass, SelectPass,
InsertMasksPass, BakePass, LowerPass: built with their configuration, `run(module) ->
PassResult(module, changed)`; docs/architecture.md). What a pass learns goes into
`node.meta` under the keys of `planc.meta`:

    gm = trace(model, example_inputs)                 # frontend "export" | "symbolic" | "auto"
    gm, _ = select(gm, plan.targets)                  # TargetInfo in node.meta["planc.target"]
    gm, _ = insert_masks(gm, plan.method)             # BlockMask modules under planc_masks
    ...train...
    gm, _ = bake(gm)                                  # masks folded, exact zeros, node.meta["planc.baked"]

`targets_of(gm)` and `masks_of(gm)` read the results back; `weight_uses(gm)` lists the
nodes that apply a weight; `Pipeline` runs passes in order and names the failing one.
See docs/passes.md.
"""
from .nodes import WeightUse, weight_uses
from .pipeline import FunctionPass, GraphPass, PassResult, Pipeline, PipelineResult
from .trace import TraceConfig, TracePass, trace
from .select import SelectPass, TargetInfo, select, targets_of
from .insert_masks import InsertMasksPass, insert_masks, masks_of
from .bake import BakePass, bake

__all__ = ["trace", "select", "insert_masks", "bake", "targets_of", "masks_of", "weight_uses", "WeightUse",
           "TargetInfo", "GraphPass", "FunctionPass", "PassResult", "Pipeline", "PipelineResult", "TraceConfig",
           "TracePass", "SelectPass", "InsertMasksPass", "BakePass"]
