"""Block OBS: prune a pretrained model once, from calibration batches, and reconstruct
the weights it keeps so that every layer still computes what the dense model computed.

The paper's methods prune during training and choose blocks by a score of one weight
(its norm, its attention). On a pretrained model that has to stay close to itself that
wastes the start: a block of small norm can carry a large share of a layer's output, and
the kept weights are left as they were although the inputs they now have to explain
changed. This is the Optimal Brain Surgeon at the granularity of planc's blocks, layer
by layer as in Frantar & Alistarh's OBC and SparseGPT:

For a masked Linear layer with dense weight W (out, in), let X_s be the inputs the
*pruned* model gives the layer on the calibration tokens (the layers before it are
already pruned) and X_t the inputs the dense model gives it. The layer's new weight W'
keeps only the chosen blocks and minimises

    E(W') = ‖X_s W'ᵀ − X_t Wᵀ‖²  =  E(W*) + tr((W' − W*) H (W' − W*)ᵀ),

with H = X_sᵀX_s + λI (λ = damp · mean diag, for rank-deficient inputs), C = X_sᵀX_t and
W* = W C H⁻¹ the unconstrained optimum (the target is the dense model's output, so
each layer also corrects what the layers before it lost). The error separates over
block-rows (output rows r of one block height). Within one block-row, removing the
input block j from the current support costs, and changes the kept weights by,

    ΔE_j = tr(w_j (H⁻¹_jj)⁻¹ w_jᵀ),    w ← w − w_j (H⁻¹_jj)⁻¹ H⁻¹_j,:

(w_j the columns of block j, H⁻¹ the inverse over the current support); H⁻¹ is then
updated by the same Schur complement. Blocks are removed greedily, cheapest first,
across the whole layer until it reaches its target count: since a block-row's state
changes only when one of its own blocks goes, the layer-wide greedy equals merging
each block-row's own greedy sequence by cost, so one block-row's H⁻¹ is held at a time.
The kept weights are finally solved exactly, w_S = (H_SS⁻¹ C_S: Wᵀ)ᵀ per block-row.

Layers are handled in graph order; layers reading the same input (a query, key and
value) share one H and C. Each calibration batch runs the dense copy and the pruned
model only up to that input. Cost: about one forward pass of the calibration batches
per distinct layer input, for each model, plus O(gr · gc · in² · bc / 3) float64 flops
per layer for the greedy (the support's H⁻¹ shrinks as blocks go): seconds for
MiniLM-sized layers (1536 inputs), minutes for 4096.

`obs_prune(pruned, batches)` does this to a compiled model whose masks are still all
alive, sets each mask's support, and returns one record per layer (its blocks pruned
and the relative output error on the calibration tokens). Method `obs` in a plan runs
it from `planc apply` before the first step, on `method.calibration_batches` batches
of the training data; in your own loop call it before `attach`.
"""
from __future__ import annotations

import contextlib
import heapq
import time
from collections import OrderedDict
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch
from torch import fx, nn

from planc.distill import self_teacher
from planc.errors import PlancError

from planc.passes.nodes import WeightUse, weight_uses

PROBE = "_planc_obs_probe"


class _Reached(Exception):
    """Raised by the probe: the forward pass got as far as it needed to."""


class _Probe(nn.Module):
    """Inserted after a node: records its value and stops the forward pass there."""

    def __init__(self):
        super().__init__()
        self.value: Optional[torch.Tensor] = None

    def forward(self, x):
        self.value = x
        raise _Reached


def _owner(gm: fx.GraphModule, owner: str) -> fx.GraphModule:
    return gm.get_submodule(owner) if owner else gm


@contextlib.contextmanager
def _probed(graph_owner: fx.GraphModule, node_name: str):
    """A probe after node `node_name` of `graph_owner` while the block runs: calling the
    model that holds `graph_owner` then stops there and leaves the value in
    `probe.value`. Yields None if the graph has no such node."""
    node = next((n for n in graph_owner.graph.nodes if n.name == node_name), None)
    if node is None:
        yield None
        return
    probe = _Probe()
    graph_owner.add_submodule(PROBE, probe)
    with graph_owner.graph.inserting_after(node):
        added = graph_owner.graph.call_module(PROBE, (node,))
    graph_owner.recompile()
    try:
        yield probe
    finally:
        graph_owner.graph.erase_node(added)
        delattr(graph_owner, PROBE)
        graph_owner.recompile()


def _run_to(model: nn.Module, probe: _Probe, args: tuple) -> torch.Tensor:
    probe.value = None
    try:
        model(*args)
    except _Reached:
        pass
    if probe.value is None:
        raise PlancError("obs: the forward pass never reached a probed layer input")
    value = probe.value.detach()
    return value.reshape(-1, value.shape[-1]).double()


def _as_args(batch) -> tuple:
    return tuple(batch) if isinstance(batch, (list, tuple)) else (batch,)


def _groups(module: fx.GraphModule, layers: Dict[str, str]) -> List[Tuple[str, str, List[Tuple[str, WeightUse]]]]:
    """(owner, input node name, [(layer name, its use)] reading it) in graph order, for
    the masked layers `layers` (weight parameter path -> layer name)."""
    out: "OrderedDict[Tuple[str, str], List[Tuple[str, WeightUse]]]" = OrderedDict()
    convs = []
    for use in weight_uses(module):
        name = layers.get(use.weight_target)
        if name is None:
            continue
        if use.op != "linear":
            convs.append(name)
            continue
        x = use.input
        if not isinstance(x, fx.Node):
            raise PlancError(f"obs: the input of layer {name!r} is not a graph value")
        out.setdefault((use.owner, x.name), []).append((name, use))
    if convs:
        raise PlancError(f"method obs reconstructs Linear layers only; these targets are convolutions: "
                         f"{', '.join(convs[:4])}{' ...' if len(convs) > 4 else ''} (skip them in targets, or use another method)")
    return [(owner, node, uses) for (owner, node), uses in out.items()]


def _slices(size: int, block: int) -> List[slice]:
    return [slice(s, min(s + block, size)) for s in range(0, size, block)]


def _removal_costs(w: torch.Tensor, hinv: torch.Tensor, widths: List[int]) -> torch.Tensor:
    """ΔE of removing each kept block, whose columns are consecutive runs of `widths` in
    the compacted `w` (rows, n) and `hinv` (n, n): tr(w_j (H⁻¹_jj)⁻¹ w_jᵀ)."""
    if len(set(widths)) == 1:                          # equal blocks: one batched solve
        k, b = len(widths), widths[0]
        diag = hinv.reshape(k, b, k, b)[torch.arange(k), :, torch.arange(k), :]    # (k, b, b)
        wj = w.reshape(w.shape[0], k, b).permute(1, 2, 0)                          # (k, b, rows)
        return (wj * torch.linalg.solve(diag, wj)).sum(dim=(1, 2))
    costs, start = [], 0
    for width in widths:
        pos = slice(start, start + width)
        wj = w[:, pos].t()
        costs.append((wj * torch.linalg.solve(hinv[pos, pos], wj)).sum())
        start += width
    return torch.stack(costs)


def _row_sequence(w: torch.Tensor, hinv: torch.Tensor, cols: List[slice]) -> List[Tuple[float, int]]:
    """One block-row's greedy OBS order: (cost when removed, block column), every block.
    `w` (rows, in) is the row's unconstrained optimum, `hinv` the inverse damped H. The
    removed block's rows and columns are dropped from `w` and `hinv` as it goes, so the
    kept blocks stay consecutive runs in block order."""
    alive = list(range(len(cols)))
    widths = [c.stop - c.start for c in cols]
    order: List[Tuple[float, int]] = []
    while alive:
        costs = _removal_costs(w, hinv, [widths[j] for j in alive])
        k = int(torch.argmin(costs))                 # the first of equal costs: the lower block index
        start = sum(widths[j] for j in alive[:k])
        pos = torch.arange(start, start + widths[alive[k]])
        hjj_inv = torch.linalg.inv(hinv[pos][:, pos])
        w = w - (w[:, pos] @ hjj_inv) @ hinv[pos, :]
        hinv = hinv - hinv[:, pos] @ hjj_inv @ hinv[pos, :]
        keep = torch.ones(hinv.shape[0], dtype=torch.bool)
        keep[pos] = False
        w, hinv = w[:, keep], hinv[keep][:, keep]
        order.append((max(float(costs[k]), 0.0), alive.pop(k)))
    return order


def choose_blocks(W: torch.Tensor, H: torch.Tensor, C: torch.Tensor, block: Tuple[int, int], prune: int,
                  damp: float = 0.01) -> Tuple[torch.Tensor, torch.Tensor]:
    """(alive grid (gr, gc) bool, new (out, in) weight, zero on pruned blocks) for one
    layer: `prune` blocks removed by the layer-wide greedy OBS, the kept ones solved.
    W (out, in), H = X_sᵀX_s and C = X_sᵀX_t (in, in), all float64."""
    out_dim, in_dim = W.shape
    rows, cols = _slices(out_dim, block[0]), _slices(in_dim, block[1])
    Hd = H + damp * H.diagonal().mean().clamp_min(1e-12) * torch.eye(in_dim, dtype=H.dtype)
    hinv = torch.linalg.inv(Hd)
    target = C @ W.t()                                # (in, out): X_sᵀ X_t Wᵀ
    w_star = (hinv @ target).t()                      # the unconstrained optimum
    heads = []
    sequences = []
    for r, rs in enumerate(rows):
        seq = _row_sequence(w_star[rs], hinv, cols)
        sequences.append(seq)
        heads.append((seq[0][0], r * len(cols) + seq[0][1], r, 0))
    heapq.heapify(heads)
    alive = torch.ones(len(rows), len(cols), dtype=torch.bool)
    for _ in range(prune):
        _, _, r, k = heapq.heappop(heads)
        alive[r, sequences[r][k][1]] = False
        if k + 1 < len(sequences[r]):
            cost, j = sequences[r][k + 1]
            heapq.heappush(heads, (cost, r * len(cols) + j, r, k + 1))
    new = torch.zeros_like(W)
    for r, rs in enumerate(rows):
        kept = [cols[j] for j in range(len(cols)) if alive[r, j]]
        if not kept:
            continue
        idx = torch.cat([torch.arange(s.start, s.stop) for s in kept])
        new[rs, idx] = torch.linalg.solve(Hd[idx][:, idx], target[idx, rs]).t()
    return alive, new


def _relative_error(W: torch.Tensor, new: torch.Tensor, H: torch.Tensor, C: torch.Tensor, Ht: torch.Tensor) -> float:
    """‖X_s W'ᵀ − X_t Wᵀ‖² / ‖X_t Wᵀ‖² from the Gram matrices."""
    ref = float((W @ Ht * W).sum())
    err = float((new @ H * new).sum()) - 2 * float((new @ C * W).sum()) + ref
    return max(err, 0.0) / ref if ref > 0 else 0.0


@torch.no_grad()
def obs_prune(pruned, batches: Iterable[Any], *, damp: float = 0.01, log=None) -> List[dict]:
    """Prune every masked Linear layer of `pruned` (planc.compile's result, all blocks
    still alive, masks in support mode) to its target by block OBS on `batches` (model
    inputs: a tensor or a tuple of arguments each), reconstructing the kept weights. Sets
    each mask's support and the raw weights; returns per layer {name, pruned, error_cut,
    error}: the relative output error on the calibration tokens of the dense weight cut
    to the chosen blocks, and of the reconstructed weight."""
    batches = [_as_args(b) for b in batches]
    if not batches:
        raise PlancError("obs: no calibration batches (the training data loader gave none)")
    runtime = pruned.pruning_runtime()
    for name, mask in pruned.masks.items():
        if mask.mode != "support":
            raise PlancError(f"obs: layer {name!r} has a mask in mode {mask.mode!r}; block OBS sets supports "
                             "(compile the plan with method obs)")
        if not bool(mask.alive.all()):
            raise PlancError(f"obs: layer {name!r} is already pruned; run obs_prune on the compiled model before any pruning")
    module = pruned.module
    teacher = self_teacher(module)                   # the dense model, node for node
    was_training = module.training
    module.eval()
    records: List[dict] = []
    try:
        layers = {t.weight_target: t.name for t in pruned.targets if t.name in pruned.masks}
        for owner, node_name, uses in _groups(module, layers):
            t0 = time.perf_counter()
            grams = []                                   # Σ X_sᵀX_s, X_sᵀX_t, X_tᵀX_t over the batches
            with _probed(_owner(module, owner), node_name) as ps, _probed(_owner(teacher, owner), node_name) as pt:
                if ps is None or pt is None:
                    raise PlancError(f"obs: no input node {node_name!r} for layer {uses[0][0]!r}")
                for args in batches:
                    xs, xt = _run_to(module, ps, args), _run_to(teacher, pt, args)
                    step = [xs.t() @ xs, xs.t() @ xt, xt.t() @ xt]
                    grams = step if not grams else [g.add_(d) for g, d in zip(grams, step)]
            H, C, Ht = grams
            for name, _ in uses:
                mask, weight = pruned.masks[name], pruned.weight(name)
                W = mask.view.to_matrix(weight.detach()).double()
                count = runtime.target_blocks(name)
                alive, new = choose_blocks(W, H, C, mask.view.block, count, damp)
                cut = W * mask.view.to_matrix(mask.view.expand(alive.double()))
                weight.copy_(mask.view.from_matrix(new).to(weight.dtype))
                mask.alive.copy_(alive)
                rec = {"name": name, "pruned": count,
                       "error_cut": round(_relative_error(W, cut, H, C, Ht), 6),
                       "error": round(_relative_error(W, new, H, C, Ht), 6)}
                records.append(rec)
            if log is not None:
                log(f"obs: {', '.join(name for name, _ in uses)}: relative error "
                    f"{', '.join(str(r['error']) for r in records[-len(uses):])} ({time.perf_counter() - t0:.1f} s)")
    finally:
        module.train(was_training)
    missed = sorted(set(pruned.masks) - {r["name"] for r in records})
    if missed:
        raise PlancError(f"obs: found no linear map applying the weight of {', '.join(missed[:4])}"
                         f"{' ...' if len(missed) > 4 else ''} in the graph")
    return records
