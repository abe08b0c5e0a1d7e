"""planc.pruned: `planc.compile` (trace + select + insert_masks) and the Pruned object it returns.

    pruned = planc.compile(model, plan, example_inputs)
    pruned.module        # GraphModule whose targeted weights flow through BlockMasks
    pruned.targets       # TargetInfo for every weight-applying layer, skipped ones too
    pruned.masks         # layer name -> BlockMask (masked layers, in graph order)
    pruned.bake()        # a plain GraphModule with exact zeros (the Pruned stays usable)

The training-time methods (param_groups, attach, step, state_dict, ...) are thin
delegations to its one planc.runtime.Runtime (`pruned.pruning_runtime()`), created on
first use.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import fx, nn

from planc.distributed import unwrap
from planc.passes.bake import BakePass
from planc.passes.insert_masks import InsertMasksPass, masks_of
from planc.passes.pipeline import Pipeline, copy_module
from planc.passes.select import SelectPass, TargetInfo, targets_of
from planc.passes.trace import TraceConfig, TracePass
from planc.plan.load import load_plan
from planc.plan.types import ModelSpec, Plan
from planc.runtime.access import RuntimeAccess


def as_plan(plan) -> Plan:
    """A Plan as is; anything else goes through planc.load_plan (path, YAML text, dict)."""
    return plan if isinstance(plan, Plan) else load_plan(plan)


def example_inputs_for(spec: ModelSpec, seed: int = 0,
                       shapes: Optional[Sequence[Sequence[int]]] = None) -> Tuple[torch.Tensor, ...]:
    """Inputs of the plan's example shapes (or of `shapes`): standard normal floats, or
    token ids in [0, 100) for int64 (small ids are valid in any vocabulary worth pruning)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in spec.example_inputs if shapes is None else shapes:
        if spec.input_dtype == "int64":
            out.append(torch.randint(0, 100, tuple(shape), generator=g, dtype=torch.int64))
        else:
            out.append(torch.randn(tuple(shape), generator=g, dtype=getattr(torch, spec.input_dtype)))
    return tuple(out)


def lowering_inputs_for(plan: Plan) -> Tuple[torch.Tensor, ...]:
    """The inputs `planc apply` decides and times the lowering on: the plan's
    lower.example_inputs (the batch the model serves), else its tracing example."""
    return example_inputs_for(plan.model, shapes=plan.lower.example_inputs or None)


def compile(model: nn.Module, plan, example_inputs=None, *, frontend: Optional[str] = None,
            leaf_modules=(), dynamic_shapes=None, check: bool = True) -> "Pruned":
    """trace + select + insert_masks. `plan` is a Plan or anything planc.load_plan takes;
    example_inputs default to the plan's model.example_inputs; frontend to the plan's
    model.frontend. Raises a PassError naming the failing pass (also a TraceError or
    SelectError when that is what went wrong)."""
    plan = as_plan(plan)
    model = unwrap(model)          # DDP(model) compiles the model inside (planc.distributed)
    if example_inputs is None:
        example_inputs = example_inputs_for(plan.model)
    elif isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    trace = TraceConfig(example_inputs=example_inputs, frontend=frontend or plan.model.frontend,
                        dynamic=plan.model.dynamic_batch, dynamic_shapes=dynamic_shapes,
                        leaf_modules=tuple(leaf_modules), check=check)
    pipeline = Pipeline([TracePass(trace), SelectPass(plan), InsertMasksPass(plan.method)])
    return Pruned(pipeline.run(model).module, plan, example_inputs=example_inputs)


class Pruned(RuntimeAccess):
    """A model compiled for pruning. See the module docstring."""

    def __init__(self, module: fx.GraphModule, plan: Plan, example_inputs: Any = ()):
        self.module = module
        self.plan = plan
        self.example_inputs = example_inputs
        self.targets: Tuple[TargetInfo, ...] = targets_of(module)
        self.masks = masks_of(module)
        self._info = {t.name: t for t in self.targets}
        self.runtime = None

    def weight(self, name: str) -> nn.Parameter:
        """The raw weight parameter of a masked layer inside .module."""
        info = self._info.get(name)
        if info is None or name not in self.masks:
            known = ", ".join(list(self.masks)[:8])
            raise KeyError(f"no masked layer named {name!r}; masked layers: {known}{', ...' if len(self.masks) > 8 else ''}")
        return self.module.get_parameter(info.weight_target)

    def bake(self) -> fx.GraphModule:
        """A deep copy of .module with masks folded into the weights (passes.bake)."""
        return Pipeline([BakePass()]).run(copy_module(self.module)).module

    def table(self) -> str:
        """The layer table: one row per weight-applying layer."""
        return layer_table(self.targets, self.masks)

    def __repr__(self) -> str:
        return f"Pruned({type(self.module).__name__}: {len(self.masks)} masked of {len(self.targets)} layers)"


TRANSPOSED_NOTE = ("linear^T: a transposed (Conv1D-style) linear, weight stored (in, out) and applied as x @ W; "
                   "its block and grid are in (out, in) orientation like every linear")


def layer_table(targets, masks: Optional[Dict[str, Any]] = None) -> str:
    """name, op, weight shape, block, grid, blocks, target sparsity, blocks kept at the
    target, the deciding rule or the skip reason; with `masks`, also the blocks alive now.
    A shared (tied) weight gets one more row for each of its other uses."""
    head = ["layer", "op", "weight", "block", "grid", "blocks", "sparsity", "kept"]
    if masks is not None:
        head.append("alive")
    head.append("rule / skip reason")
    rows = []
    for t in targets:
        shape = "x".join(map(str, t.weight_shape))
        row = [t.name, "linear^T" if t.transposed else t.op, shape, "x".join(map(str, t.block)),
               "x".join(map(str, t.grid)), str(t.num_blocks), f"{t.sparsity:.2f}" if t.targeted else "-",
               str(t.blocks_kept)]
        if masks is not None:
            row.append(str(int(masks[t.name].alive.sum())) if t.name in masks else "-")
        row.append(t.skip_reason if t.skip_reason else (f"rules[{t.rule}]" if t.rule is not None else "defaults"))
        rows.append(row)
        for reader in t.shared_with:        # every use of a tied weight is listed
            rows.append([f"  also {reader.label}", reader.kind, shape] + ["-"] * (len(head) - 4)
                        + [f"same weight as {t.name}"])
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head] + rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if any(t.transposed for t in targets):
        lines.append(TRANSPOSED_NOTE)
    return "\n".join(lines)
