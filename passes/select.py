"""select: which layers the plan prunes, and how.

Every node that applies a weight (passes.nodes.weight_uses) becomes one layer, named by
its weight parameter's path without the trailing `.weight` (for an nn.Linear that is the
module's qualified name: `encoder.layer.0.attention.self.query`). A weight applied by
several nodes (a module called twice) is one layer; every node gets the same TargetInfo
in `node.meta[planc.meta.TARGET]`.

Rules (plan.targets.rules) are tried in order and the first whose match holds decides:
- `type`: the module's class name, or the name of one of its base classes
  (`Linear` matches `NonDynamicallyQuantizableLinear`);
- `name`: an fnmatch glob on the layer name or the module name; a leading `module.`
  (DDP/DataParallel, or the `auto` frontend's wrapper) is ignored on either side;
- `position`: `first` — layers no other layer feeds, on any path through the graph; `last`
  — layers that feed no other layer. Computed on the data-flow DAG with networkx, so a
  model with two heads has two last layers, and BERT's first layers are query, key and
  value of layer 0.

A layer stays dense, with its reason in `skip_reason`, when a rule says skip, when its
grid has fewer than `min_blocks` blocks (the paper's rule), when its target sparsity is
0, when it is a grouped convolution (its (out, kh·kw·in/groups) view is not one matrix
product), or when its weight is shared with another use (tied weights: masking one use
and baking would silently change the other; passes.ties finds every reader of the
Parameter, so a head tied to the input embedding is recognised however it is tied, and
`shared_with` lists the other uses for the layer table). A rule that matches no layer at all is a
SelectError listing the closest layer names; so is a plan under which every layer stays
dense (nothing would be pruned).
"""
from __future__ import annotations

import difflib
import fnmatch
from typing import Dict, List, Optional, Sequence, Tuple

import networkx as nx
from torch import fx

from planc import meta
from planc.meta import TargetInfo, WeightReader
from planc.blocks import BlockView
from planc.errors import SelectError
from planc.plan.types import Plan

from .nodes import WeightUse, graph_modules, weight_uses
from .pipeline import GraphPass, PassResult
from .ties import readers_by_weight

_PREFIXES = ("module.",)


def select(gm: fx.GraphModule, targets) -> Tuple[fx.GraphModule, bool]:
    """Annotate every weight-applying node of gm with its TargetInfo. `targets` is a
    planc Plan or its `targets` section. Returns (gm, changed)."""
    targets = getattr(targets, "targets", targets)
    uses = weight_uses(gm)
    layers = _layers(gm, uses)
    first, last = _positions(gm, layers)
    _check_rules(targets.rules, layers, first, last)
    readers = readers_by_weight(gm, uses)

    infos = [(group, _decide(gm, name, group[0], group, order, targets, name in first, name in last,
                             _others(group, readers[group[0].weight_target])))
             for order, (name, group) in enumerate(layers.items())]
    _check_something_pruned([info for _, info in infos])

    changed = False
    for group, info in infos:
        for u in group:
            if u.node.meta.get(meta.TARGET) != info:
                u.node.meta[meta.TARGET] = info
                changed = True
    return gm, changed


class SelectPass(GraphPass):
    """select as a pass, for a resolved plan: its errors about a plan key are placed at
    that key's file:line:col."""

    name = "select"

    def __init__(self, plan: Plan):
        self.plan = plan

    def run(self, gm: fx.GraphModule) -> PassResult:
        try:
            gm, changed = select(gm, self.plan.targets)
        except SelectError as err:
            raise err.placed(self.plan) from None
        return PassResult(gm, changed)


def targets_of(gm: fx.GraphModule) -> Tuple[TargetInfo, ...]:
    """Every TargetInfo recorded by select, once per layer, in order."""
    seen: Dict[str, TargetInfo] = {}
    for _, g in graph_modules(gm):
        for node in g.graph.nodes:
            info = node.meta.get(meta.TARGET)
            if isinstance(info, TargetInfo) and info.name not in seen:
                seen[info.name] = info
    return tuple(sorted(seen.values(), key=lambda t: t.order))


# ---- layers and positions ------------------------------------------------------------

def _layers(gm, uses: Sequence[WeightUse]) -> Dict[str, List[WeightUse]]:
    """Layer name -> its uses: one layer per weight Parameter (by identity, so aliases of a
    tied weight are one layer whatever names the graph reads it by). The name is the
    weight's path without `.weight`, preferring the path under the module that applies it
    (export may read a tied weight by another module's name)."""
    by_param: Dict[int, List[WeightUse]] = {}
    for use in uses:
        by_param.setdefault(id(gm.get_parameter(use.weight_target)), []).append(use)
    aliases: Dict[int, List[str]] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    layers: Dict[str, List[WeightUse]] = {}
    for key, group in by_param.items():
        first = group[0]
        own = f"{first.module_name}.weight"
        target = own if first.module_name and own in aliases.get(key, ()) else first.weight_target
        layers[target[: -len(".weight")] if target.endswith(".weight") else target] = group
    return layers


def _positions(gm: fx.GraphModule, layers: Dict[str, List[WeightUse]]) -> Tuple[set, set]:
    """(first, last) layer names: layers with no layer upstream / downstream of them in
    the data-flow DAG. Nested graphs (auto frontend) are ordered by the order in which
    their layers appear, each graph on its own."""
    first, last = set(), set()
    by_owner: Dict[str, List[WeightUse]] = {}
    name_of = {u.node: name for name, group in layers.items() for u in group}
    for u in (u for group in layers.values() for u in group):
        by_owner.setdefault(u.owner, []).append(u)
    owners = list(by_owner)
    for i, owner in enumerate(owners):
        g = gm.get_submodule(owner) if owner else gm
        dag = nx.DiGraph()
        index = {n: k for k, n in enumerate(g.graph.nodes)}
        for n in g.graph.nodes:
            dag.add_node(n)
            for inp in n.all_input_nodes:
                dag.add_edge(inp, n)
        layer_of = {u.node: name_of[u.node] for u in by_owner[owner]}
        up, down = _reach(dag, layer_of, index)
        for node, name in layer_of.items():
            # Only the first graph's heads are the model's first, only the last graph's tails its last.
            if not up[node] and i == 0:
                first.add(name)
            if not down[node] and i == len(owners) - 1:
                last.add(name)
    return first, last


def _reach(dag: nx.DiGraph, layer_of: Dict[fx.Node, str], index) -> Tuple[Dict, Dict]:
    """For each node: is a layer node strictly upstream (up) / downstream (down) of it."""
    order = list(nx.lexicographical_topological_sort(dag, key=index.__getitem__))
    up = {}
    for n in order:
        up[n] = any(p in layer_of or up[p] for p in dag.predecessors(n))
    down = {}
    for n in reversed(order):
        down[n] = any(s in layer_of or down[s] for s in dag.successors(n))
    return up, down


def _others(group: Sequence[WeightUse], readers: Sequence[WeightReader]) -> Tuple[WeightReader, ...]:
    """The readers of a layer's weight other than its own module (a module applying its
    weight twice is one layer; two modules sharing one weight are tied)."""
    first = group[0]
    own = (first.module_name, "linear^T" if first.transposed else first.op)
    return tuple(r for r in readers if (r.module_name, r.kind) != own)


def _shared_reason(others: Sequence[WeightReader]) -> Optional[str]:
    """Why a weight read elsewhere stays dense (masking one use and baking changes the others)."""
    if not others:
        return None
    embedding = next((r for r in others if r.kind == "embedding"), None)
    if embedding is not None:
        return (f"weight tied to the input embedding {embedding.label} (tied LM head): "
                f"pruning it would change the embedding too")
    return f"weight shared with {others[0].label} ({others[0].kind}; tied weights): pruning one use would change the other"


# ---- rules ----------------------------------------------------------------------------

def _strip(name: str) -> str:
    for p in _PREFIXES:
        while name.startswith(p):
            name = name[len(p):]
    return name


def _name_matches(pattern: str, names: Sequence[str]) -> bool:
    pats = {pattern, _strip(pattern)}
    cands = set(names) | {_strip(n) for n in names}
    return any(fnmatch.fnmatchcase(c, p) for c in cands for p in pats)


def _matches(match, name: str, use: WeightUse, is_first: bool, is_last: bool) -> bool:
    if match.type is not None and match.type != use.module_type and match.type not in use.module_mro:
        return False
    if match.name is not None and not _name_matches(match.name, [name, use.module_name]):
        return False
    if match.position == "first" and not is_first:
        return False
    if match.position == "last" and not is_last:
        return False
    return True


def _check_something_pruned(infos: Sequence[TargetInfo]) -> None:
    """A plan that prunes nothing is a mistake (a wrong model, or min_blocks/skip rules
    that exclude every layer): training it would spend the whole schedule for nothing."""
    if any(info.targeted for info in infos):
        return
    if not infos:
        raise SelectError("no layer to prune: the model applies no weight through a Linear or Conv2d layer", "targets")
    reasons = "; ".join(f"{info.name}: {info.skip_reason}" for info in infos[:4])
    more = f"; and {len(infos) - 4} more" if len(infos) > 4 else ""
    raise SelectError(f"no layer to prune: all {len(infos)} layers stay dense ({reasons}{more})", "targets")


def _check_rules(rules, layers: Dict[str, List[WeightUse]], first, last) -> None:
    names = list(layers)
    for i, rule in enumerate(rules):
        index = rule.index or i
        if any(_matches(rule.match, n, g[0], n in first, n in last) for n, g in layers.items()):
            continue
        m = rule.match
        desc = ", ".join(f"{k}: {v}" for k, v in (("type", m.type), ("name", m.name), ("position", m.position)) if v is not None)
        if not names:
            raise SelectError(f"match {{{desc}}} matches no layer: the model has no Linear or Conv2d layer",
                              f"targets.rules[{index}]")
        hint = ""
        if m.name is not None:
            key = _strip(m.name).replace("*", "").replace("?", "")
            close = difflib.get_close_matches(key, [_strip(n) for n in names], n=5, cutoff=0.0)
            hint = f"; closest layer names: {', '.join(close)}"
        if m.type is not None:
            types = sorted({g[0].module_type for g in layers.values() if g[0].module_type})
            hint += f"; layer types in the model: {', '.join(types)}"
        raise SelectError(f"match {{{desc}}} matches no layer{hint}", f"targets.rules[{index}]")


def _decide(gm, name, use: WeightUse, group, order, targets, is_first, is_last, others) -> TargetInfo:
    d = targets.defaults
    block, sparsity, min_blocks = tuple(d.block), float(d.sparsity), int(d.min_blocks)
    rule_index, skip = None, None
    for i, rule in enumerate(targets.rules):
        if all(_matches(rule.match, name, u, is_first, is_last) for u in group[:1]):
            rule_index = rule.index or i
            block = tuple(rule.block) if rule.block is not None else block
            sparsity = float(rule.sparsity) if rule.sparsity is not None else sparsity
            min_blocks = int(rule.min_blocks) if rule.min_blocks is not None else min_blocks
            if rule.skip:
                skip = f"skipped by targets.rules[{rule_index}]"
            break
    shape = tuple(gm.get_parameter(use.weight_target).shape)
    view = BlockView(shape, block, use.transposed)
    if skip is None and len({(u.op, u.transposed) for u in group}) > 1:
        skip = "weight applied in two ways (linear map, transposed linear map or convolution)"
    if skip is None and use.op == "conv2d" and use.groups != 1:
        skip = f"grouped convolution (groups={use.groups}): its weight is not one matrix product"
    if skip is None and others:
        skip = _shared_reason(others)
    if skip is None and sparsity <= 0:
        skip = "target sparsity 0"
    if skip is None and view.num_blocks < min_blocks:
        skip = f"{view.num_blocks} blocks < min_blocks {min_blocks}"
    return TargetInfo(name=name, op=use.op, module_type=use.module_type, weight_shape=shape,
                      weight_target=use.weight_target, block=block, sparsity=sparsity, min_blocks=min_blocks,
                      grid=view.grid, num_blocks=view.num_blocks, rule=rule_index, skip_reason=skip, order=order,
                      module_name=use.module_name, bias_target=use.bias_target, transposed=use.transposed,
                      shared_with=others)
