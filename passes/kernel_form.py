"""kernel_form: the graph form in which masked Linear layers run on the block-sparse
kernels, for phases whose support is fixed (planc.runtime.sparse_phases switches it).

`kernel_form(gm)` rewrites each eligible `linear(x, mask(w), b)` into

    %y = call_function[masked_linear](%x, %w, %b, %mask)    # %mask: get_attr of the BlockMask

and `dense_form(gm)` puts the original two nodes back, with their metadata: bake and
lower read only that form, and bake calls dense_form on its copy whatever it is given.
masked_linear gathers the kept blocks of W, scales them by what the mask gives them
(BlockMask.kept_values: attention A_b, PowerProp's block norm, or 1) and calls the
registered block-sparse op (planc.kernels.library) on those values. The op's backward
gives dX and the values' gradient on the support; autograd carries the latter through
the scale and the gather to W and to the logits, so every gradient equals the dense
computation's (pruned blocks get exactly zero there too), up to fp32 summation order.

Eligible: F.linear / aten.linear nodes whose weight is stored (out, in), tiled exactly
by its blocks, and not sharded (FSDP2). Convolutions and Conv1D-style linears stay dense.

Each mask carries a decision (a plain attribute, set by the switch): "kernels", "dense",
or "measure": time the dense masked product against the kernels, forward and backward,
on the first training call's real input (interleaved medians, planc.timing), and keep
the kernels only where they are at least `MARGIN` faster; rank 0's decision on every
rank (planc.distributed).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import fx, nn

from planc import distributed, meta, sharding, timing
from planc.kernels import backends, library
from planc.kernels.format import BlockSparseMatrix
from planc.mask import BlockMask

from .nodes import graph_modules

MARGIN = 1.1                # auto keeps the kernels only when at least this much faster
REPEATS = 3                 # after planc.timing's two warm-up calls: five of each, per layer timed

# per-mask decision, a plain attribute of the BlockMask (None: the switch is off)
DENSE, KERNELS, MEASURE = "dense", "kernels", "measure"
DECISION = "_planc_kernels"
MEASURED_AT = "_planc_kernels_density"     # the mask's density when it was last timed
_INDEX = "_planc_kernel_index"
_LINEARS = (F.linear, torch._C._nn.linear, torch.ops.aten.linear.default)


@dataclass(frozen=True)
class _Support:
    """The kernel index of one fixed support: values are gathered at (rows, cols), in the
    order the backend reads them."""
    alive: torch.Tensor
    index: tuple
    rows: torch.Tensor
    cols: torch.Tensor
    order: str
    backend: str


def masked_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  mask: BlockMask) -> torch.Tensor:
    """linear(x, mask(weight), bias), on the kept blocks when the mask's decision says so."""
    decision = getattr(mask, DECISION, None)
    if decision == MEASURE and torch.is_grad_enabled():
        decision = _measure(x, weight, bias, mask)
    if decision != KERNELS:
        return F.linear(x, mask(weight), bias)
    return _kernel_linear(x, weight, bias, mask)


def _kernel_linear(x, weight, bias, mask: BlockMask) -> torch.Tensor:
    support = _support(mask, weight)
    values = mask.kept_values(weight, support.rows, support.cols)
    R, C = mask.view.matrix_shape
    return library.apply(x, values, support.order, support.index, bias, (R, C), support.backend, None)


def _support(mask: BlockMask, weight: torch.Tensor) -> _Support:
    """The mask's kernel index, rebuilt only when its alive grid changed."""
    cached: Optional[_Support] = getattr(mask, _INDEX, None)
    if cached is not None and cached.alive.device == mask.alive.device and torch.equal(cached.alive, mask.alive):
        return cached
    (R, C), (r, c) = mask.view.matrix_shape, mask.view.block
    alive = mask.alive.detach().clone()
    counts = alive.sum(dim=1)
    crow = torch.zeros(alive.shape[0] + 1, dtype=torch.int64, device=alive.device)
    crow[1:] = torch.cumsum(counts, 0)
    cols = alive.nonzero(as_tuple=True)[1]
    placeholder = torch.empty((int(cols.numel()), r, c), dtype=weight.dtype, device=weight.device)  # never read
    bsm = BlockSparseMatrix.from_bsr((R, C), (r, c), placeholder, crow, cols)
    index = tuple(getattr(bsm, name) for name in library.INDEX_NAMES)
    backend = backends.resolve(backends.AUTO, weight.device)
    if backend.values_order == "col":     # grouped by block-column: what the CPU forward reads
        rows, cols = bsm.trow.long(), bsm.col.long()[bsm.tperm]
    else:
        rows, cols = bsm.row.long(), bsm.col.long()
    support = _Support(alive, index, rows, cols, backend.values_order, backend.name)
    object.__setattr__(mask, _INDEX, support)   # a plain attribute, not a buffer: never saved
    return support


def _measure(x, weight, bias, mask: BlockMask) -> str:
    """Time the dense masked product against the kernels (forward + backward) on this
    input; record and return the decision (rank 0's, on every rank)."""
    xs = x.detach()
    w = weight.detach().requires_grad_(weight.requires_grad)
    b = None if bias is None else bias.detach().requires_grad_(bias.requires_grad)
    grad = torch.ones(*x.shape[:-1], mask.view.matrix_shape[0], dtype=x.dtype, device=x.device)

    def run(fn):
        def call():
            y = fn(xs, w, b, mask)
            y.backward(grad)
        return call

    def dense(x_, w_, b_, m_):
        return F.linear(x_, m_(w_), b_)

    with _detached_logits(mask):
        ms = timing.interleaved({DENSE: run(dense), KERNELS: run(_kernel_linear)}, REPEATS)
    faster = torch.tensor([ms[KERNELS] * MARGIN <= ms[DENSE]])
    decision = KERNELS if bool(distributed.broadcast_decision(faster)[0]) else DENSE
    object.__setattr__(mask, DECISION, decision)
    object.__setattr__(mask, MEASURED_AT, mask.density)
    return decision


@contextlib.contextmanager
def _detached_logits(mask: BlockMask):
    """The mask with a detached copy of its logits for the time of a measurement: its
    backward passes must not reach the real parameter (its gradient, DDP's hooks)."""
    logits = mask.logits
    if logits is None:
        yield
        return
    mask._parameters["logits"] = nn.Parameter(logits.detach().clone())
    try:
        yield
    finally:
        mask._parameters["logits"] = logits


def eligible(mask: BlockMask, weight: torch.Tensor) -> bool:
    """Whether a layer can run on the kernels at all (see the module docstring)."""
    return mask.view.blocked(weight) is not None and not sharding.is_sharded(weight)


# ---- the graph rewrite -----------------------------------------------------------------

def _rewrite(gm: fx.GraphModule, rewrite_node: Callable[[fx.GraphModule, fx.Node], bool]) -> int:
    """Apply `rewrite_node` (True: it changed the node) to every node of gm and of its
    nested graphs; lint and recompile the graphs it changed. Returns how many it changed."""
    count = 0
    for _, g in graph_modules(gm):
        changed = sum(rewrite_node(g, node) for node in list(g.graph.nodes))
        if changed:
            g.graph.lint()
            g.recompile()
        count += changed
    return count


def kernel_form(gm: fx.GraphModule) -> int:
    """Rewrite every eligible `linear(x, mask(w), b)` of gm (and nested graphs) into
    masked_linear; returns how many nodes it rewrote. The two nodes are changed in place
    (the linear node's target, the mask call into a get_attr of the mask), so names and
    metadata survive the round trip through dense_form."""
    return _rewrite(gm, _to_kernel_form)


def dense_form(gm: fx.GraphModule) -> int:
    """Undo kernel_form: every masked_linear node back to `linear(x, mask(w), b)`, the
    same nodes with their names and metadata. Returns how many it restored."""
    return _rewrite(gm, _to_dense_form)


_ORIGINAL = "planc.dense_form"


def _to_kernel_form(g: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_function" or node.target not in _LINEARS or len(node.args) < 2:
        return False
    if set(node.kwargs) - {"bias"}:
        return False
    m = node.args[1]
    if not (isinstance(m, fx.Node) and m.op == "call_module" and isinstance(m.meta.get(meta.MASK), str)):
        return False
    if len(m.users) != 1:              # a mask output shared by several ops stays as it is
        return False
    mask, w = g.get_submodule(m.target), m.args[0]
    if not isinstance(mask, BlockMask) or not isinstance(w, fx.Node) or w.op != "get_attr":
        return False
    if not eligible(mask, g.get_parameter(w.target)):
        return False
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    # plain data only: a copied graph (copy_module) shares its nodes' meta shallowly
    node.meta[_ORIGINAL] = (node.target, len(node.args), "bias" in node.kwargs)
    m.op, m.args = "get_attr", ()      # the node now hands over the BlockMask itself
    node.target, node.args, node.kwargs = masked_linear, (node.args[0], w, bias, m), {}
    return True


def _to_dense_form(g: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "call_function" or node.target is not masked_linear:
        return False
    x, w, bias, m = node.args
    target, n_args, bias_kwarg = node.meta.pop(_ORIGINAL)
    m.op, m.args = "call_module", (w,)
    node.target, node.args = target, (x, m, bias)[:n_args]
    node.kwargs = {"bias": bias} if bias_kwarg else {}
    return True
