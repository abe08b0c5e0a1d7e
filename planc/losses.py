"""The built-in trainer's task losses (train.loss), shared by the trainer and distillation."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from planc.errors import PlancError, PlanError, Problem
from planc.plan.factory import describe_value


def compute_loss(kind: str, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise PlancError(f"the model returned {describe_value(out)}; the built-in trainer needs a tensor of predictions "
                         "(wrap the model so its forward returns the logits, or train it in your own loop)")
    if kind == "cross_entropy":
        return F.cross_entropy(out, y)
    if kind == "mse":
        return F.mse_loss(out, y.to(out.dtype).view_as(out))
    raise PlanError([Problem(f"expected loss cross_entropy or mse, got {kind!r}", path="train.loss")])
