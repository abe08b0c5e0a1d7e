"""bake: fold every BlockMask into its weight and take the masks out of the graph.

For each masked layer the effective weight `mask(W)` (attention scaling, PowerProp's
reparameterisation, the support) is written into the weight parameter, the entries of
pruned blocks are set to exactly zero, every mask call is replaced by the weight itself,
and the `planc_masks` modules are deleted: the result is a plain GraphModule computing
what the masked one computed. The weight's parameter object is kept (its data changes),
so optimizers and state-dict keys still match.

Each op node of a baked layer records, in `node.meta[planc.meta.BAKED]`, a BakedRecord:
the layer's block and its achieved block and weight sparsity, counted from the baked
weight (a block is pruned when all its entries are zero). The lower pass reads the block.

bake mutates `gm` in place (and the weights it shares with the traced model); Pruned.bake()
runs it on a deep copy.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import fx

from planc import meta
from planc.mask import BlockMask
from planc.meta import BakedRecord

from .insert_masks import MASKS
from .kernel_form import dense_form
from .nodes import graph_modules, weight_uses
from .pipeline import GraphPass, PassResult


def bake(gm: fx.GraphModule) -> Tuple[fx.GraphModule, bool]:
    """Fold masks into weights; returns (gm, changed)."""
    records: Dict[int, BakedRecord] = {}    # id(weight parameter) -> what bake did to it
    dense_form(gm)                          # a graph caught in a kernel phase: back to linear(x, mask(w), b)
    uses = weight_uses(gm)
    with torch.no_grad():
        for use in uses:
            if use.mask_node is None:
                continue
            owner = gm.get_submodule(use.owner) if use.owner else gm
            mask = owner.get_submodule(use.mask_node.target)
            if not isinstance(mask, BlockMask):
                continue
            weight = gm.get_parameter(use.weight_target)
            if id(weight) not in records:              # a weight applied twice (or aliased) is folded once
                records[id(weight)] = _fold(weight, mask)
            use.mask_node.replace_all_uses_with(use.weight_node)
            owner.graph.erase_node(use.mask_node)
            use.node.meta[meta.BAKED] = records[id(weight)]
            use.node.meta.pop(meta.MASK, None)
    changed = bool(records)
    for _, g in graph_modules(gm):
        container = getattr(g, MASKS, None)
        if container is not None:
            # masks no node calls any more (or all of them): gone from the module tree
            still = {n.target for n in g.graph.nodes if n.op == "call_module" and str(n.target).startswith(MASKS + ".")}
            for name in list(container._modules):
                if f"{MASKS}.{name}" not in still:
                    delattr(container, name)
            if not container._modules:
                delattr(g, MASKS)
            changed = True
        g.graph.lint()
        g.recompile()
    return gm, changed


class BakePass(GraphPass):
    """bake as a pass (it needs no configuration: the masks carry everything)."""

    name = "bake"

    def run(self, gm: fx.GraphModule) -> PassResult:
        return PassResult(*bake(gm))


def _fold(weight: torch.nn.Parameter, mask: BlockMask) -> BakedRecord:
    view = mask.view
    effective = mask(weight)
    pruned = view.expand((~mask.alive).to(weight.dtype)).bool()
    effective = effective.masked_fill(pruned, 0.0)       # exact zeros, whatever mask(W) gave
    weight.copy_(effective)
    blocks_zero = int((view.block_norms(weight) == 0).sum())
    zeros = int((weight == 0).sum())
    return BakedRecord(block=tuple(view.block), blocks=view.num_blocks, blocks_pruned=blocks_zero,
                       block_sparsity=blocks_zero / view.num_blocks, weights=weight.numel(), weights_zero=zeros,
                       weight_sparsity=zeros / weight.numel())
