"""planc's fx graph passes, usable on their own (installed as `planc.passes`).

Each pass takes a GraphModule and what it needs from the plan, mutates the GraphModule
in place and returns `(gm, changed)`; what it learns goes into `node.meta` under the
keys of `planc.meta`:

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
from .pipeline import Pass, PassContext, Pipeline
from .trace import trace
from .select import TargetInfo, select, targets_of
from .insert_masks import insert_masks, masks_of
from .bake import bake

__all__ = ["trace", "select", "insert_masks", "bake", "targets_of", "masks_of", "weight_uses", "WeightUse",
           "TargetInfo", "Pass", "PassContext", "Pipeline"]
