"""The lower pass: rewrite baked pruned Linear/Conv2d layers to block-sparse kernels.

For every node that applies a weight (planc.passes.nodes.weight_uses: call_module
Linear/Conv2d from symbolic_trace, aten.linear/aten.conv2d/addmm/mm on get_attr weights
from torch.export), the pass builds a BlockSparseMatrix of the weight's nonzero blocks
(through the block view; a transposed, Conv1D-style weight stored (in, out) is
given to the kernels as its true (out, in) matrix, so its blocks are the ones its mask
pruned), asks kernels/cost.py whether the block-sparse op beats dense
for that shape, block, density and backend, and if the predicted speedup reaches
`min_speedup` swaps the layer for a BlockSparseLinear / BlockSparseConv2d module. Every
weight node gets node.meta[planc.meta.LOWERED]: what was done and why; `report(gm)`
collects them as a table.

With `measure=True` a layer the prediction would lower is also timed, lowered against
dense on random inputs of its shape (a linear layer: tokens × in-features; a Conv2d: the
input shape the graph records, else a square image of that many output positions;
interleaved medians), and stays dense when the measurement misses `min_speedup`: the
cost model's constants come from one machine, and at small sizes fixed per-call costs it
does not see decide (a 512×64 layer at 64 tokens was predicted 2.0× and ran 0.45×).
`planc apply` measures. A layer's timing is kept per machine and reused
(planc.timing_cache).

The block of a layer comes from what earlier passes recorded (node.meta[BAKED].block,
node.meta[TARGET].block), else from `blocks=` (one (r, c) or a dict by layer name), else
it is inferred from the zeros: the candidate block with the best predicted speedup among
those whose all-zero blocks are really zero.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import fx, nn

from planc import meta as M, timing_cache
from planc.blocks import BlockView
from planc.kernels.conv import BlockSparseConv2d
from planc.kernels.cost import NATIVE_MAX_DENSITY, predict_speedup
from planc.kernels.format import BlockSparseMatrix
from planc.kernels import backends, native
from planc.kernels.ops import BlockSparseLinear
from planc.timing import interleaved

from .nodes import graph_modules, weight_uses
from .pipeline import GraphPass, PassResult, Pipeline, copy_module

Block = Tuple[int, int]
DEFAULT_TOKENS = 512
CANDIDATE_BLOCKS: Tuple[Block, ...] = ((64, 64), (32, 32), (16, 16), (8, 8), (4, 4))
REPORT_KEY = "planc.lower_report"


@dataclass(frozen=True)
class LowerConfig:
    """What the lower pass needs (lower()'s keyword arguments; see there)."""

    backend: str = "auto"
    dtype: Optional[torch.dtype] = None
    min_speedup: float = 1.0
    tokens: Optional[int] = None
    blocks: Union[None, Sequence[int], Dict[str, Sequence[int]]] = None
    measure: bool = False
    inplace: bool = False
    verbose: bool = False


def lower(gm: fx.GraphModule, backend: str = "auto", dtype: Optional[torch.dtype] = None,
          min_speedup: float = 1.0, *, tokens: Optional[int] = None,
          blocks: Union[None, Sequence[int], Dict[str, Sequence[int]]] = None,
          inplace: bool = False, verbose: bool = False, measure: bool = False) -> fx.GraphModule:
    """A copy of `gm` (unless inplace) with its pruned layers on block-sparse kernels.

    backend: "auto" (the backend of the weights' device: Triton on CUDA, the CPU path
    elsewhere), a backend of kernels/backends.py, or "dense" (lower nothing, report only). dtype: the kernels' dtype (values are
    cast; inputs are cast to it and outputs back). min_speedup: lower a layer only when
    the predicted speedup over dense reaches it (0 lowers every pruned layer). tokens:
    the row count the prediction assumes (default: from the graph's shape metadata, else
    512). measure: also time each layer (linear or conv) the prediction lowers, and keep it
    dense when it measured below min_speedup (decisions then depend on the machine's load)."""
    config = LowerConfig(backend=backend, dtype=dtype, min_speedup=min_speedup, tokens=tokens, blocks=blocks,
                         measure=measure, inplace=inplace, verbose=verbose)
    return Pipeline([LowerPass(config)]).run(gm).module


class LowerPass(GraphPass):
    """The lower pass: rewrites the baked pruned layers of a GraphModule."""

    name = "lower"

    def __init__(self, config: LowerConfig = LowerConfig()):
        if config.backend not in backends.PLAN_NAMES:
            raise ValueError(f"expected a backend in {backends.PLAN_NAMES}, got {config.backend!r}")
        self.config = config

    def run(self, gm: fx.GraphModule) -> PassResult:
        if not isinstance(gm, fx.GraphModule):
            raise TypeError("expected a torch.fx.GraphModule (pruned.bake() gives one, or planc.load(DIR, "
                            f"lowered=False)), got {type(gm).__name__}")
        c = self.config
        if not c.inplace:
            gm = copy_module(gm)
        rows: List[dict] = []
        for use in weight_uses(gm):
            rows.append(_lower_one(gm, use, backend=c.backend, dtype=c.dtype, min_speedup=float(c.min_speedup),
                                   tokens=c.tokens, blocks=c.blocks, measure=c.measure))
        for _, g in graph_modules(gm):
            g.graph.eliminate_dead_code()
            _settle_layouts(g)
            g.graph.lint()
            g.recompile()
        _drop_unused_params(gm, rows)
        gm.meta[REPORT_KEY] = rows
        if c.verbose:
            print(format_report(rows))
        return PassResult(gm, any(row["action"] == "lowered" for row in rows))


# ---- one layer -------------------------------------------------------------------------

def _lower_one(gm, use, *, backend, dtype, min_speedup, tokens, blocks, measure=False) -> dict:

    name = use.weight_target[:-len(".weight")] if use.weight_target.endswith(".weight") else use.weight_target
    stored = gm.get_parameter(use.weight_target)
    # the kernels take the true (out, in) matrix: a Conv1D-style weight is stored (in, out)
    weight = stored.t() if use.transposed else stored
    row = dict(layer=name, op=use.op, shape=tuple(weight.shape), action="dense", backend="dense",
               block=None, density=1.0, predicted_speedup=None, reason="")
    node = use.node

    def keep(reason: str) -> dict:
        row["reason"] = reason
        node.meta[M.LOWERED] = M.LoweredRecord(**row)
        return row

    if use.mask_node is not None:
        return keep("the weight still flows through a BlockMask: bake before lowering")
    if use.op == "conv2d":
        why = _conv_unsupported(use, stored)
        if why:
            return keep(why)
    chosen = backends.resolve(backend, weight.device) if backend != backends.NONE else None
    block = _block_for(node, name, blocks)
    view_shape = BlockView(tuple(weight.shape), (1, 1)).matrix_shape
    n_tokens = int(tokens) if tokens else _tokens_of(node, use.op) or DEFAULT_TOKENS
    kdtype = dtype or weight.dtype
    cost_backend = chosen.cost if chosen is not None else backends.resolve(backends.AUTO, weight.device).cost
    if block is None:
        block = _infer_block(weight, n_tokens, kdtype, cost_backend)
        if block is None:
            return keep("no all-zero blocks at any candidate block size")
    bsm = BlockSparseMatrix.from_weight(weight, block, dtype=kdtype)
    row.update(block=tuple(block), density=round(bsm.density, 4))
    if bsm.density >= 1.0:
        return keep(f"no pruned blocks at block {tuple(block)}")
    speedup = predict_speedup(n_tokens, view_shape, block, bsm.density, kdtype, cost_backend)
    row["predicted_speedup"] = round(speedup, 2)
    if chosen is None:
        return keep(f"backend {backends.NONE!r} requested")
    why = chosen.unavailable(weight.device)
    if why:
        return keep(why)
    if speedup < min_speedup:
        return keep(f"predicted {speedup:.2f}x < min_speedup {min_speedup:g} at {n_tokens} tokens")

    bias = gm.get_parameter(use.bias_target) if use.bias_target else None
    if bias is not None and dtype is not None:
        bias = bias.to(dtype)
    module = _make_module(use, weight, bsm, bias, chosen)
    reason = f"predicted {speedup:.2f}x >= min_speedup {min_speedup:g} at {n_tokens} tokens"
    if measure:
        input_shape = _input_shape(node) if use.op == "conv2d" else None
        layer = dict(op=use.op, shape=tuple(weight.shape), block=tuple(block), density=round(bsm.density, 4),
                     tokens=n_tokens, input=input_shape, dtype=kdtype, backend=chosen.name,
                     stride=use.stride, padding=use.padding, dilation=use.dilation)
        measured, cached_on = timing_cache.ratio(layer, lambda: (
            _measure_linear(module, weight, bias, n_tokens) if use.op == "linear"
            else _measure_conv(module, use, weight, bias, input_shape, n_tokens)))
        row["measured_speedup"] = round(measured, 2)
        how = f"predicted {speedup:.2f}x" + (f"; timed on this machine {cached_on}, cached" if cached_on else "")
        if measured < min_speedup:
            return keep(f"measured {measured:.2f}x < min_speedup {min_speedup:g} at {n_tokens} tokens ({how})")
        reason = f"measured {measured:.2f}x >= min_speedup {min_speedup:g} at {n_tokens} tokens ({how})"
    new_node = _replace(gm, use, module)
    row.update(action="lowered", backend=chosen.name, reason=reason)
    new_node.meta[M.LOWERED] = M.LoweredRecord(**row)   # the node kept (call_module) or its replacement
    return row


def _measure_linear(module: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor], tokens: int,
                    repeats: int = 9) -> float:
    """Dense time / lowered time of one linear layer on random (tokens, in) inputs."""

    x = torch.randn(tokens, weight.shape[1], dtype=weight.dtype, device=weight.device,
                    generator=torch.Generator(device=weight.device).manual_seed(0))
    sync = torch.cuda.synchronize if weight.is_cuda else (lambda: None)
    with torch.inference_mode():
        t = interleaved({"dense": lambda: F.linear(x, weight, bias), "lowered": lambda: module(x)},
                               repeats, sync)
    return t["dense"] / t["lowered"]


def _measure_conv(module: nn.Module, use, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  input_shape: Optional[Tuple[int, ...]], tokens: int, repeats: int = 9) -> float:
    """Dense time / lowered time of one Conv2d on a random input of the shape the graph
    records for it (else a square image giving `tokens` output positions, batch 1)."""
    cin = weight.shape[1]
    if input_shape is None or len(input_shape) != 4 or input_shape[1] != cin:
        side = max(weight.shape[2], weight.shape[3], int(round(tokens ** 0.5)))
        input_shape = (1, cin, side, side)
    x = torch.randn(input_shape, dtype=weight.dtype, device=weight.device,
                    generator=torch.Generator(device=weight.device).manual_seed(0))
    stride, dilation = use.stride or (1, 1), use.dilation or (1, 1)
    padding = _conv_padding(use, weight)
    sync = torch.cuda.synchronize if weight.is_cuda else (lambda: None)
    with torch.inference_mode():
        t = interleaved({"dense": lambda: F.conv2d(x, weight, bias, stride, padding, dilation),
                         "lowered": lambda: module(x)}, repeats, sync)
    return t["dense"] / t["lowered"]


def _input_shape(node: fx.Node) -> Optional[Tuple[int, ...]]:
    """The static shape the graph records for a layer's input, if any."""
    src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    return _static_shape(src) if src is not None else None


def _conv_unsupported(use, weight) -> str:
    if use.groups != 1:
        return f"grouped convolution (groups={use.groups}) is left dense"
    if _conv_padding(use, weight) is None:
        return f"padding {use.padding!r} (asymmetric or unknown) is left dense"
    return ""


def _conv_padding(use, weight) -> Optional[Tuple[int, int]]:
    if not isinstance(use.padding, str):
        return tuple(use.padding)
    if use.padding != "same":
        return None if use.padding != "valid" else (0, 0)
    if use.padding == "valid":
        return (0, 0)
    kh, kw = weight.shape[2:]
    dh, dw = use.dilation or (1, 1)
    tot_h, tot_w = dh * (kh - 1), dw * (kw - 1)
    if tot_h % 2 or tot_w % 2:
        return None   # asymmetric 'same' padding
    return (tot_h // 2, tot_w // 2)


def _make_module(use, weight, bsm, bias, backend: backends.Backend):
    # the kept blocks stored in the order the backend's forward reads them (once, no gather per call)
    order = backend.values_order
    if use.op == "linear":
        return _DtypeAdapter(BlockSparseLinear(bsm, bias, backend=backend.name, order=order))
    padding = _conv_padding(use, weight)
    return _DtypeAdapter(BlockSparseConv2d(bsm, bias, in_channels=weight.shape[1], kernel_size=tuple(weight.shape[2:]),
                                           stride=use.stride or 1, padding=padding, dilation=use.dilation or 1,
                                           backend=backend.name, order=order))


class _DtypeAdapter(nn.Module):
    """Casts the input to the kernel's dtype and the output back, so lowering with
    `dtype=` leaves the rest of the graph as it was."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lin = self.inner.linear if hasattr(self.inner, "linear") else self.inner
        kd = lin.values.dtype
        if x.dtype == kd:
            return self.inner(x)
        return self.inner(x.to(kd)).to(x.dtype)


def _replace(gm: fx.GraphModule, use, module: nn.Module) -> fx.Node:
    g = gm.get_submodule(use.owner) if use.owner else gm
    node = use.node
    if node.op == "call_module":
        parent_name, _, leaf = node.target.rpartition(".")
        setattr(g.get_submodule(parent_name) if parent_name else g, leaf, module)
        return node
    # a function node: add the module and call it on the node's input
    base = "lowered_" + use.weight_target.replace(".", "_")
    name, i = base, 0
    while hasattr(g, name):
        i += 1
        name = f"{base}_{i}"
    g.add_submodule(name, module)
    x = use.input
    with g.graph.inserting_before(node):
        new = g.graph.call_module(name, (x,))
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    g.graph.erase_node(node)
    return new


# Ops that keep their input's layout and change nothing else about it: a lowered layer's
# transposed output may pass through them on its way to the next lowered layer.
_LAYOUT_KEEPING = {
    torch.ops.aten.gelu.default, torch.ops.aten.relu.default, torch.ops.aten.silu.default,
    torch.ops.aten.tanh.default, torch.ops.aten.sigmoid.default, torch.ops.aten.dropout.default,
    F.gelu, F.relu, F.silu, torch.relu, torch.tanh, torch.sigmoid, F.dropout,
}
_LAYOUT_KEEPING_MODULES = (nn.GELU, nn.ReLU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity)


def _lowered_linear(g: fx.GraphModule, node: fx.Node) -> Optional[BlockSparseLinear]:
    if node.op != "call_module":
        return None
    module = g.get_submodule(node.target)
    inner = getattr(module, "inner", module)
    return inner if isinstance(inner, BlockSparseLinear) else None


def _settle_layouts(g: fx.GraphModule) -> None:
    """A lowered linear layer whose backend returns Yᵀ's transposed view keeps that layout
    only when every use of its output reaches other lowered linear layers (through
    layout-keeping elementwise ops); otherwise it returns a contiguous Y. On that layout
    scaled-dot-product attention left its fused kernel for the math path (5× slower a call
    in the MiniLM) and the residual adds and layer norms copied. Where the native CPU
    kernel computes the layer, every output is contiguous: it reads and writes Y
    row-major at full speed, and a token-minor X strides its reads by a whole row."""
    for node in g.graph.nodes:
        lin = _lowered_linear(g, node)
        if lin is None:
            continue
        backend = backends.resolve(lin.backend, lin.values.device)
        grid = (-(-lin.shape[0] // lin.block[0])) * (-(-lin.shape[1] // lin.block[1]))
        row_major = (lin.values.shape[0] <= NATIVE_MAX_DENSITY * grid
                     and native.supports(lin.block[0], lin.values.dtype, lin.values.device))
        lin.contiguous_output = backend.transposed_output and (row_major or not _feeds_only_lowered(g, node))


def _feeds_only_lowered(g: fx.GraphModule, node: fx.Node) -> bool:
    todo, seen = list(node.users), set()
    while todo:
        user = todo.pop()
        if user in seen:
            continue
        seen.add(user)
        if _lowered_linear(g, user) is not None:
            continue
        tensor_args = [a for a in user.args if isinstance(a, fx.Node)]
        keeps = (user.op == "call_function" and user.target in _LAYOUT_KEEPING
                 or user.op == "call_module" and isinstance(g.get_submodule(user.target), _LAYOUT_KEEPING_MODULES))
        if keeps and len(tensor_args) == 1:
            todo.extend(user.users)
            continue
        return False
    return bool(seen)


def _drop_unused_params(gm: fx.GraphModule, rows: List[dict]) -> None:
    """Delete the dense weights (and biases) of lowered layers that no graph reads any
    more: the lowered module holds the kept blocks, and a dense copy left behind would
    make the lowered model bigger than the baked one. The owner may be a GraphModule or
    a plain module (torch.export's unlifted modules keep their parameters in those)."""
    used = set()
    for owner, g in graph_modules(gm):
        for n in g.graph.nodes:
            if n.op == "get_attr":
                used.add(f"{owner}.{n.target}" if owner else n.target)
    for row in rows:
        if row["action"] != "lowered":
            continue
        for suffix in (".weight", ".bias"):
            target = row["layer"] + suffix
            if target in used:
                continue
            parent_name, _, leaf = target.rpartition(".")
            try:
                parent = gm.get_submodule(parent_name) if parent_name else gm
            except AttributeError:
                continue
            parent._parameters.pop(leaf, None)
            parent._buffers.pop(leaf, None)


# ---- facts about a node ----------------------------------------------------------------

def _block_for(node, name: str, blocks) -> Optional[Block]:
    baked = node.meta.get(M.BAKED)
    if isinstance(baked, M.BakedRecord):
        return tuple(baked.block)
    target = node.meta.get(M.TARGET)
    if target is not None and getattr(target, "block", None) and getattr(target, "skip_reason", None) is None:
        return tuple(int(b) for b in target.block)
    if isinstance(blocks, dict):
        b = blocks.get(name)
        return tuple(int(v) for v in b) if b else None
    if blocks is not None:
        return tuple(int(v) for v in blocks)
    return None


def _infer_block(weight, tokens, dtype, backend) -> Optional[Block]:
    """The candidate block whose real zero blocks give the best predicted speedup."""

    view = BlockView(tuple(weight.shape), (1, 1))
    best, best_s = None, 0.0
    for block in CANDIDATE_BLOCKS:
        v = BlockView(tuple(weight.shape), block)
        density = float(v.block_norms(weight.detach()).ne(0).float().mean())
        if density >= 1.0:
            continue
        s = predict_speedup(tokens, view.matrix_shape, block, density, dtype, backend)
        if s > best_s:
            best, best_s = block, s
    return best


def _static_shape(node) -> Optional[Tuple[int, ...]]:
    """A node's output shape in numbers: from `tensor_meta` (shape propagation on real
    inputs, planc.lowering) when it is there, else from export's `val` when its sizes
    are not symbolic; None otherwise."""
    for shape in (getattr(node.meta.get("tensor_meta"), "shape", None), getattr(node.meta.get("val"), "shape", None)):
        if shape is None:
            continue
        try:
            return tuple(int(d) for d in shape)
        except (TypeError, ValueError):   # symbolic sizes
            continue
    return None


def _tokens_of(node, op: str) -> Optional[int]:
    dims = _static_shape(node)
    if dims is None:
        return None
    if op == "conv2d" and len(dims) == 4:
        return dims[0] * dims[2] * dims[3]
    n = 1
    for d in dims[:-1]:
        n *= d
    return n


# ---- the report --------------------------------------------------------------------------

def report(gm: fx.GraphModule) -> List[dict]:
    """The per-layer rows of the last lowering of gm."""
    return list(gm.meta.get(REPORT_KEY, []))


def format_report(rows: List[dict]) -> str:
    head = f"{'layer':<28} {'op':<7} {'block':<9} {'density':>7} {'pred':>6}  {'action':<8} {'backend':<7} reason"
    lines = [head, "-" * len(head)]
    for r in rows:
        blk = "x".join(str(b) for b in r["block"]) if r["block"] else "-"
        pred = f"{r['predicted_speedup']:.2f}" if r["predicted_speedup"] is not None else "-"
        lines.append(f"{r['layer']:<28} {r['op']:<7} {blk:<9} {r['density']:>7.3f} {pred:>6}  "
                     f"{r['action']:<8} {r['backend']:<7} {r['reason']}")
    return "\n".join(lines)
