"""`planc bench`: the block-sparse kernels and lowered models against dense, in one run.

Every number is a ratio measured in the same process, on the same inputs: dense PyTorch
time / block-sparse time (>1: the sparse op is faster), and torch.sparse BSR time / ours.
The candidates of a cell are timed interleaved (dense, ours, BSR, dense, ours, ...) after
two warm-up calls each, and each time is the median of `repeats`: on a shared machine,
load that comes and goes then hits all candidates alike. Each cell records the 1-minute
load average when it started. Never used in tests.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
import json
import os
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from planc.timing import cpu_model, interleaved
from planc.blocks import BlockView, sparsify_grid_count
from planc.kernels.format import BlockSparseMatrix
from planc.kernels import cpu as cpu_k
from torch import fx, nn
from planc.examples.digits import mlp
from planc.passes.lower import lower, report
from planc.kernels.cost import choose_cpu_strategy

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class Cell:
    shape: Tuple[int, int]        # weight (out, in)
    tokens: int
    block: int
    sparsity: float               # achieved block sparsity
    dtype: str
    backend: str
    dense_fwd_ms: float
    ours_fwd_ms: float
    bsr_fwd_ms: Optional[float]
    dense_bwd_ms: Optional[float]
    ours_bwd_ms: Optional[float]
    bsr_dx_ms: Optional[float]
    max_rel_err: float
    load: Optional[float] = None  # 1-minute load average when the cell started
    strategy: Optional[str] = None  # the CPU formulation timed as "ours"

    @property
    def fwd_vs_dense(self) -> float:
        return self.dense_fwd_ms / self.ours_fwd_ms

    @property
    def fwd_vs_bsr(self) -> Optional[float]:
        return None if self.bsr_fwd_ms is None else self.bsr_fwd_ms / self.ours_fwd_ms

    @property
    def bwd_vs_dense(self) -> Optional[float]:
        return None if not self.ours_bwd_ms else self.dense_bwd_ms / self.ours_bwd_ms

    @property
    def ideal(self) -> float:
        return 1.0 / max(1e-9, 1.0 - self.sparsity)


def load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _random_block_sparse(R, C, block, sparsity, dtype, device, gen):
    view = BlockView((R, C), (block, block))
    n = view.num_blocks
    pruned = sparsify_grid_count(n, sparsity)
    alive = torch.ones(n, dtype=torch.bool)
    alive[torch.randperm(n, generator=gen)[:pruned]] = False
    alive = alive.view(view.grid)
    w = torch.randn(R, C, generator=gen) / C ** 0.5
    w = (w * view.expand(alive.float())).to(device=device, dtype=dtype)
    return w, alive


def bench_cell(shape, tokens, block, sparsity, dtype="fp32", backend="cpu", repeats=5, backward=True,
               seed=0, strategy: Optional[str] = None) -> Cell:
    """One shape: dense, ours and BSR forward (and backward) on the same inputs. On CPU
    `strategy` overrides the formulation kernels/cost.py would choose."""
    dt = DTYPES[dtype]
    device = torch.device("cuda" if backend == "triton" else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(seed)
    R, C = shape
    w, alive = _random_block_sparse(R, C, block, sparsity, dt, device, gen)
    x = torch.randn(tokens, C, generator=gen).to(device=device, dtype=dt)
    dy = torch.randn(tokens, R, generator=gen).to(device=device, dtype=dt)
    bsm = BlockSparseMatrix.from_weight(w, (block, block), alive.to(device)).for_inference()
    achieved = 1.0 - bsm.density

    if backend == "triton":
        from planc.kernels import triton_bsr as k   # lazy: importing it sets up Triton (TRITON_INTERPRET is read then)
        ours_fwd = lambda: k.forward(x, bsm)  # noqa: E731
        ours_bwd = lambda: (k.grad_input(dy, bsm), k.grad_values(dy, x, bsm))  # noqa: E731
    else:
        strat = strategy or choose_cpu_strategy(tokens, shape, (block, block), bsm.density, dt)
        ours_fwd = lambda: cpu_k.forward(x, bsm, strategy=strat)  # noqa: E731
        ours_bwd = lambda: (cpu_k.grad_input(dy, bsm), cpu_k.grad_values(dy, x, bsm))  # noqa: E731

    dense_fwd = lambda: F.linear(x, w)  # noqa: E731
    dense_bwd = lambda: (dy @ w, dy.t() @ x)  # noqa: E731   dX and dW, as autograd computes them

    if backend == "triton":
        strat = None
    bsr_fwd = bsr_dx = None
    if dt in (torch.float32, torch.float64) or device.type == "cuda":
        with warnings.catch_warnings():   # "BSR support is in beta state"
            warnings.simplefilter("ignore")
            wb = w.to_sparse_bsr((block, block)) if R % block == 0 and C % block == 0 else None
            wtb = w.t().contiguous().to_sparse_bsr((block, block)) if wb is not None else None
        if wb is not None:
            bsr_fwd = lambda: (wb @ x.t()).t()  # noqa: E731   the fast formulation
            bsr_dx = lambda: (wtb @ dy.t()).t()  # noqa: E731

    ref = x.double() @ w.double().t()
    err = float(((ours_fwd().double() - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item())
    load = load_average()
    fwd = interleaved(dict(dense=dense_fwd, ours=ours_fwd, **({"bsr": bsr_fwd} if bsr_fwd else {})),
                              repeats, sync)
    bwd = {}
    if backward:
        bwd = interleaved(dict(dense=dense_bwd, ours=ours_bwd, **({"bsr": bsr_dx} if bsr_dx else {})),
                                  repeats, sync)
    cell = Cell(shape=(R, C), tokens=tokens, block=block, sparsity=round(achieved, 4), dtype=dtype, backend=backend,
                dense_fwd_ms=fwd["dense"], ours_fwd_ms=fwd["ours"], bsr_fwd_ms=fwd.get("bsr"),
                dense_bwd_ms=bwd.get("dense"), ours_bwd_ms=bwd.get("ours"), bsr_dx_ms=bwd.get("bsr"),
                max_rel_err=err, load=load, strategy=strat)
    return cell


def model_comparison(hidden: int, block: int, sparsity: float, tokens: int = 512, repeats: int = 10) -> dict:
    """The digits MLP with its hidden layers block-pruned (by block norm, at random init),
    baked-style (zeros in place) versus lowered by planc.lower; same inputs."""
    torch.manual_seed(0)
    model = mlp(hidden=hidden).eval()
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.startswith("layers."):
            view = BlockView(tuple(m.weight.shape), (block, block))
            norms = view.block_norms(m.weight.detach()).flatten()
            alive = torch.ones_like(norms, dtype=torch.bool)
            alive[norms.argsort()[:sparsify_grid_count(norms.numel(), sparsity)]] = False
            with torch.no_grad():
                m.weight.mul_(view.expand(alive.view(view.grid).float()))
    baked = fx.symbolic_trace(model)
    lowered = lower(baked, backend="cpu", min_speedup=1.0, tokens=tokens, blocks=(block, block))
    x = torch.randn(tokens, 64)
    with torch.no_grad():
        a, b = baked(x), lowered(x)
        err = float(((a - b).abs().max() / a.abs().max()).item())
        t = interleaved(dict(baked=lambda: baked(x), lowered=lambda: lowered(x)), repeats, lambda: None)
        tb, tl = t["baked"], t["lowered"]
    lowered_layers = [r["layer"] for r in report(lowered) if r["action"] == "lowered"]
    return dict(model=f"digits MLP 64-{hidden}-{hidden}-10", block=block, sparsity=sparsity, tokens=tokens,
                baked_ms=tb, lowered_ms=tl, speedup=tb / tl, max_rel_err=err, lowered_layers=lowered_layers)


def sweep(full: bool = False, backend: str = "cpu", dtypes: Sequence[str] = ("fp32",), repeats: int = 5,
          progress: Callable[[str], None] = lambda s: None) -> dict:
    if full:
        shapes = [((4096, 4096), 512), ((4096, 4096), 2048), ((1536, 384), 8192), ((384, 1536), 8192),
                  ((1024, 1024), 512)]
        blocks, sparsities = (8, 16, 32, 64), (0.7, 0.8, 0.9, 0.95)
        models = [(512, 16, 0.9), (2048, 32, 0.9), (2048, 32, 0.95), (4096, 32, 0.9)]
    else:
        shapes = [((4096, 4096), 512), ((1536, 384), 8192)]
        blocks, sparsities = (16, 32, 64), (0.8, 0.9, 0.95)
        models = [(512, 16, 0.9), (2048, 32, 0.9)]
    cells: List[Cell] = []
    for dtype in dtypes:
        for (shape, tokens) in shapes:
            for block in blocks:
                for s in sparsities:
                    if shape[0] % block or shape[1] % block:
                        continue
                    c = bench_cell(shape, tokens, block, s, dtype=dtype, backend=backend, repeats=repeats)
                    progress(_row(c))
                    cells.append(c)
    model_rows = []
    if backend == "cpu":
        for hidden, block, s in models:
            m = model_comparison(hidden, block, s)
            progress(f"{m['model']} block {block} s={s}: lowered {m['speedup']:.2f}x vs baked")
            model_rows.append(m)
    return dict(device=device_name(backend), torch=torch.__version__, threads=torch.get_num_threads(),
                backend=backend, full=full, cells=cells, models=model_rows)


def device_name(backend: str = "cpu") -> str:
    if backend == "triton" and torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{cpu_model()} ({torch.get_num_threads()} threads)"


def _f(v, spec=".2f"):
    return "-" if v is None else format(v, spec)


HEADER = ("| shape (out×in) | tokens | block | sparsity | dtype | strategy | dense fwd ms | ours fwd ms | BSR fwd ms "
          "| fwd × dense | fwd × BSR | ideal | bwd × dense | rel err | load |")


def _row(c: Cell) -> str:
    return (f"| {c.shape[0]}×{c.shape[1]} | {c.tokens} | {c.block} | {c.sparsity:.2f} | {c.dtype} | "
            f"{c.strategy or c.backend} | {c.dense_fwd_ms:.2f} | {c.ours_fwd_ms:.2f} | {_f(c.bsr_fwd_ms)} | "
            f"{c.fwd_vs_dense:.2f} | {_f(c.fwd_vs_bsr)} | {c.ideal:.1f} | {_f(c.bwd_vs_dense)} | "
            f"{c.max_rel_err:.1e} | {_f(c.load)} |")


def to_markdown(result: dict, command: str = "planc bench") -> str:
    lines = [f"Device: {result['device']}; torch {result['torch']}; backend {result['backend']}; "
             f"command: `{command}`", "",
             "Ratios are dense time / block-sparse time (>1: faster) and torch.sparse BSR time / ours, "
             "from one run; medians of interleaved repeats; bwd = dX + dW (dW on the support only for ours); "
             "load = 1-minute load average when the cell started.", "",
             HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    lines += [_row(c) for c in result["cells"]]
    if result["models"]:
        lines += ["", "| model | block | sparsity | tokens | baked ms | lowered ms | speedup | rel err | lowered layers |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for m in result["models"]:
            lines.append(f"| {m['model']} | {m['block']} | {m['sparsity']} | {m['tokens']} | {m['baked_ms']:.2f} | "
                         f"{m['lowered_ms']:.2f} | {m['speedup']:.2f} | {m['max_rel_err']:.1e} | "
                         f"{', '.join(m['lowered_layers']) or '-'} |")
    return "\n".join(lines) + "\n"


def is_bench_record(data: dict) -> bool:
    """Whether a bench.json's contents are what to_json writes (planc may replace it)."""
    return {"device", "backend", "cells"} <= data.keys() and isinstance(data["cells"], list)


def to_json(result: dict) -> str:
    out = dict(result)
    out["cells"] = [dict(asdict(c), fwd_vs_dense=c.fwd_vs_dense, fwd_vs_bsr=c.fwd_vs_bsr, bwd_vs_dense=c.bwd_vs_dense,
                         ideal=c.ideal) for c in result["cells"]]
    return json.dumps(out, indent=2)
