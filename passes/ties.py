"""ties: which parts of a graph read each layer's weight parameter.

A weight is shared (tied) when the same Parameter object is read by more than one
module: an LM head tied to the input embedding, an encoder and decoder sharing a
matrix. Masking one use and baking would silently change the others, so select keeps
such layers dense, and the layer table shows every use.

Families tie weights in different ways, and the graph shows each differently: the same
Parameter registered under two names (transformers' `lm_head.weight = embed.weight`,
two get_attr nodes), one name read by two ops (`F.linear(h, self.embed.weight)`), or a
call_module of the embedding (symbolic_trace). The only test that sees all of them is
the Parameter's identity, so readers are collected by `id(parameter)` over every graph
(nested ones too), every get_attr node and every call_module.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from planc.mask import BlockMask
from planc.meta import WeightReader

from .nodes import WeightUse, graph_modules, module_path

aten = torch.ops.aten
_EMBEDDING_FUNCTIONS = (aten.embedding.default, F.embedding, aten.embedding_bag.default, aten._embedding_bag.default)


def readers_by_weight(gm: fx.GraphModule, uses: Sequence[WeightUse]) -> Dict[str, Tuple[WeightReader, ...]]:
    """weight_target of every layer use -> every reader of that Parameter (its own uses
    included), in graph order, one per (module, kind)."""
    by_param: Dict[int, List[WeightReader]] = {}
    for use in uses:
        kind = "linear^T" if use.transposed else use.op
        _add(by_param, gm.get_parameter(use.weight_target), WeightReader(use.module_name, kind, use.weight_target))
    layer_edges = {u.weight_user for u in uses} | {u.node for u in uses}
    for owner, g in graph_modules(gm):
        for node in g.graph.nodes:
            for param, reader in _other_readers(g, owner, node, layer_edges):
                _add(by_param, param, reader)
    return {u.weight_target: tuple(by_param[id(gm.get_parameter(u.weight_target))]) for u in uses}


def _add(by_param: Dict[int, List[WeightReader]], param: torch.Tensor, reader: WeightReader) -> None:
    found = by_param.setdefault(id(param), [])
    if all((r.module_name, r.kind) != (reader.module_name, reader.kind) for r in found):
        found.append(reader)


def _other_readers(g: fx.GraphModule, owner: str, node: fx.Node, layer_edges) -> List[Tuple[nn.Parameter, WeightReader]]:
    """(parameter, reader) for every read of a parameter by `node` that is not a layer use."""
    if node.op == "get_attr":
        param = _parameter(g, node.target)
        if param is None:
            return []
        target = _join(owner, node.target)
        return [(param, WeightReader(module_path(owner, user), _kind(g, user), target))
                for user in node.users if user not in layer_edges]
    if node.op == "call_module" and node not in layer_edges:
        mod = g.get_submodule(node.target)
        if isinstance(mod, (fx.GraphModule, BlockMask)):
            return []                      # nested graphs are walked on their own; masks hold logits
        name = _join(owner, node.target)
        kind = "embedding" if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) else type(mod).__name__
        return [(p, WeightReader(name, kind, f"{name}.{pname}"))
                for pname, p in mod.named_parameters(recurse=True) if isinstance(p, nn.Parameter)]
    return []


def _parameter(g: fx.GraphModule, target: str):
    try:
        obj = g.get_parameter(target)
    except AttributeError:
        return None
    return obj if isinstance(obj, nn.Parameter) else None


def _kind(g: fx.GraphModule, user: fx.Node) -> str:
    if user.op == "call_function" and user.target in _EMBEDDING_FUNCTIONS:
        return "embedding"
    if user.op == "call_module":
        mod = g.get_submodule(user.target)
        return "embedding" if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)) else type(mod).__name__
    name = getattr(user.target, "__name__", str(user.target))
    return name.split(".")[0] if user.op == "call_function" else f"{user.op} {user.target}"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else (prefix or name)
