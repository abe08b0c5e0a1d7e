"""insert_masks: make every selected layer's weight flow through a BlockMask.

For each layer that select marked as targeted, one `BlockMask` is registered in the
GraphModule that holds the layer's node, under `planc_masks.<layer name, dots as _>`,
so `parameters()` includes attention logits. Each node applying the weight reads
`mask(weight)` instead of `weight`:

    %w = get_attr[layers.0.weight]  ->  %w = get_attr[layers.0.weight]
    %y = linear(%x, %w, %b)             %m = call_module[planc_masks.layers_0](%w)
                                        %y = linear(%x, %m, %b)

A `call_module` Linear/Conv2d (symbolic_trace) is first rewritten to its functional form
(get_attr weight and bias, F.linear / F.conv2d), the module staying registered as the
parameters' owner. The mask's mode is the method's (planc.plan.registry: `mask_mode`):
attention masks take method.clip (resolved per layer by planc.mask.clip_range),
powerprop masks method.alpha and method.granularity, and re-parameterise their weight
once so that the effective weight equals the dense one (BlockMask.reparameterize_).
Every rewritten node, and the mask call, records the mask's qualified name in
`node.meta[planc.meta.MASK]`.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from planc import meta
from planc.mask import BlockMask, clip_range
from planc.plan.registry import METHODS
from planc.plan.types import Method

from .nodes import WeightUse, weight_uses
from .pipeline import GraphPass, PassResult
from .select import TargetInfo

MASKS = "planc_masks"


def mask_for(info: TargetInfo, method) -> BlockMask:
    """The BlockMask a method gives a layer (`method`: a planc Method or its name)."""
    name = method if isinstance(method, str) else method.name
    if name not in METHODS:
        raise ValueError(f"expected a method in {sorted(METHODS)}, got {name!r}")
    mode = METHODS[name].mask_mode
    if isinstance(method, str):
        return BlockMask(info.weight_shape, info.block, mode, transposed=info.transposed)
    clip = clip_range(method.clip, info.sparsity) if mode == "attention" else None
    return BlockMask(info.weight_shape, info.block, mode, clip=clip,
                     alpha=method.alpha, granularity=method.granularity, transposed=info.transposed)


def insert_masks(gm: fx.GraphModule, method) -> Tuple[fx.GraphModule, bool]:
    """Insert a BlockMask on every targeted layer (select must have run). `method` is a
    planc Plan, its Method, or a method name. Layers already masked are left alone, so
    running it twice changes nothing. Returns (gm, changed)."""
    method = getattr(method, "method", method)
    masks: Dict[str, str] = {}          # layer name -> mask path relative to its owner
    changed = set()
    for use in weight_uses(gm):
        info = use.node.meta.get(meta.TARGET)
        if not isinstance(info, TargetInfo) or not info.targeted or use.mask_node is not None:
            continue
        owner = gm.get_submodule(use.owner) if use.owner else gm
        local = masks.get(info.name)
        if local is None:
            local = _register(owner, info, method, gm.get_parameter(use.weight_target))
            masks[info.name] = local
        node = _functional(owner, use) if use.is_call_module else use.node
        weight_node = node.args[1] if use.is_call_module else use.weight_node
        weight_user = node if use.is_call_module else use.weight_user
        with owner.graph.inserting_before(weight_user):
            masked = owner.graph.call_module(local, (weight_node,))
        weight_user.replace_input_with(weight_node, masked)
        qualified = f"{use.owner}.{local}" if use.owner else local
        masked.meta[meta.MASK] = qualified
        masked.meta["nn_module_stack"] = dict(node.meta.get("nn_module_stack", {}))
        node.meta[meta.MASK] = qualified
        changed.add(owner)
    for owner in changed:
        owner.graph.lint()
        owner.recompile()
    return gm, bool(changed)


class InsertMasksPass(GraphPass):
    """insert_masks as a pass, for the plan's method."""

    name = "insert_masks"

    def __init__(self, method: Method):
        self.method = method

    def run(self, gm: fx.GraphModule) -> PassResult:
        return PassResult(*insert_masks(gm, self.method))


def masks_of(gm: fx.GraphModule) -> Dict[str, BlockMask]:
    """layer name -> BlockMask for every masked layer, in layer order."""
    found: Dict[str, Tuple[int, BlockMask]] = {}
    for use in weight_uses(gm):
        info, path = use.node.meta.get(meta.TARGET), use.node.meta.get(meta.MASK)
        if isinstance(info, TargetInfo) and path and info.name not in found:
            found[info.name] = (info.order, gm.get_submodule(path))
    return {name: m for name, (_, m) in sorted(found.items(), key=lambda kv: kv[1][0])}


# ---- helpers --------------------------------------------------------------------------

def _register(owner: fx.GraphModule, info: TargetInfo, method, weight: torch.Tensor) -> str:
    if not isinstance(getattr(owner, MASKS, None), nn.Module):
        owner.add_module(MASKS, nn.Module())
    container = getattr(owner, MASKS)
    base = info.name.replace(".", "_")
    child, k = base, 1
    while hasattr(container, child):        # `a.b_c` and `a_b.c` must not collide
        child, k = f"{base}_{k}", k + 1
    mask = mask_for(info, method).to(weight.device)
    if mask.mode == "powerprop":
        mask.reparameterize_(weight)        # the effective weight starts as the dense one
    container.add_module(child, mask)
    return f"{MASKS}.{child}"


def _functional(owner: fx.GraphModule, use: WeightUse) -> fx.Node:
    """Replace `call_module Linear/Conv2d` by get_attr + F.linear / F.conv2d on the same
    parameters (the module stays registered as their owner). Returns the new op node."""
    graph, node = owner.graph, use.node
    mod = owner.get_submodule(node.target)
    local = node.target
    with graph.inserting_before(node):
        w = graph.get_attr(f"{local}.weight")
        b = graph.get_attr(f"{local}.bias") if mod.bias is not None else None
        x = node.args[0] if node.args else node.kwargs["input"]
        if use.op == "linear":
            new = graph.call_function(F.linear, (x, w, b))
        else:
            if mod.padding_mode != "zeros":
                # what Conv2d._conv_forward does for non-zero padding modes
                x = graph.call_function(F.pad, (x, mod._reversed_padding_repeated_twice), {"mode": mod.padding_mode})
                padding = (0, 0)
            else:
                padding = mod.padding
            new = graph.call_function(F.conv2d, (x, w, b, mod.stride, padding, mod.dilation, mod.groups))
    new.meta = dict(node.meta)
    new.meta.setdefault("nn_module_stack", {local: (local, type(mod))})
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new
