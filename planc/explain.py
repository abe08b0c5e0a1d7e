"""`planc explain`'s report: what the compiler would do to a plan's model, before any
training — the layer table, parameters and FLOPs per example input before and after
(at the plan's target sparsities), and optionally the rewritten graph."""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from planc.errors import PlancError
from planc.plan.factory import call_factory
from planc.pruned import as_plan, compile, example_inputs_for, layer_table

aten = torch.ops.aten


def build_model(plan) -> nn.Module:
    """The plan's model from model.factory ("module:callable" and kwargs)."""
    if plan.model.factory is None:
        raise PlancError("the plan has no model.factory: explain needs a model to build")
    return call_factory(plan, "model.factory")


def layer_report(plan, show_graph: bool = False) -> str:
    plan = as_plan(plan)
    model = build_model(plan).eval()
    inputs = example_inputs_for(plan.model)
    pruned = compile(model, plan, inputs)
    targets = pruned.targets

    total, per_weight = count_flops(model, inputs)
    params = sum(p.numel() for p in _unique_params(model))
    pruned_params = pruned_flops = 0.0
    for t in targets:
        if not t.targeted:
            continue
        frac = 1.0 - t.blocks_kept / t.num_blocks      # share of the weight's blocks pruned
        weight = pruned.module.get_parameter(t.weight_target)
        pruned_params += weight.numel() * frac
        pruned_flops += per_weight.get(_key(weight), 0) * frac

    n_masked = sum(t.targeted for t in targets)
    shapes = ", ".join(f"{list(x.shape)} {str(x.dtype).replace('torch.', '')}" for x in inputs)
    lines = [
        f"plan {plan.name}: model {plan.model.factory.path if plan.model.factory else '-'}, "
        f"example inputs {shapes}, frontend {plan.model.frontend}, method {plan.method.name}",
        "",
        layer_table(targets),
        "",
        f"{len(targets)} weight layers: {n_masked} pruned, {len(targets) - n_masked} dense",
        f"parameters: {_num(params)} before, {_num(params - pruned_params)} after ({_pct(pruned_params, params)} fewer)",
        f"FLOPs per example input: {_num(total)} before, {_num(total - pruned_flops)} after "
        f"({_pct(pruned_flops, total)} fewer; linear/conv FLOPs of pruned layers scale with their kept blocks)",
    ]
    if show_graph:
        lines += ["", "rewritten graph:", str(pruned.module.graph)]
    return "\n".join(lines)


class _FlopCount(TorchDispatchMode):
    """Counts FLOPs of every op torch's flop counter knows, and attributes matrix
    products and convolutions to the weight (by storage) they multiply with."""

    def __init__(self):
        super().__init__()
        self.total = 0
        self.per_weight: Dict[Tuple[int, int], int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in flop_registry:
            flops = int(flop_registry[packet](*args, **kwargs, out_val=out))
            self.total += flops
            weight = {aten.mm: 1, aten.addmm: 2, aten.convolution: 1}.get(packet)
            if weight is not None and isinstance(args[weight], torch.Tensor):
                k = _key(args[weight])
                self.per_weight[k] = self.per_weight.get(k, 0) + flops
        return out


def count_flops(model: nn.Module, inputs) -> Tuple[int, Dict[Tuple[int, int], int]]:
    """(total FLOPs, FLOPs by weight storage) of one eager forward on `inputs`."""
    counter = _FlopCount()
    with torch.no_grad(), counter:
        model(*inputs)
    return counter.total, counter.per_weight


def _key(t: torch.Tensor) -> Tuple[int, int]:
    return (t.untyped_storage().data_ptr(), t.device.index or 0)


def _unique_params(model: nn.Module):
    seen = set()
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            yield p


def _num(x: float) -> str:
    x = float(x)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x:.0f}"


def _pct(part: float, whole: float) -> str:
    return f"{100.0 * part / whole:.1f}%" if whole else "0%"
