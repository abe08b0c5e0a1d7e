"""The native CPU block-sparse product (kernels/native.c): built on first use with the
machine's C compiler, loaded with ctypes, called from kernels/cpu.py's "native" strategy.

Why not a torch C++ extension: that needs ninja and compiles torch's headers (a minute
and more); this is one C file, built in about a second. It splits the tokens over
OpenMP threads, and since the library's libgomp is found by soname, the one torch has
loaded serves it: the threads are torch's own, not a second pool competing with them
for the cores.

The library is built for the CPU at hand (-march=native) and cached under
`$PLANC_NATIVE_CACHE`, else `$XDG_CACHE_HOME/planc/native` (`~/.cache/planc/native`),
named by a digest of the source, the compiler's version, the flags and the CPU's flags,
so a changed source, compiler or machine builds anew. The build writes a temporary file
and renames it: two processes building at once both end with a whole library.

It imports nothing of planc but planc.cache_dir (planc.blocks calls it for the training
mask, and the kernels import planc.blocks).

Not available — and every caller falls back to the torch formulations — when
`PLANC_NATIVE=0`, when there is no C compiler (`$CC`, cc, gcc or clang), when the build
fails, or off Linux/macOS; `why_unavailable()` says which.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import weakref
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from planc.cache_dir import user_cache_dir

SOURCE = Path(__file__).with_name("native.c")
# Below this many multiply-adds ×2 a product runs on one thread: an OpenMP hand-off costs
# a few microseconds, a 64-token product of a few kept 32×32 blocks about as much
# (kernels/cost.py's model of the kernel reads it too).
MIN_FLOPS_TO_SPLIT = 4e6
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fPIC", "-shared", "-std=gnu11"]
_reason: Optional[str] = None


def cache_dir() -> Path:
    value = os.environ.get("PLANC_NATIVE_CACHE")
    if value:
        return Path(value).expanduser()
    return user_cache_dir() / "native"


def _compiler() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _cpu_flags() -> str:
    """What -march=native depends on: the CPU's feature flags (Linux), else its name."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(cc: str, target: Path, flags=FLAGS) -> None:
    """Compile with OpenMP (torch's libgomp serves it at run time); a compiler without
    OpenMP builds it single-threaded."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        for extra in (["-fopenmp"], []):
            done = subprocess.run([cc, *flags, *extra, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                                  timeout=120)
            if done.returncode == 0:
                break
        if done.returncode != 0:
            raise OSError(f"{Path(cc).name} failed: {' '.join(done.stderr.split())[:300]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@functools.lru_cache(maxsize=1)
def library() -> Optional[ctypes.CDLL]:
    """The loaded library, built first if needed; None when unavailable (see why_unavailable)."""
    global _reason
    if os.environ.get("PLANC_NATIVE", "1") == "0":
        _reason = "turned off by PLANC_NATIVE=0"
        return None
    if platform.system() not in ("Linux", "Darwin"):
        _reason = f"not built on {platform.system()}"
        return None
    cc = _compiler()
    if cc is None:
        _reason = "no C compiler found ($CC, cc, gcc, clang)"
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(FLAGS), _cpu_flags(),
                                        platform.machine()]).encode()).hexdigest()[:20]
        target = cache_dir() / f"planc_native_{key}.so"
        if not target.is_file():
            _build(cc, target)
        try:
            return load(target)
        except OSError:                      # a damaged file in the cache: build it again
            _build(cc, target)
            return load(target)
    except (OSError, subprocess.SubprocessError) as err:
        _reason = f"build failed: {err}"
        return None


def load(path: Path) -> ctypes.CDLL:
    """A built library, its functions' signatures declared."""
    lib = ctypes.CDLL(str(path))
    vp, lg, it = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    lib.planc_bsr_rows_f32.argtypes = [vp, lg, lg, lg, lg, vp, vp, vp, lg, it, it, vp, vp, lg, lg, it]
    lib.planc_bsr_rows_f32.restype = it
    lib.planc_native_supports.argtypes = [it]
    lib.planc_native_supports.restype = it
    lib.planc_native_vector_width.restype = it
    lib.planc_scale_blocks_f32.argtypes = [vp, vp, vp, lg, lg, it, it, it]
    lib.planc_scale_blocks_f32.restype = None
    lib.planc_scale_blocks_backward_f32.argtypes = [vp, vp, vp, vp, vp, lg, lg, it, it, it]
    lib.planc_scale_blocks_backward_f32.restype = None
    return lib


def why_unavailable() -> Optional[str]:
    """None when the native kernel is available, else the reason in a few words."""
    return None if library() is not None else _reason


def supports(r: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the native kernel computes a layer with output blocks of r rows on x of
    this dtype and device (fp32 on the CPU; r a multiple of the build's vector width)."""
    lib = library() if device.type == "cpu" and dtype == torch.float32 else None
    return lib is not None and bool(lib.planc_native_supports(int(r)))


# The kept blocks as the kernel reads them, per layer and product: a layer's values change
# only when trained, and repacking a 4096² layer's blocks cost as much as a third of its
# product. Keyed by the tensor's identity and the product; an entry is used only while
# the tensor lives (a weak reference), still holds the same storage and has not been
# written since (its version counter), and dropped when the tensor is freed. A write that
# bypasses the version counter (through `.data`, or a NumPy view) is not seen: planc makes
# none; code that does must not expect a lowered layer to follow it.
_PACKED: Dict[Tuple[int, str], Tuple[Any, ...]] = {}


def _packed(values: torch.Tensor, order: str, tperm: torch.Tensor, product: str) -> torch.Tensor:
    """`product` "forward": each block transposed (c × r), in block-row order; "grad_input":
    each block as stored (r × c), in block-column order (the transposed index's)."""
    try:
        stamp = (values.data_ptr(), values._version, order, tperm.data_ptr())
    except RuntimeError:                     # an inference tensor keeps no version: no cache
        stamp = None
    key = (id(values), product)
    hit = _PACKED.get(key)
    if stamp is not None and hit is not None and hit[0]() is values and hit[1] == stamp:
        return hit[2]
    with torch.no_grad():
        v = values.detach().float()
        if product == "forward":
            row_order = v if order == "row" else v[torch.argsort(tperm.long())]   # argsort: the inverse permutation
            packed = row_order.transpose(1, 2).contiguous()
        else:
            packed = (v[tperm.long()] if order == "row" else v).contiguous()
    if stamp is not None:
        if hit is None or hit[0]() is not values:
            weakref.finalize(values, _PACKED.pop, key, None)
        _PACKED[key] = (weakref.ref(values), stamp, packed)
    return packed


def _product(x: torch.Tensor, packed: torch.Tensor, ptr: torch.Tensor, idx: torch.Tensor, groups: int,
             width_out: int, width_in: int, n_in: int, n_out: int, bias: Optional[torch.Tensor],
             layout: str) -> torch.Tensor:
    """out[t, g·w_out:(g+1)·w_out] = bias_g + Σ_b x[t, idx_b·w_in:(idx_b+1)·w_in] · packed_b over
    the blocks b of output group g (ptr[g] to ptr[g+1]); x (M, n_in), out (M, n_out)."""
    M = x.shape[0]
    x = x.detach()
    in_groups = -(-n_in // width_in)
    if in_groups * width_in != n_in:                         # a partial last input group
        x = F.pad(x, (0, in_groups * width_in - n_in))
    b = None if bias is None else F.pad(bias.detach().float(), (0, groups * width_out - n_out)).contiguous()
    ptr, idx = ptr.contiguous().long(), idx.contiguous().long()
    if layout == "c":
        y = torch.empty(M, groups * width_out, dtype=torch.float32)
        y_t, y_o = groups * width_out, 1
    else:
        y = torch.empty(groups * width_out, M, dtype=torch.float32)
        y_t, y_o = 1, M
    if M:
        # torch's threads (the kernel splits tokens, or block-rows when the tokens are few);
        # one thread for a product too small to pay for waking another
        threads = torch.get_num_threads() if 2 * M * packed.numel() >= MIN_FLOPS_TO_SPLIT else 1
        status = library().planc_bsr_rows_f32(x.data_ptr(), x.stride(0), x.stride(1), 0, M, packed.data_ptr(),
                                              ptr.data_ptr(), idx.data_ptr(), groups, width_out, width_in,
                                              None if b is None else b.data_ptr(), y.data_ptr(), y_t, y_o, threads)
        if status != 0:
            raise ValueError(f"the native kernel does not handle {width_out}-wide blocks in this build")
    if layout == "c":
        return y if groups * width_out == n_out else y[:, :n_out].contiguous()
    return y[:n_out].t()


def forward(x: torch.Tensor, values: torch.Tensor, order: str, crow: torch.Tensor, col: torch.Tensor,
            tperm: torch.Tensor, bias: Optional[torch.Tensor], shape, layout: str = "c") -> torch.Tensor:
    """Y = x·Wᵀ + bias for x (M, C) fp32 on the CPU, any strides. `values` (nnz, r, c) the
    kept blocks stored in `order` ("row", or "col" with `tperm` the row→column
    permutation, kernels/format.py), crow/col the block-row index. `layout` "c" returns Y
    row-major, "t" Yᵀ's transposed view (what the other CPU paths return). The caller
    checks `supports(r, ...)` first."""
    (R, C), (r, c) = (int(v) for v in shape), (int(values.shape[1]), int(values.shape[2]))
    return _product(x, _packed(values, order, tperm, "forward"), crow, col, -(-R // r), r, c, C, R, bias, layout)


def grad_input(dy: torch.Tensor, values: torch.Tensor, order: str, tcrow: torch.Tensor, trow: torch.Tensor,
               tperm: torch.Tensor, shape) -> torch.Tensor:
    """dX = dY·W for dy (M, R), row-major (M, C): the same kernel over the transposed index
    (a block-column of W gives a column block of dX; each block W_ij read as stored, its
    r rows the inputs). The caller checks `supports(c, ...)` first."""
    (R, C), (r, c) = (int(v) for v in shape), (int(values.shape[1]), int(values.shape[2]))
    return _product(dy, _packed(values, order, tperm, "grad_input"), tcrow, trow, -(-C // c), c, r, R, C, None, "c")


# ---- the training mask: W ⊙ expand(S) (planc/blocks.py's _ScaleBlocks) ------------------
def scales_blocks(weight: torch.Tensor, grid: torch.Tensor) -> bool:
    """Whether the native kernel computes the block scale of this weight and grid: fp32,
    on the CPU, contiguous, a plain tensor (not a DTensor shard)."""
    return (weight.dtype == grid.dtype == torch.float32 and weight.device.type == grid.device.type == "cpu"
            and weight.is_contiguous() and grid.is_contiguous() and library() is not None)


def scale_blocks(weight: torch.Tensor, grid: torch.Tensor, block) -> torch.Tensor:
    """weight ⊙ expand(grid) for a weight its (r, c) blocks tile exactly."""
    (gr, gc), (r, c) = grid.shape, block
    out = torch.empty_like(weight)
    library().planc_scale_blocks_f32(weight.data_ptr(), grid.data_ptr(), out.data_ptr(), gr, gc, r, c,
                                     torch.get_num_threads())
    return out


def scale_blocks_backward(grad: torch.Tensor, weight: torch.Tensor, grid: torch.Tensor, block,
                          want_weight: bool) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """(grad ⊙ expand(grid) or None, the grid's gradient: each block's ⟨grad_b, weight_b⟩),
    in one pass over grad and weight."""
    (gr, gc), (r, c) = grid.shape, block
    grad = grad.contiguous()
    grad_grid = torch.empty_like(grid)
    grad_weight = torch.empty_like(weight) if want_weight else None
    library().planc_scale_blocks_backward_f32(grad.data_ptr(), weight.data_ptr(), grid.data_ptr(),
                                              None if grad_weight is None else grad_weight.data_ptr(),
                                              grad_grid.data_ptr(), gr, gc, r, c, torch.get_num_threads())
    return grad_weight, grad_grid
