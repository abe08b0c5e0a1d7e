"""The CPU path of the block-sparse linear map Y = X·Wᵀ + b (and its backward).

Measured on this machine (2 cores, torch 2.13, MKL; see docs/benchmarks.md): the fastest
correct formulation is *column panels*, not MKL BSR. Read activations token-minor
(Xᵀ, C×M; a free transposed view of X) and, for each block-column j of W, multiply the
stacked nonzero blocks of that column (k·r × c) by the slab Xᵀ[j·c:(j+1)·c] (c × M), then
scatter-add the k result blocks into Yᵀ. Every GEMM reads its X slab in place (no gather,
no copy of X), has M = k·r rows, and the scatter is one `index_add_` per column. One
core runs these GEMMs at MKL's dense rate; what is left is the scatter (~25%).

Two cores: MKL parallelises each small GEMM poorly (1.15× on 2 threads) and the scatter
not at all, so the column loop itself runs on `torch.get_num_threads()` threads, each
with MKL and OpenMP at one thread, taking block-columns from a shared counter and
scatter-adding into its own copy of Yᵀ; the copies are summed at the end (one pass over
Y). MKL must be single-threaded meanwhile: two Python threads each starting a 2-thread
OpenMP team oversubscribe the cores and ran 100× slower. Taking columns dynamically
rather than splitting the block-rows statically matters on a shared machine: a core
that starts late (another process, or OpenMP threads still spin-waiting after the
previous op) just takes fewer columns.

The result is returned as Yᵀ's transpose, a view (every strategy, so the layout does not
depend on the shape: kernels/library.py states it to torch.compile): the next sparse
layer wants Xᵀ contiguous anyway, so chained sparse layers never transpose (elementwise
ops between them keep the layout).

Strategies, chosen per shape by `choose_cpu_strategy` (kernels/cost.py):
- "cols":  column panels as above (forward); the mirror image for dX; per block-row
           GEMMs for dW on the support only. All three run on torch's threads.
- "rows":  forward only: block-rows of Yᵀ claimed by threads, one in-place GEMM per
           kept block, no accumulators or scatter (`forward_rows`); for many tokens
           and few kept blocks per block-row.
- "mkl":   torch.sparse BSR in its fast formulation (W_bsr @ Xᵀ)ᵀ (fp32/fp64 only).
- "dense": materialise W and call F.linear (small layers, high density).
16-bit inputs are computed in fp32 on CPU (MKL's half GEMMs are slower and the
scatter-add would round every partial sum) and cast back.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
import itertools
import threading
import warnings

import torch
import torch.nn.functional as F

from planc.kernels import native
from planc.kernels.cost import NATIVE_MAX_DENSITY, choose_cpu_strategy, thread_parts
from planc.kernels.format import BlockSparseMatrix, inverse

STRATEGIES = ("native", "cols", "rows", "mkl", "dense")

# The threads' accumulators for one token tile together stay below this (L3 is 32 MiB):
# at 8192 tokens a whole-output accumulator streamed from memory and ran 3× slower.
_TILE_BYTES = 24 << 20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _token_minor(x: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """xᵀ as a contiguous (rows, M) matrix, zero-padded from x.shape[1] to `rows`."""
    xt = x.t().to(dtype).contiguous()   # a no-op when x is already a transposed view
    if rows > xt.shape[0]:
        xt = F.pad(xt, (0, 0, 0, rows - xt.shape[0]))
    return xt


def _check(x: torch.Tensor, bsm: BlockSparseMatrix, bias: torch.Tensor | None) -> None:
    if x.dim() != 2 or x.shape[1] != bsm.shape[1]:
        raise ValueError(f"expected x of shape (M, {bsm.shape[1]}), got {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (bsm.shape[0],):
        raise ValueError(f"expected bias of shape ({bsm.shape[0]},), got {tuple(bias.shape)}")


def forward_stored(x: torch.Tensor, values: torch.Tensor, order: str, index, bias: torch.Tensor | None,
                   shape, strategy: str = "auto", layout: str = "t") -> torch.Tensor:
    """The forward of a lowered layer from its stored blocks (kernels/library.py's op):
    `strategy` "auto" picks the formulation for this call's row count (kernels/cost.py);
    blocks stored by column go to the column panels without a gather. `layout` "c": the
    block-rows path writes Y row-major (the caller makes any other result contiguous)."""
    r = int(values.shape[1])
    has_native = native.supports(r, x.dtype, x.device)
    if strategy == "auto":
        nnz, (r, c), (R, C) = values.shape[0], tuple(values.shape[1:]), shape
        density = nnz / max(1, (-(-R // r)) * (-(-C // c)))
        strategy = choose_cpu_strategy(x.shape[0], (R, C), (r, c), density, x.dtype, native=has_native)
    if strategy == "native":
        crow, col, row, tcrow, trow, tperm = index
        if has_native:
            return native.forward(x, values, order, crow, col, tperm, bias, shape, layout=layout)
        strategy = "rows"                 # built elsewhere, or no compiler here: the same product in torch
    if strategy == "cols" and order == "col":
        crow, col, row, tcrow, trow, tperm = index
        return forward_columns(x, values, tcrow, trow, shape, bias)
    if strategy == "rows":
        return forward_rows(x, values, order, index, bias, shape, row_major=(layout == "c"))
    return forward(x, BlockSparseMatrix.stored(values, order, index, shape), bias, strategy=strategy)


# An output row-block tile of at most this many bytes (r × tokens): with whole rows the
# k kept blocks of a block-row re-read it k times, so it should stay in cache.
_ROW_TILE_BYTES = 2 << 20


def forward_rows(x: torch.Tensor, values: torch.Tensor, order: str, index, bias: torch.Tensor | None,
                 shape, row_major: bool = False) -> torch.Tensor:
    """Y = x·Wᵀ + bias by block-rows: each block-row of Yᵀ (r × tokens, a token tile
    of it) starts from the bias and takes one in-place GEMM per kept block,
    Yᵀ[i] += W_ij · Xᵀ[j] (Xᵀ a free transposed view of x). Threads claim block-rows
    from a shared counter and own the rows they write, so there are no per-thread
    accumulators to sum and no scatter — the column panels' overheads, which dominate
    when a block-row has few kept blocks and the token count is large (MiniLM's layers
    at 90%: docs/benchmarks.md). Returns Yᵀ's transposed view, like the other paths;
    with `row_major` it writes Y (M, R) itself instead, a column block of it per
    block-row (Y[:, i] += X[:, j] · W_ijᵀ), for a consumer that wants Y contiguous: the
    transpose-copy it saves cost more than the whole sparse product on MiniLM's layers.
    Blocks may be stored in either order; no call gathers them."""
    if x.dim() != 2 or x.shape[1] != int(shape[1]):
        raise ValueError(f"expected x of shape (M, {int(shape[1])}), got {tuple(x.shape)}")
    out_dtype, cd = x.dtype, compute_dtype(x.dtype)
    (R, C), (r, c) = (int(v) for v in shape), (int(values.shape[1]), int(values.shape[2]))
    crow, col, _, _, _, tperm = index
    gr, M = -(-R // r), x.shape[0]
    # position of row-order block b in `values`
    where = list(range(values.shape[0])) if order == "row" else inverse(tperm.long()).tolist()
    crow_l, col_l = crow.tolist(), col.tolist()
    vals = values.detach().to(cd)
    xt = x.detach().to(cd).t()
    if C % c:                                         # a partial last block-column: pad the input's columns
        xt = F.pad(xt, (0, 0, 0, (-(-C // c)) * c - C))
    b = None if bias is None else F.pad(bias.detach().to(cd), (0, gr * r - R))
    tile = max(256, _ROW_TILE_BYTES // (4 * r))
    tiles = [(t0, min(M, t0 + tile)) for t0 in range(0, M, tile)]
    todo = itertools.count()
    if row_major:
        y = torch.empty(M, gr * r, dtype=cd, device=x.device)
        xs, vs = xt.t(), vals.transpose(1, 2)          # X (M, C) and each block's Wᵀ, views
    else:
        yt = torch.empty(gr * r, M, dtype=cd, device=x.device)

    # the block-rows with the most kept blocks first: the last ones claimed are the
    # shortest, so the threads finish together (at 90% a block-row keeps 0 to ~5 blocks)
    order_rows = sorted(range(gr), key=lambda i: crow_l[i] - crow_l[i + 1])

    def work() -> None:
        for k in _claim(todo, gr * len(tiles)):
            i, (t0, t1) = order_rows[k // len(tiles)], tiles[k % len(tiles)]
            rows = slice(i * r, (i + 1) * r)
            out = y[t0:t1, rows] if row_major else yt[rows, t0:t1]
            if b is None:
                out.zero_()
            else:
                out.copy_((b[rows] if row_major else b[rows, None]).expand_as(out))
            for blk in range(crow_l[i], crow_l[i + 1]):
                j = col_l[blk]
                if row_major:
                    out.addmm_(xs[t0:t1, j * c:(j + 1) * c], vs[where[blk]])
                else:
                    out.addmm_(vals[where[blk]], xt[j * c:(j + 1) * c, t0:t1])

    _run_parallel([work] * max(1, min(torch.get_num_threads(), gr * len(tiles))))
    if row_major:
        return y[:, :R].to(out_dtype)
    return yt[:R].t().to(out_dtype)


def forward(x: torch.Tensor, bsm: BlockSparseMatrix, bias: torch.Tensor | None = None,
            strategy: str = "cols") -> torch.Tensor:
    """Y = x·Wᵀ + bias for x (M, C); returns (M, R) in x's dtype: Yᵀ's transposed view,
    except "native", which writes Y row-major (the op, kernels/library.py, fixes the layout
    its callers get)."""
    _check(x, bsm, bias)
    out_dtype, cd = x.dtype, compute_dtype(x.dtype)
    (R, C), (r, c), (gr, gc) = bsm.shape, bsm.block, bsm.grid
    M = x.shape[0]
    if strategy == "dense":
        # Yᵀ = W·Xᵀ (+ b), returned as its transposed view: the same layout as the other paths
        w, xt = bsm.to_dense().to(cd), x.to(cd).t()
        yt = torch.mm(w, xt) if bias is None else torch.addmm(bias.to(cd).unsqueeze(1), w, xt)
        return yt.t().to(out_dtype)
    if strategy == "mkl":
        if cd not in (torch.float32, torch.float64):
            raise ValueError(f"torch.sparse BSR on CPU supports float32/float64, got {cd}")
        if r != c:
            raise ValueError(f"torch.sparse BSR on CPU (MKL) needs square blocks, got {r}×{c}")
        with warnings.catch_warnings():   # "BSR support is in beta state"
            warnings.simplefilter("ignore")
            w = torch.sparse_bsr_tensor(bsm.crow, bsm.col, bsm.values.to(cd), size=(gr * r, gc * c),
                                        check_invariants=False)
        yt = (w @ _token_minor(x, gc * c, cd))[:R]
        y = yt.t()
        return (y if bias is None else y + bias.to(cd)).to(out_dtype)
    if strategy == "native":
        if not native.supports(r, x.dtype, x.device):
            why = native.why_unavailable() or f"{r}-row blocks on {x.dtype}"
            raise ValueError(f"the native CPU kernel cannot compute this layer ({why})")
        return native.forward(x, bsm.values, "row", bsm.crow, bsm.col, bsm.tperm, bias, bsm.shape)
    if strategy == "rows":
        return forward_rows(x, bsm.values, "row", (bsm.crow, bsm.col, bsm.row, bsm.tcrow, bsm.trow, bsm.tperm),
                            bias, bsm.shape)
    if strategy != "cols":
        raise ValueError(f"expected a CPU strategy in {STRATEGIES}, got {strategy!r}")

    return forward_columns(x, bsm.grouped_by_column(), bsm.tcrow, bsm.trow, bsm.shape, bias)


def forward_columns(x: torch.Tensor, values_t: torch.Tensor, tcrow: torch.Tensor, trow: torch.Tensor,
                    shape, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The column-panel forward on blocks already grouped by block-column (values_t
    (nnz, r, c) in transposed-index order, with its column pointers and block-rows): a
    lowered layer for inference stores its blocks this way, so no call gathers them."""
    out_dtype, cd = x.dtype, compute_dtype(x.dtype)
    (R, C), (r, c) = (int(v) for v in shape), tuple(int(v) for v in values_t.shape[1:])
    gr, M = -(-R // r), x.shape[0]
    yt = torch.empty(gr, r, M, dtype=cd, device=x.device)
    # start from the bias: saves a pass over Y
    init = None if bias is None else F.pad(bias.detach().to(cd), (0, gr * r - R)).view(gr, r, 1)
    panels = values_t.detach().to(cd).reshape(values_t.shape[0] * r, c)
    accumulate_panels(yt, init, panels, x.detach().to(cd).t(), tcrow, trow, r, c)
    return yt.view(gr * r, M)[:R].t().to(out_dtype)


def accumulate_panels(out: torch.Tensor, init: torch.Tensor | None, panels: torch.Tensor, src_t: torch.Tensor,
                      ptr: torch.Tensor, dest: torch.Tensor, out_width: int, in_width: int,
                      sources=None) -> None:
    """The column-panel scheme shared by forward, dX and the implicit-GEMM conv: out
    (groups_out, out_width, M) = init (broadcast; zero if None) + the panel products.
    Input group g of blocks (ptr[g] to ptr[g+1], stacked in `panels` as
    (k·out_width, in_width)) all read one slab of the token-minor input `src_t` (a view:
    any strides), so one GEMM serves the group; its products are scatter-added at `dest`.
    The slab is rows g·in_width.. of src_t, tokens 0..M; `sources` (a (row, token
    offset) pair per group) moves it: a conv's group is a channel slab at one kernel
    tap, the tap a constant token offset into the padded input (kernels/conv.py).

    Threads take input groups one at a time from a shared counter and accumulate into
    their own copy of `out`; the copies are summed at the end. A core that starts late
    (another process, or OpenMP threads still spinning after the previous op) then just
    takes fewer groups; a static split waited for it (1.3× slower here under load)."""
    ptr_l, dest = ptr.tolist(), dest.long()
    if sources is None:
        sources = [(g * in_width, 0) for g in range(len(ptr_l) - 1)]
    M, rows = out.shape[2], out.shape[0] * out.shape[1]
    parts = thread_parts(2.0 * dest.numel() * out_width * in_width * M, len(ptr_l) - 1)
    # token tiles small enough that the threads' accumulators stay in the L3 cache
    tile = max(64, _TILE_BYTES // (4 * parts * rows))
    for t0 in range(0, M, tile):
        t1 = min(M, t0 + tile)
        _accumulate_tile(out if tile >= M else out[:, :, t0:t1], init, panels, src_t, sources, t0, t1, ptr_l, dest,
                         parts, out_width, in_width)


def _accumulate_tile(out, init, panels, src_t, sources, t0, t1, ptr, dest, parts, out_width, in_width) -> None:
    """`accumulate_panels` for the tokens t0..t1: `parts` threads, each with its own
    accumulator, then one parallel pass that sums them into `out` (a view)."""
    direct = out.is_contiguous()
    scratch = [_take_scratch(out.numel(), out.dtype) for _ in range(parts - direct)]
    try:
        accs = ([out] if direct else []) + [buf[:out.numel()].view(out.shape) for buf in scratch]
        _accumulate_into(out, accs, init, panels, src_t, sources, t0, t1, ptr, dest, out_width, in_width)
    finally:
        for buf in scratch:
            _give_scratch(buf)


def _accumulate_into(out, accs, init, panels, src_t, sources, t0, t1, ptr, dest, out_width, in_width) -> None:
    parts = len(accs)
    todo = itertools.count()          # next() on it is atomic under the GIL
    _run_parallel([lambda acc=acc, i=i: _panel_loop(acc, i, panels, src_t, sources, t0, t1, ptr, dest, todo,
                                                    out_width, in_width)
                   for acc, i in zip(accs, [init] + [None] * (parts - 1))])
    if parts > 1 or accs[0] is not out:
        _run_parallel([lambda a=a, e=e: _sum_into(out, accs, a, e) for a, e in _even_ranges(out.shape[0], parts)])


# Accumulator buffers kept between calls: a fresh multi-MB tensor is paid again in page
# faults on first touch (2–10 ms per call at these sizes). At most _SCRATCH_KEPT are kept.
_SCRATCH: list = []
_SCRATCH_LOCK = threading.Lock()
_SCRATCH_KEPT = 8


def _take_scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    with _SCRATCH_LOCK:
        for i, buf in enumerate(_SCRATCH):
            if buf.dtype == dtype and buf.numel() >= numel:
                return _SCRATCH.pop(i)
    # a normal tensor even when called under torch.inference_mode(): an inference tensor
    # kept here could not be written by a later call made outside inference mode
    with torch.inference_mode(False):
        return torch.empty(numel, dtype=dtype)


def _give_scratch(buf: torch.Tensor) -> None:
    with _SCRATCH_LOCK:
        _SCRATCH.append(buf)
        _SCRATCH.sort(key=torch.Tensor.numel)          # the smallest that fits is taken first
        del _SCRATCH[:-_SCRATCH_KEPT]                   # keep the largest few


def _panel_loop(acc, init, panels, src_t, sources, t0, t1, ptr, dest, todo, out_width, in_width) -> None:
    """One thread's share of `accumulate_panels`: start its accumulator from `init`
    (or zero), then take input groups from `todo` until none is left."""
    M, C, groups = acc.shape[2], src_t.shape[0], len(ptr) - 1
    if init is None:
        acc.zero_()
    else:
        acc.copy_(init.expand_as(acc))
    # one product buffer per thread, reused: fresh ~MB allocations from two threads cost ~20%
    most = max(e - a for a, e in zip(ptr[:-1], ptr[1:])) * out_width
    scratch = _take_scratch(most * M, acc.dtype)
    buf = scratch[:most * M].view(most, M)
    try:
        for g in _claim(todo, groups):
            a, e = ptr[g], ptr[g + 1]
            if a == e:
                continue
            row, shift = sources[g]
            w = min(in_width, C - row)                     # the last slab may be partial
            prod = torch.mm(panels[a * out_width:e * out_width, :w], src_t[row:row + w, shift + t0:shift + t1],
                            out=buf[:(e - a) * out_width])
            acc.index_add_(0, dest[a:e], prod.view(e - a, out_width, M))
    finally:
        _give_scratch(scratch)


def _claim(todo, n: int):
    """The indices this thread takes from the shared counter `todo`, until n is reached
    (next() on an itertools.count is atomic under the GIL, so no index is taken twice)."""
    for i in todo:
        if i >= n:
            return
        yield i


def _sum_into(out, accs, a: int, e: int) -> None:
    """out[a:e] = the sum of the accumulators' rows a..e (accs[0] may be out itself)."""
    if accs[0] is not out:
        out[a:e].copy_(accs[0][a:e])
    for acc in accs[1:]:
        out[a:e].add_(acc[a:e])


def _even_ranges(n: int, parts: int):
    cuts = [n * p // parts for p in range(parts + 1)]
    return list(zip(cuts[:-1], cuts[1:]))


_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0


def _run_parallel(tasks) -> None:
    """Run the tasks at once, one per core: the first on this thread, the others on
    pool threads; every task with MKL/OpenMP at one thread. torch's thread setting is
    per thread for OpenMP and MKL: the pool threads keep 1 for good, this thread gets
    its own count back. One task still runs single-threaded: a loop of small GEMMs
    gains little from a 2-thread MKL, and under CPU contention each of its parallel
    regions waited for the busy core (a 2.2 ms loop took seconds)."""
    global _POOL, _POOL_SIZE
    threads = torch.get_num_threads()
    if threads == 1:
        for t in tasks:
            t()
        return
    if len(tasks) > 1 and _POOL_SIZE < len(tasks) - 1:
        if _POOL is not None:
            _POOL.shutdown(wait=False)
        _POOL = ThreadPoolExecutor(max_workers=len(tasks) - 1, thread_name_prefix="planc-cpu",
                                   initializer=torch.set_num_threads, initargs=(1,))
        _POOL_SIZE = len(tasks) - 1
    torch.set_num_threads(1)
    try:
        inference = torch.is_inference_mode_enabled()
        futures = [_POOL.submit(_call_in_mode, t, inference) for t in tasks[1:]]
        try:
            tasks[0]()
        finally:
            for f in futures:
                f.result()
    finally:
        torch.set_num_threads(threads)    # also torch's default for threads created later


def _call_in_mode(task, inference: bool) -> None:
    """Run a task in the caller's mode: grad and inference mode are per thread (the pool's
    default is grad on, inference off), and an output tensor the caller made under
    torch.inference_mode() may only be written in inference mode."""
    with torch.inference_mode(inference), torch.no_grad():
        task()


def grad_input(dy: torch.Tensor, bsm: BlockSparseMatrix) -> torch.Tensor:
    """dX = dY·W for dy (M, R); returns (M, C). The native kernel over the transposed
    index where it runs (row-major dX); else block-rows of W are the column panels of
    Wᵀ, forward's scheme through the row pointers (dX's transposed view)."""
    if dy.dim() != 2 or dy.shape[1] != bsm.shape[0]:
        raise ValueError(f"expected dy of shape (M, {bsm.shape[0]}), got {tuple(dy.shape)}")
    out_dtype, cd = dy.dtype, compute_dtype(dy.dtype)
    (R, C), (r, c), (gr, gc) = bsm.shape, bsm.block, bsm.grid
    M = dy.shape[0]
    if bsm.density <= NATIVE_MAX_DENSITY and native.supports(c, dy.dtype, dy.device):
        return native.grad_input(dy, bsm.values, "row", bsm.tcrow, bsm.trow, bsm.tperm, bsm.shape)
    dxt = torch.empty(gc, c, M, dtype=cd, device=dy.device)
    panels = bsm.values.detach().to(cd).transpose(1, 2).reshape(bsm.nnz * c, r)   # Wᵀ blocks
    accumulate_panels(dxt, None, panels, dy.detach().to(cd).t(), bsm.crow, bsm.col, c, r)
    return dxt.view(gc * c, M)[:C].t().to(out_dtype)


def grad_values(dy: torch.Tensor, x: torch.Tensor, bsm: BlockSparseMatrix) -> torch.Tensor:
    """dW on the support only: (nnz, r, c), block p = dY[:, rows_p]ᵀ · X[:, cols_p].
    One GEMM per block-row against its gathered live column slabs; the threads take
    block-rows from a shared counter (their outputs are disjoint)."""
    out_dtype, cd = bsm.values.dtype, compute_dtype(dy.dtype)
    (R, C), (r, c), (gr, gc) = bsm.shape, bsm.block, bsm.grid
    M = dy.shape[0]
    dv = torch.empty(bsm.nnz, r, c, dtype=cd, device=dy.device)
    if bsm.nnz:
        dyt = _token_minor(dy.detach(), gr * r, cd)
        xb = _token_minor(x.detach(), gc * c, cd).view(gc, c, M)
        col, rc = bsm.col.long(), bsm.crow.tolist()
        todo = itertools.count()
        parts = thread_parts(2.0 * M * bsm.nnz * r * c, gr)
        _run_parallel([lambda: _grad_rows(dv, dyt, xb, col, rc, todo, r, c)] * parts)
    return dv.to(out_dtype)


def _grad_rows(dv, dyt, xb, col, rc, todo, r, c) -> None:
    """One thread's share of grad_values: block-rows from `todo` until none is left."""
    M, rows = dyt.shape[1], len(rc) - 1
    for i in _claim(todo, rows):
        a, e = rc[i], rc[i + 1]
        if a == e:
            continue
        xs = xb[col[a:e]].view((e - a) * c, M)                       # live column slabs
        g = torch.mm(dyt[i * r:(i + 1) * r], xs.t())                 # (r, k·c)
        dv[a:e] = g.view(r, e - a, c).transpose(0, 1)
