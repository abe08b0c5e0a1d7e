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
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

PRECISIONS = ("float32", "bfloat16")


def _device_type(module: nn.Module) -> str:
    for p in module.parameters():
        return p.device.type
    return "cpu"


def autocast(precision: str, module: nn.Module) -> Callable[[], ContextManager]:
    """A factory of the context the training forward runs in (a fresh one per use)."""
    if precision == "float32":
        return contextlib.nullcontext
    if precision != "bfloat16":
        raise ValueError(f"expected precision in {PRECISIONS}, got {precision!r}")
    device = _device_type(module)

    @contextlib.contextmanager
    def context():
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.autocast(device, dtype=torch.bfloat16))
            if device == "cpu":
                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            yield

    return context


def slow_on_this_cpu(precision: str, module: nn.Module) -> bool:
    """True when bfloat16 is asked for on a CPU that oneDNN says has no bfloat16 matrix
    instructions (AVX512-BF16 or AMX): there its products are emulated, slower than float32."""
    if precision != "bfloat16" or _device_type(module) != "cpu":
        return False
    try:
        return not torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):      # a build without oneDNN: nothing known either way
        return False


def as_float(value: Any) -> Any:
    """A reduced-precision floating tensor as float32; anything else unchanged (a float32
    tensor is returned as it is, so a float32 run computes exactly what it did before)."""
    if isinstance(value, torch.Tensor) and value.dtype in (torch.bfloat16, torch.float16):
        return value.float()
    return value
