"""The lowering backends planc knows: one record each, read by the op, the lower pass,
the cost model and the plan schema.

A record says where a backend's kernels live (a module with `forward`, `grad_input`
and `grad_values` over a BlockSparseMatrix), which devices it serves and whether it can
run on a given one, which cost model predicts it (kernels/cost.py), how a lowered layer
stores its kept blocks for it ("row": block-row order; "col": grouped by block-column,
what the CPU forward reads), and whether its forward returns Yᵀ's transposed view. The
plan's `lower.backend` also takes two names that are not kernels: "auto" (the backend
whose `auto_for` lists the weights' device type) and "dense" (lower nothing: report
only). Adding a backend is one record here and its kernel module (docs/architecture.md).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

AUTO, NONE = "auto", "dense"       # plan names that are not kernels: pick by device; lower nothing


def _triton_unavailable(device: torch.device) -> Optional[str]:
    if device.type == "cuda":
        return None
    try:
        interpret = importlib.import_module("planc.kernels.triton_bsr").INTERPRET
    except ImportError:
        return "backend 'triton' needs the triton package"
    return None if interpret else "backend 'triton' needs CUDA weights (or TRITON_INTERPRET=1)"


@dataclass(frozen=True)
class Backend:
    name: str
    kernels: str                                       # module with forward, grad_input, grad_values
    cost: str                                          # the cost model that predicts it (kernels/cost.py)
    values_order: str                                  # how a lowered layer stores its kept blocks
    transposed_output: bool                            # forward returns Yᵀ's transposed view
    auto_for: Tuple[str, ...] = ()                     # device types "auto" picks it for
    unavailable: Callable[[torch.device], Optional[str]] = lambda device: None   # why it cannot run there

    def module(self):
        """The kernel module. Imported on first use: importing Triton's kernels sets them
        up, and whether they run in its interpreter is read then."""
        return importlib.import_module(self.kernels)


_RECORDS = (
    Backend(name="triton", kernels="planc.kernels.triton_bsr", cost="triton", values_order="row",
            transposed_output=False, auto_for=("cuda",), unavailable=_triton_unavailable),
    Backend(name="cpu", kernels="planc.kernels.cpu", cost="cpu", values_order="col", transposed_output=True,
            auto_for=("cpu",)),
)
BACKENDS: Dict[str, Backend] = {b.name: b for b in _RECORDS}
PLAN_NAMES: Tuple[str, ...] = (AUTO, *BACKENDS, NONE)         # what `lower.backend` accepts


def resolve(name: str, device: torch.device) -> Backend:
    """The backend a plan name means for tensors on `device` (ValueError for a name that
    is not a backend, or "dense", which lowers nothing)."""
    if name == AUTO:
        for backend in _RECORDS:
            if device.type in backend.auto_for:
                return backend
        raise ValueError(f"no backend serves device {device.type!r}")
    if name not in BACKENDS:
        raise ValueError(f"expected a backend in {PLAN_NAMES[:-1]}, got {name!r}")
    return BACKENDS[name]
