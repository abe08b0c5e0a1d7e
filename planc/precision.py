"""`train.precision`: the training forward under torch.autocast.

With `precision: bfloat16` the trainer runs the student's forward (and the teacher's,
when distilling) under `torch.autocast(device, torch.bfloat16)`: matrix products take
bfloat16 inputs, while the weights, their gradients, the optimizer state, the losses
and evaluation stay float32. Losses are computed on outputs cast back to float32
(`as_float`), so their sums do not round to bfloat16's 8 bits.

On the CPU, scaled_dot_product_attention runs on its math kernel under bfloat16: with
torch 2.13 the CPU flash-attention kernel's bfloat16 backward is the slower of the two at
the short sequences pruning runs distil on (a MiniLM step at 16 × 32 tokens: 234 ms
against 243, benchmarks/train_precision.py; docs/runtime.md, "Mixed precision").

`precision: auto` trains in bfloat16 where this machine multiplies it faster and in
float32 elsewhere (`choose`): on the CPU it times one product in both (bfloat16 must be
at least `AUTO_MARGIN` faster); on a GPU it takes bfloat16 where the device supports it.
Where bfloat16 cannot go (block-sparse kernels asked for with `sparse_kernels: true`,
FSDP) auto is float32. The trainer records the choice in report.json and in its
checkpoints, so a resumed run keeps the precision it began with.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Optional

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from planc import timing

PRECISIONS = ("float32", "bfloat16")       # what a run trains in; a plan may also say "auto"
AUTO_MARGIN = 1.1                          # auto takes bfloat16 when its product is at least 10% faster


def device_type(module: nn.Module) -> str:
    for p in module.parameters():
        return p.device.type
    return "cpu"


def autocast(precision: str, module: nn.Module) -> Callable[[], ContextManager]:
    """A factory of the context the training forward runs in (a fresh one per use)."""
    if precision == "float32":
        return contextlib.nullcontext
    if precision != "bfloat16":
        raise ValueError(f"expected precision in {PRECISIONS}, got {precision!r}")
    device = device_type(module)

    @contextlib.contextmanager
    def context():
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast(device, dtype=torch.bfloat16))
            if device == "cpu":
                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            yield

    return context


def bfloat16_speedup(repeats: int = 7) -> float:
    """float32's time over bfloat16's for one matrix product the size of a MiniLM
    feed-forward layer's at 16 × 32 tokens (512 × 384 by 384 × 1536), on this CPU at the
    current thread count, timed interleaved: above 1, bfloat16 products are the faster."""
    g = torch.Generator().manual_seed(0)            # the global generator, which seeds the run, stays untouched
    a32, b32 = torch.randn(512, 384, generator=g), torch.randn(384, 1536, generator=g)
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    ms = timing.interleaved({"float32": lambda: a32 @ b32, "bfloat16": lambda: a16 @ b16}, repeats)
    return ms["float32"] / ms["bfloat16"]


@dataclass(frozen=True)
class Choice:
    """What `precision: auto` decided, and why (report.json's `precision`)."""
    chosen: str
    reason: str
    bfloat16_speedup: Optional[float] = None

    def record(self, setting: str) -> dict:
        return {"setting": setting, "chosen": self.chosen, "reason": self.reason,
                "bfloat16_speedup": None if self.bfloat16_speedup is None else round(self.bfloat16_speedup, 3)}


def choose(device: str, *, sparse_kernels=False, fsdp: bool = False,
           speedup: Optional[Callable[[], float]] = None) -> Choice:
    """`precision: auto` on this machine: bfloat16 where its products are the faster, else
    float32. `speedup` measures bfloat16's speed against float32's (CPU only;
    default `bfloat16_speedup`)."""
    if sparse_kernels is True:
        return Choice("float32", "schedule.sparse_kernels true: the block-sparse kernels train in float32")
    if fsdp:
        return Choice("float32", "train.distributed fsdp does not train in bfloat16")
    if device == "cuda":
        if torch.cuda.is_bf16_supported():
            return Choice("bfloat16", "this GPU supports bfloat16")
        return Choice("float32", "this GPU does not support bfloat16")
    if device != "cpu":
        return Choice("float32", f"bfloat16 is not measured on {device} devices")
    ratio = (speedup or bfloat16_speedup)()
    faster = ratio >= AUTO_MARGIN
    said = f"bfloat16 products run at {ratio:.2f}x the float32 speed on this CPU"
    if faster:
        return Choice("bfloat16", said, ratio)
    return Choice("float32", f"{said}, under the {AUTO_MARGIN:.1f}x auto asks for", ratio)


def slower_on_this_cpu(precision: str, module: nn.Module) -> Optional[float]:
    """bfloat16's speed against float32's (`bfloat16_speedup`) when bfloat16 is asked for on
    the CPU and its products are the slower there; else None.

    Measured, not read off the CPU's flags: besides CPUs without bfloat16 instructions,
    where the products are emulated, an Intel Xeon that lists AVX512-BF16 but whose
    hypervisor hides AMX runs them at 0.6x float32's speed (docs/runtime.md)."""
    if precision != "bfloat16" or device_type(module) != "cpu":
        return None
    ratio = bfloat16_speedup()
    return ratio if ratio < 1.0 else None


def as_float(value: Any) -> Any:
    """A reduced-precision floating tensor as float32; anything else unchanged (a float32
    tensor is returned as it is, so a float32 run computes exactly what it did before)."""
    if isinstance(value, torch.Tensor) and value.dtype in (torch.bfloat16, torch.float16):
        return value.float()
    return value
