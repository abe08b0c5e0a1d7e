"""Find the nodes of a graph that apply a weight parameter as a linear map or a 2-D
convolution — the only thing the later passes (select, insert_masks, bake, lower) need
to know about a model.

Every kind of graph the trace frontends produce is recognised:

- `call_module` of an `nn.Linear` / `nn.Conv2d` (symbolic_trace keeps these as leaves);
- `call_function` of `F.linear` / `F.conv2d` / `torch.conv2d` whose weight is a
  `get_attr` of a parameter (hand-written functional code);
- ATen ops from torch.export: `aten.linear`, `aten.conv2d`, `aten.convolution`
  (non-transposed, 4-D weight), and the decomposed `aten.addmm(b, x, t(W))` /
  `aten.mm(x, t(W))` / `aten.matmul(x, t(W))` patterns (`run_decompositions()`, and
  Falcon's `x @ W.T`);
- transposed linear maps, whose weight is stored (in, out) and applied as the right
  operand without a transpose: `aten.addmm(b, x, W)` / `aten.mm(x, W)` /
  `aten.matmul(x, W)` — GPT-2's `Conv1D`. Their WeightUse has `transposed=True`; the
  later passes view such a weight as W.T, its true (out, in) matrix.

A GraphModule may hold nested GraphModules (the `auto` frontend's per-submodule
fallback); `weight_uses` walks into them, and every name it returns (weight_target,
bias_target, module_name, owner) is qualified from the root, so
`root.get_parameter(use.weight_target)` always works.
"""
from __future__ import annotations

from dataclasses import dataclass
import re
from typing import Iterator, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from planc.mask import BlockMask
import sys

aten = torch.ops.aten

LINEAR_FUNCTIONS = (F.linear, torch._C._nn.linear, aten.linear.default)
CONV2D_FUNCTIONS = (F.conv2d, torch.conv2d, aten.conv2d.default, aten.conv2d.padding)
# aten.t / a [1, 0] permute / transpose(0, 1) of the weight feed addmm and mm.
_TRANSPOSES = (aten.t.default, aten.permute.default, aten.transpose.int, aten.numpy_T.default)


@dataclass(frozen=True)
class WeightUse:
    """One node applying a weight parameter. `weight_node` is the get_attr node the
    weight enters the graph by (None for call_module), `weight_user` the node that reads
    it (the op itself, or the transpose feeding addmm/mm): a mask goes on that edge."""

    node: fx.Node
    op: str                                   # 'linear' | 'conv2d'
    weight_target: str                        # dotted parameter path from the root
    bias_target: Optional[str]
    module_name: str                          # qualified name of the applying module
    module_type: str                          # its class name ('Linear', 'Conv2d', ...)
    module_mro: Tuple[str, ...] = ()          # class names of its bases, when known
    weight_node: Optional[fx.Node] = None
    weight_user: Optional[fx.Node] = None
    owner: str = ""                           # qualified name of the GraphModule holding node
    stride: Tuple[int, ...] = ()
    padding: object = ()                      # a tuple of ints, or 'same' / 'valid'
    dilation: Tuple[int, ...] = ()
    groups: int = 1
    mask_node: Optional[fx.Node] = None       # the BlockMask call between weight and op, once inserted
    transposed: bool = False                  # weight stored (in, out), applied as x @ W (Conv1D-style)

    @property
    def input(self):
        """The value the layer multiplies by its weight: the first argument, or the
        second of addmm(bias, x, W)."""
        node = self.node
        if node.op == "call_function" and node.target is aten.addmm.default:
            return node.args[1]
        return node.args[0] if node.args else node.kwargs.get("input")

    @property
    def is_call_module(self) -> bool:
        return self.node.op == "call_module"


def graph_modules(gm: fx.GraphModule, prefix: str = "") -> Iterator[Tuple[str, fx.GraphModule]]:
    """(qualified name, GraphModule) for gm and every GraphModule nested in it, outer first."""
    yield prefix, gm
    for name, sub in gm.named_modules():
        if name and isinstance(sub, fx.GraphModule):
            # named_modules already recurses: only take the outermost nested ones here and
            # let the recursion handle deeper ones, so each graph is visited once.
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            if not any(isinstance(gm.get_submodule(p), fx.GraphModule) for p in _ancestors(parent)):
                yield from graph_modules(sub, _join(prefix, name))


def weight_uses(gm: fx.GraphModule) -> List[WeightUse]:
    """Every node in gm (and nested GraphModules) that applies a weight parameter as a
    linear map or a 2-D convolution, in graph order (outer graph first)."""
    uses: List[WeightUse] = []
    for owner, g in graph_modules(gm):
        for node in g.graph.nodes:
            use = _classify(g, owner, node)
            if use is not None:
                uses.append(use)
    return uses


# ---- classification ---------------------------------------------------------------

def _classify(g: fx.GraphModule, owner: str, node: fx.Node) -> Optional[WeightUse]:
    if node.op == "call_module":
        return _from_module(g, owner, node)
    if node.op != "call_function":
        return None
    target = node.target
    if target in LINEAR_FUNCTIONS:
        return _from_function(g, owner, node, "linear", _arg(node, 1, "weight"), _arg(node, 2, "bias"))
    if target in CONV2D_FUNCTIONS:
        return _from_function(g, owner, node, "conv2d", _arg(node, 1, "weight"), _arg(node, 2, "bias"),
                              conv=_conv_args(node, transposed_layout=False))
    if target is aten.convolution.default:
        if _arg(node, 6, "transposed"):
            return None   # a transposed conv's weight is (in, out, ...): not a block-prunable map here
        return _from_function(g, owner, node, "conv2d", _arg(node, 1, "weight"), _arg(node, 2, "bias"),
                              conv=_conv_args(node, transposed_layout=True))
    if target is aten.addmm.default:
        return _from_matmul(g, owner, node, bias=_arg(node, 0, "self"), right=_arg(node, 2, "mat2"))
    if target is aten.mm.default:
        return _from_matmul(g, owner, node, bias=None, right=_arg(node, 1, "mat2"))
    if target is aten.matmul.default:
        return _from_matmul(g, owner, node, bias=None, right=_arg(node, 1, "other"))
    return None


def _from_module(g, owner, node) -> Optional[WeightUse]:
    mod = g.get_submodule(node.target)
    if not isinstance(mod, (nn.Linear, nn.Conv2d)):
        return None
    weight = mod._parameters.get("weight")    # a parametrized module has no plain weight
    if not isinstance(weight, nn.Parameter) or isinstance(weight, nn.parameter.UninitializedParameter):
        return None
    name = _join(owner, node.target)
    bias = _join(name, "bias") if mod._parameters.get("bias") is not None else None
    common = dict(node=node, weight_target=_join(name, "weight"), bias_target=bias, module_name=name,
                  module_type=type(mod).__name__, module_mro=_mro(type(mod)), owner=owner)
    if isinstance(mod, nn.Linear):
        return WeightUse(op="linear", **common)
    if weight.dim() != 4:
        return None
    return WeightUse(op="conv2d", stride=tuple(mod.stride), padding=_norm_padding(mod.padding),
                     dilation=tuple(mod.dilation), groups=int(mod.groups), **common)


def _from_function(g, owner, node, op, weight, bias, conv=None) -> Optional[WeightUse]:
    user, (weight, mask) = node, _unmask(g, weight)
    user = mask if mask is not None else node
    w = _param_target(g, weight)
    if w is None:
        return None
    param = g.get_parameter(w)
    if (op == "linear" and param.dim() != 2) or (op == "conv2d" and param.dim() != 4):
        return None
    b = _param_target(g, bias)
    module_name, module_type, mro = _module_of(g, owner, node, w)
    extra = conv or {}
    return WeightUse(node=node, op=op, weight_target=_join(owner, w), bias_target=_join(owner, b) if b else None,
                     module_name=module_name, module_type=module_type, module_mro=mro,
                     weight_node=weight, weight_user=user, owner=owner, mask_node=mask, **extra)


def _from_matmul(g, owner, node, bias, right) -> Optional[WeightUse]:
    """x @ right (+ b), where `right` is W.T of an (out, in) parameter (a linear map), or
    the parameter itself, stored (in, out) (a transposed, Conv1D-style linear map)."""
    transposed = not _is_transpose(right)
    weight, mask = _unmask(g, right if transposed else right.args[0])
    w = _param_target(g, weight)
    if w is None or g.get_parameter(w).dim() != 2:
        return None
    b = _param_target(g, bias)
    module_name, module_type, mro = _module_of(g, owner, node, w)
    user = mask if mask is not None else (node if transposed else right)
    return WeightUse(node=node, op="linear", weight_target=_join(owner, w), bias_target=_join(owner, b) if b else None,
                     module_name=module_name, module_type=module_type, module_mro=mro,
                     weight_node=weight, weight_user=user, owner=owner, mask_node=mask, transposed=transposed)


def _is_transpose(value) -> bool:
    """Whether `value` is a node swapping the two dimensions of a 2-D tensor."""
    if not isinstance(value, fx.Node) or value.op != "call_function" or value.target not in _TRANSPOSES:
        return False
    if value.target is aten.permute.default:
        return list(value.args[1]) == [1, 0]
    if value.target is aten.transpose.int:
        return sorted(int(d) % 2 for d in value.args[1:3]) == [0, 1]
    return True


# ---- helpers --------------------------------------------------------------------------

def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _unmask(g: fx.GraphModule, value):
    """(weight node, BlockMask call node or None): sees through an inserted mask."""
    if isinstance(value, fx.Node) and value.op == "call_module" and value.args:
        try:
            mod = g.get_submodule(value.target)
        except AttributeError:
            return value, None
        if isinstance(mod, BlockMask):
            return value.args[0], value
    return value, None


def _param_target(g: fx.GraphModule, value) -> Optional[str]:
    """The attribute path of a get_attr node that names a Parameter of g, else None."""
    if not isinstance(value, fx.Node) or value.op != "get_attr":
        return None
    try:
        obj = g.get_parameter(value.target)
    except AttributeError:
        return None
    return value.target if isinstance(obj, nn.Parameter) else None


def _conv_args(node: fx.Node, transposed_layout: bool) -> dict:
    def pair(v, default):
        v = default if v is None else v
        return tuple(int(x) for x in v) if isinstance(v, (list, tuple)) else (int(v), int(v))

    padding = _arg(node, 4, "padding", 0)
    groups = _arg(node, 8 if transposed_layout else 6, "groups", 1)
    return dict(stride=pair(_arg(node, 3, "stride", 1), 1), padding=_norm_padding(padding),
                dilation=pair(_arg(node, 5, "dilation", 1), 1), groups=int(groups))


def _norm_padding(p):
    if isinstance(p, str):
        return p
    if isinstance(p, (list, tuple)):
        return tuple(int(x) for x in p) if len(p) != 1 else (int(p[0]), int(p[0]))
    return (int(p), int(p))


_STRICT_PREFIX = re.compile(r"^L\['self'\]\.?")


def module_path(owner: str, node: fx.Node) -> str:
    """Qualified name of the innermost module that ran `node`, from nn_module_stack
    (export and symbolic_trace record it); `owner` when the node has none."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return owner
    return _join(owner, _STRICT_PREFIX.sub("", str(list(stack.values())[-1][0]))) or ""


def _module_of(g: fx.GraphModule, owner: str, node: fx.Node, weight_target: str) -> Tuple[str, str, Tuple[str, ...]]:
    """(qualified module name, class name, base class names) of the module that applied
    `node`: the innermost entry of nn_module_stack (export and symbolic_trace record it),
    else the module owning the weight."""
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        qualname, typ = list(stack.values())[-1]
        qualname = _STRICT_PREFIX.sub("", str(qualname))
        if qualname:
            qualname = _join(owner, qualname)
            cls = typ if isinstance(typ, type) else _resolve(str(typ))
            type_name = cls.__name__ if cls is not None else str(typ).rsplit(".", 1)[-1]
            return qualname, type_name, _mro(cls) if cls is not None else ()
    parent = weight_target.rsplit(".", 1)[0] if "." in weight_target else ""
    try:
        mod = g.get_submodule(parent)
    except AttributeError:
        return _join(owner, parent) or "", "", ()
    # a traced root's class is named after the model (GraphModule(class_name=...))
    return _join(owner, parent) or "", type(mod).__name__, _mro(type(mod))


def _resolve(path: str):
    """The class a dotted path names, if it is importable (never imports new modules)."""
    module, _, name = path.rpartition(".")
    obj = sys.modules.get(module)
    return getattr(obj, name, None) if obj is not None else None


def _mro(cls) -> Tuple[str, ...]:
    return tuple(c.__name__ for c in cls.__mro__ if c not in (object, nn.Module))


def _ancestors(path: str) -> List[str]:
    if not path:
        return []
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _join(prefix: str, name: Optional[str]) -> Optional[str]:
    if name is None:
        return None
    return f"{prefix}.{name}" if prefix and name else (prefix or name)
