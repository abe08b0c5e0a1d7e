"""A model as data: a program of registered operators over named tensors.

`program(module, example_inputs)` exports a module with torch.export (eval mode, batch
and sequence dimensions free) and keeps its unlifted graph: placeholders, `get_attr` of
parameters and buffers, calls of registered operators (aten, prims and planc's own
`planc.bsr_linear`, kernels/library.py, and `planc.bsr_conv2d`, kernels/conv.py) and the
output. `to_data` turns that graph into
plain JSON plus a dict of tensors; `from_data` rebuilds a GraphModule from them.

Why not `torch.export.save`/`load`: its weights are pickles, and its loader resolves any
`torch.*` name a file gives as a call target (`torch.hub.load` is one) and parses shape
expressions with sympy's `sympify`, which evaluates Python. A run folder is data, so
`from_data` accepts only this:

- node kinds placeholder, get_attr, call_function, output;
- call targets that are operator overloads of the aten, prims or planc namespaces, or
  one of a fixed table of Python functions that exported graphs use for shapes
  (`operator.getitem`, `operator.add`, `torch.sym_max`, ...); nothing else is resolved;
- node names that are Python identifiers and attribute paths of identifier-like parts
  (fx generates the forward's source from them), argument values of JSON types, dtypes,
  devices, layouts and memory formats from fixed tables;
- the input and output tree structure through torch's own pytree spec format, which
  maps type names through torch's registry (no import).

What loading runs: json and safetensors parsing, the lookups above, and fx's code
generation of the forward from the checked graph. Each problem is a one-line
ArtifactError naming the node.
"""
from __future__ import annotations

import hashlib
import keyword
import math
import operator
import re
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import fx
from torch.utils import _pytree as pytree

from planc.blocks import BlockView
from planc.errors import PlancError
from planc.kernels.format import BlockSparseMatrix
from planc.passes.trace import dynamic_shapes_for
from planc.kernels import library as _library  # noqa: F401  (registers torch.ops.planc.bsr_linear)
from planc.kernels import conv as _conv  # noqa: F401  (registers torch.ops.planc.bsr_conv2d)

FORMAT = "planc.program/1"
NAMESPACES = ("aten", "prims", "planc")
NODE_OPS = ("placeholder", "get_attr", "call_function", "output")
# Python functions exported graphs call on sizes; a file names them by these keys only.
PY_FUNCTIONS: Dict[str, Any] = {
    **{f"operator.{n}": getattr(operator, n) for n in (
        "getitem", "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "eq", "ne", "lt", "le",
        "gt", "ge", "and_", "or_", "not_")},
    **{f"torch.{n}": getattr(torch, n) for n in ("sym_int", "sym_float", "sym_max", "sym_min", "sym_not",
                                                  "sym_ite", "sym_sqrt", "_assert")},
    **{f"math.{n}": getattr(math, n) for n in ("ceil", "floor", "trunc", "sqrt")},
}
_PY_NAMES = {id(f): k for k, f in PY_FUNCTIONS.items()}
DTYPES = {str(t).removeprefix("torch."): t for t in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint8, torch.bool, torch.complex64, torch.complex128)}
LAYOUTS = {"strided": torch.strided, "sparse_coo": torch.sparse_coo}
MEMORY_FORMATS = {"contiguous_format": torch.contiguous_format, "channels_last": torch.channels_last,
                  "preserve_format": torch.preserve_format}
_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_PART = re.compile(r"^[A-Za-z0-9_]+$")
MAX_NODES = 1_000_000
MAX_DEPTH = 32                                  # nesting of argument lists


class ArtifactError(PlancError):
    """A program could not be saved (a graph planc cannot store as data) or loaded (a
    file that is not a valid program). The message names the node."""


# ---- making a program -----------------------------------------------------------------
def program(module: torch.nn.Module, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """`module` in eval mode, exported and unlifted: a graph of registered operators."""
    args = tuple(pytree.tree_map_only(torch.Tensor, lambda t: t.contiguous(), tuple(example_inputs)))
    was_training = module.training
    module.eval()
    try:
        ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes_for(module, args), strict=False)
    except Exception as err:
        raise ArtifactError(f"could not export the model as a program: {type(err).__name__}: "
                            f"{' '.join(str(err).split())[:300]}") from None
    finally:
        module.train(was_training)
    return ep.module()


# ---- graph -> data ----------------------------------------------------------------------
def _target_name(target: Any) -> str:
    if isinstance(target, torch._ops.OpOverload):
        ns = target.namespace
        if ns not in NAMESPACES:
            raise ArtifactError(f"operator {target} is outside the namespaces {NAMESPACES}")
        return f"{ns}.{target._schema.name.split('::', 1)[1]}.{target._overloadname}"
    name = _PY_NAMES.get(id(target))
    if name is None:
        raise ArtifactError(f"call target {getattr(target, '__qualname__', target)!r} is not a registered operator")
    return name


def _encode(value: Any, where: str) -> Any:
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, list):
        return [_encode(v, where) for v in value]
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, where) for v in value]}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    raise ArtifactError(f"node {where}: cannot store an argument of type {type(value).__name__}")


def to_data(gm: fx.GraphModule) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """(graph as JSON-able data, {attribute path: tensor}) of a program's GraphModule."""
    nodes: List[dict] = []
    tensors: Dict[str, torch.Tensor] = {}
    params: List[str] = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            continue                   # export's input-shape guard: a check, not a computation
        if node.op not in NODE_OPS:
            raise ArtifactError(f"node {node.name}: {node.op} {node.target} (a program holds only registered operators)")
        entry = {"name": node.name, "op": node.op}
        if node.op == "call_function":
            entry["target"] = _target_name(node.target)
        elif node.op == "get_attr":
            value = _attr(gm, node.target)
            if not isinstance(value, torch.Tensor):
                raise ArtifactError(f"node {node.name}: attribute {node.target} is a {type(value).__name__}, not a tensor")
            tensors[node.target] = value.detach()
            if isinstance(value, torch.nn.Parameter):
                params.append(node.target)
            entry["target"] = node.target
            entry["tensor"] = {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
        else:
            entry["target"] = node.target
        entry["args"] = _encode(list(node.args), node.name)
        entry["kwargs"] = {k: _encode(v, node.name) for k, v in node.kwargs.items()}
        nodes.append(entry)
    info = getattr(gm.graph._codegen, "pytree_info", None)
    data = {"format": FORMAT, "nodes": nodes, "parameters": params}
    if info is not None:
        data["pytree"] = {"orig_args": list(info.orig_args), "in_spec": pytree.treespec_dumps(info.in_spec),
                          "out_spec": pytree.treespec_dumps(info.out_spec)}
    return data, tensors


def _attr(gm: torch.nn.Module, path: str) -> Any:
    obj: Any = gm
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


# ---- data -> graph ------------------------------------------------------------------------
def _resolve(name: Any, where: str):
    if not isinstance(name, str):
        raise ArtifactError(f"node {where}: expected a call target name, got {type(name).__name__}")
    if name in PY_FUNCTIONS:
        return PY_FUNCTIONS[name]
    parts = name.split(".")
    if len(parts) != 3 or parts[0] not in NAMESPACES or not all(_IDENT.match(p) for p in parts):
        raise ArtifactError(f"node {where}: call target {name!r} is not an operator of {NAMESPACES}")
    try:
        op = getattr(getattr(getattr(torch.ops, parts[0]), parts[1]), parts[2])
    except (AttributeError, RuntimeError):
        raise ArtifactError(f"node {where}: no operator {name!r} in this torch") from None
    if not isinstance(op, torch._ops.OpOverload):
        raise ArtifactError(f"node {where}: {name!r} is not an operator overload")
    return op


def _decode(value: Any, env: Dict[str, fx.Node], where: str, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise ArtifactError(f"node {where}: arguments nested too deeply")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, list):
        return [_decode(v, env, where, depth + 1) for v in value]
    if isinstance(value, dict) and len(value) == 1:
        (kind, inner), = value.items()
        if kind == "node" and isinstance(inner, str) and inner in env:
            return env[inner]
        if kind == "tuple" and isinstance(inner, list):
            return tuple(_decode(v, env, where, depth + 1) for v in inner)
        if kind == "float" and inner in ("inf", "-inf", "nan"):
            return float(inner)
        table = {"dtype": DTYPES, "layout": LAYOUTS, "memory_format": MEMORY_FORMATS}.get(kind)
        if table is not None and inner in table:
            return table[inner]
        if kind == "device" and isinstance(inner, str) and re.match(r"^(cpu|cuda|meta)(:\d+)?$", inner):
            return torch.device(inner)
    raise ArtifactError(f"node {where}: unexpected argument {str(value)[:80]!r}")


_RESERVED = frozenset(dir(fx.GraphModule))      # a path may not reach the module's own attributes


def check_path(path: Any, where: str) -> str:
    """An attribute path of identifier-like parts that names only new attributes."""
    if (not isinstance(path, str) or not path
            or not all(_PART.match(p) and not p.startswith("__") and p not in _RESERVED for p in path.split("."))):
        raise ArtifactError(f"node {where}: expected an attribute path, got {str(path)[:80]!r}")
    return path


def from_data(data: Any, tensors: Dict[str, torch.Tensor]) -> fx.GraphModule:
    """The GraphModule of to_data's output, after checking every node (module doc)."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ArtifactError(f"expected a program of format {FORMAT!r}")
    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list) or not 0 < len(raw_nodes) <= MAX_NODES:
        raise ArtifactError("expected a non-empty list of nodes")
    graph = fx.Graph()
    env: Dict[str, fx.Node] = {}
    attrs: Dict[str, torch.Tensor] = {}
    params = data.get("parameters") or []
    if not isinstance(params, list):
        raise ArtifactError("expected parameters as a list of attribute paths")
    for i, raw in enumerate(raw_nodes):
        node = _node(graph, raw, i, env, tensors, attrs)
        env[node.name] = node
    root: Dict[str, Any] = {k: (torch.nn.Parameter(v, requires_grad=False) if k in params else v)
                            for k, v in attrs.items()}
    _set_codegen(graph, data.get("pytree"))
    try:
        graph.lint()
        gm = fx.GraphModule(root, graph)
    except ArtifactError:
        raise
    except Exception as err:
        raise ArtifactError(f"not a valid program graph ({type(err).__name__}: {' '.join(str(err).split())[:200]})") from None
    return gm


def _node(graph: fx.Graph, raw: Any, i: int, env, tensors, attrs) -> fx.Node:
    if not isinstance(raw, dict):
        raise ArtifactError(f"node #{i}: expected a record")
    name, op = raw.get("name"), raw.get("op")
    where = f"#{i}"
    if not isinstance(name, str) or not _IDENT.match(name) or keyword.iskeyword(name) or name in env:
        raise ArtifactError(f"node {where}: expected a new identifier as its name, got {str(name)[:80]!r}")
    where = name
    if op not in NODE_OPS:
        raise ArtifactError(f"node {where}: unexpected node kind {str(op)[:40]!r}")
    args = _decode(raw.get("args", []), env, where)
    kwargs = raw.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict) or not all(
            isinstance(k, str) and _IDENT.match(k) for k in kwargs):
        raise ArtifactError(f"node {where}: expected args as a list and kwargs by identifier")
    kwargs = {k: _decode(v, env, where) for k, v in kwargs.items()}
    target = raw.get("target")
    if op == "call_function":
        target = _resolve(target, where)
    elif op == "get_attr":
        target = check_path(target, where)
        tensor = tensors.get(target)
        if not isinstance(tensor, torch.Tensor):
            raise ArtifactError(f"node {where}: no tensor {target!r} in the program's tensors")
        expected = raw.get("tensor")
        if (not isinstance(expected, dict) or expected.get("shape") != list(tensor.shape)
                or DTYPES.get(expected.get("dtype")) != tensor.dtype):
            raise ArtifactError(f"node {where}: tensor {target!r} is {str(tensor.dtype).removeprefix('torch.')} "
                                f"{list(tensor.shape)}, expected {str(expected)[:80]}")
        attrs[target] = tensor
    elif op == "placeholder":
        if not isinstance(target, str) or not _IDENT.match(target):
            raise ArtifactError(f"node {where}: expected an identifier as the input's name")
    else:
        target = "output"
    return graph.create_node(op, target, tuple(args), kwargs, name=name)


def _set_codegen(graph: fx.Graph, info: Any) -> None:
    if info is None:
        return
    try:
        orig = info["orig_args"]
        if not isinstance(orig, list) or not all(isinstance(a, str) and _IDENT.match(a) for a in orig):
            raise ValueError("orig_args")
        in_spec, out_spec = pytree.treespec_loads(info["in_spec"]), pytree.treespec_loads(info["out_spec"])
    except ArtifactError:
        raise
    except Exception as err:
        raise ArtifactError(f"unreadable input/output structure ({type(err).__name__})") from None
    graph._codegen = fx.graph._PyTreeCodeGen(fx.graph._PyTreeInfo(orig, in_spec, out_spec))


# ---- tensors as stored: deduplicated, pruned weights as kept blocks -----------------------
STORE_FORMAT = "planc.tensors/1"


def pack(named: Dict[str, torch.Tensor], views: Dict[str, BlockView]) -> Tuple[Dict[str, torch.Tensor], dict]:
    """(tensors to write, entries). Each name's entry points at stored tensors: `dense`,
    or, for names in `views` (pruned weights), `bsc`: the kept blocks of the weight's
    block view grouped by block-column (values, column pointers, block-rows). Equal tensors are stored once (a bias both programs
    read, a lowered layer's values and the same weight's kept blocks)."""
    stored: Dict[str, torch.Tensor] = {}
    by_content: Dict[Tuple, str] = {}

    def put(t: torch.Tensor) -> str:
        t = t.detach().cpu().contiguous()
        key = (t.dtype, tuple(t.shape), hashlib.sha256(t.view(-1).view(torch.uint8).numpy().tobytes()
                                                       if t.numel() else b"").hexdigest())
        if key not in by_content:
            by_content[key] = f"t{len(stored)}"
            stored[by_content[key]] = t
        return by_content[key]

    entries: Dict[str, dict] = {}
    for name, tensor in named.items():
        view = views.get(name)
        if view is not None and tuple(tensor.shape) == tuple(view.weight_shape):
            # kept blocks grouped by block-column, with int32 column pointers and block-rows:
            # byte for byte what a layer lowered for the CPU holds, so both are stored once
            m = BlockSparseMatrix.from_weight(tensor.detach(), view.block, view=view)
            entries[name] = {"bsc": {"values": put(m.grouped_by_column()), "ccol": put(m.tcrow), "row": put(m.trow)},
                             "view": view_record(view)}
        else:
            entries[name] = {"dense": put(tensor)}
    return stored, {"format": STORE_FORMAT, "entries": entries}


def view_record(view) -> dict:
    return {"weight_shape": list(view.weight_shape), "block": list(view.block),
            "transposed": bool(view.transposed)}


def unpack(stored: Dict[str, torch.Tensor], meta: Any, names: Sequence[str] = None) -> Dict[str, torch.Tensor]:
    """The named tensors of `pack`'s output (all, or those in `names`); pruned weights
    are rebuilt dense from their kept blocks. ArtifactError for anything inconsistent."""
    if not isinstance(meta, dict) or meta.get("format") != STORE_FORMAT or not isinstance(meta.get("entries"), dict):
        raise ArtifactError(f"expected tensors of format {STORE_FORMAT!r}")
    entries = meta["entries"]
    out: Dict[str, torch.Tensor] = {}
    dense_cache: Dict[Tuple, torch.Tensor] = {}
    for name in (entries if names is None else names):
        entry = entries.get(name)
        if not isinstance(entry, dict):
            raise ArtifactError(f"tensor {str(name)[:80]!r}: no entry")
        if "dense" in entry:
            out[name] = _stored(stored, entry["dense"], name)
            continue
        parts, record = entry.get("bsc"), entry.get("view")
        if not isinstance(parts, dict) or not isinstance(record, dict):
            raise ArtifactError(f"tensor {name!r}: expected a dense or a bsc entry")
        key = (parts.get("values"), parts.get("ccol"), parts.get("row"), str(record))
        if key not in dense_cache:
            dense_cache[key] = _from_bsc(stored, parts, record, name)
        out[name] = dense_cache[key]
    return out


def _stored(stored: Dict[str, torch.Tensor], key: Any, name: str) -> torch.Tensor:
    if not isinstance(key, str) or key not in stored:
        raise ArtifactError(f"tensor {name!r}: refers to {str(key)[:40]!r}, which is not stored")
    return stored[key]


def _from_bsc(stored, parts: dict, record: dict, name: str) -> torch.Tensor:
    values, ccol, row = (_stored(stored, parts.get(k), name) for k in ("values", "ccol", "row"))
    try:
        if not isinstance(record.get("transposed", False), bool):
            raise ValueError("transposed must be true or false")
        view = BlockView(tuple(int(v) for v in record["weight_shape"]), tuple(int(v) for v in record["block"]),
                         record.get("transposed", False))
        (gr, gc), nnz = view.grid, int(values.shape[0]) if values.dim() == 3 else -1
        ok = (tuple(values.shape[1:]) == view.block and ccol.dtype == row.dtype == torch.int32
              and tuple(ccol.shape) == (gc + 1,) and tuple(row.shape) == (nnz,) and int(ccol[0]) == 0
              and int(ccol[-1]) == nnz and bool((ccol[1:] >= ccol[:-1]).all())
              and (nnz == 0 or (int(row.min()) >= 0 and int(row.max()) < gr)))
        if not ok:
            raise ValueError("indices do not describe the block grid")
        cols = torch.repeat_interleave(torch.arange(gc), (ccol[1:] - ccol[:-1]).long())
        blocks = values.new_zeros(gr, gc, *view.block)
        blocks[row.long(), cols] = values
        return view.from_blocks(blocks)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise ArtifactError(f"tensor {name!r}: invalid kept blocks ({' '.join(str(err).split())[:120]})") from None


def held_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct storages behind a module's parameters and buffers (what a
    loaded or lowered model really holds; shared tensors counted once)."""
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


def run_anywhere(gm: fx.GraphModule) -> fx.GraphModule:
    """Let every planc.bsr_linear call pick its kernel by its input's device ("auto"): a
    program lowered for one device loads and runs on another. (planc.bsr_conv2d names no
    backend: it takes the implicit GEMM on a CPU input and bsr_linear's "auto" elsewhere.)"""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is torch.ops.planc.bsr_linear.default:
            args = list(node.args)
            args[11] = "auto"
            node.args = tuple(args)
    gm.recompile()
    return gm
