"""Keep freed memory in the process while planc trains, so large tensors do not page-fault.

A training step with planc's masks allocates and frees a few weight-sized tensors (the
masked weight, its gradient) that a plain step does not. With glibc's default malloc a
freed block of more than a few MB goes back to the kernel (munmap, or a trim of the heap
top) and the next step's allocation of the same size faults every 4 KB page in again:
measured on issue 16's MLP (2048×2048 layer), about 10,000 minor faults a step, about
a third of an SA++ dense-phase step at batch 64. `keep_freed_memory()` tells glibc to
serve large blocks from its heap and to keep freed ones (the same policy as PyTorch's
CUDA caching allocator, or jemalloc/tcmalloc, which PyTorch's CPU performance guide
recommends); the process then holds on to its peak heap instead of returning it.

The runtime calls it when training starts (`Pruned.attach`), once per process; set
`PLANC_KEEP_FREED_MEMORY=0` to leave malloc alone. Not glibc (macOS, musl, Windows), or
another allocator preloaded: nothing to do, and nothing is changed.
"""
from __future__ import annotations

import ctypes
import os

ENV = "PLANC_KEEP_FREED_MEMORY"
# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Blocks up to this size come from the heap, and up to this much free heap top is kept.
# Larger than any weight planc masks on a CPU in practice (256M fp32 elements).
_KEEP_BYTES = 1 << 30

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Set glibc's mmap and trim thresholds so freed large blocks stay in the process.
    Returns whether the setting is in effect. Idempotent; honours PLANC_KEEP_FREED_MEMORY=0."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    libc = _glibc()
    if libc is None:
        return False
    mmap_ok = libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)
    trim_ok = libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES)
    _applied = bool(mmap_ok and trim_ok)
    return _applied


def _glibc():
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version           # only glibc has it; mallopt means something else elsewhere
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError):
        return None
