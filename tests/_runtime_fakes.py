"""Helpers for the runtime/method tests: build resolved plans from the dataclasses, and a
small stand-in for planc.compile's Pruned (BlockMasks applied with torch's
parametrize), so the runtime can be tested on its own contract."""
from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Dict, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize

from planc.mask import BlockMask, clip_range
from planc.plan.types import Method, Phase, Plan, Schedule, TargetSettings, Targets
from planc.runtime.access import RuntimeAccess

MODE = {"sequential_attention_pp": "attention", "powerprop": "powerprop"}


def phases(*specs) -> tuple:
    """phases(("dense", 10), ("sparsify", 5, {"c": 4}), ...) -> contiguous Phase tuple."""
    out, start = [], 0
    for spec in specs:
        kind, steps = spec[0], spec[1]
        extra = spec[2] if len(spec) > 2 else {}
        out.append(Phase(kind=kind, start=start, steps=steps, **extra))
        start += steps
    return tuple(out)


def make_plan(method: str = "sequential_attention_pp", schedule=(), block=(4, 4), sparsity=0.5,
              **method_kw) -> Plan:
    return Plan(
        targets=Targets(defaults=TargetSettings(block=tuple(block), sparsity=sparsity, min_blocks=1)),
        method=Method(name=method, **method_kw),
        schedule=Schedule(phases=tuple(schedule)),
    )


class FakePruned(RuntimeAccess):
    def __init__(self, model: nn.Module, plan: Plan, layers: Sequence[str],
                 sparsity: Dict[str, float] | None = None):
        self.module = model
        self.plan = plan
        m = plan.method
        self.masks = {}
        sp = sparsity or {}
        for name in layers:
            lin = model.get_submodule(name)
            mode = MODE.get(m.name, "support")
            clip = clip_range(m.clip, sp.get(name, plan.targets.defaults.sparsity)) if mode == "attention" else None
            mask = BlockMask(tuple(lin.weight.shape), plan.targets.defaults.block, mode, clip=clip, alpha=m.alpha,
                             granularity=m.granularity)
            parametrize.register_parametrization(lin, "weight", mask)
            self.masks[name] = mask
        sp = sparsity or {}
        self.targets = tuple(SimpleNamespace(name=n, sparsity=sp.get(n, plan.targets.defaults.sparsity))
                             for n in layers)
        self.runtime = None

    def weight(self, name: str) -> nn.Parameter:
        return self.module.get_submodule(name).parametrizations.weight.original

    def bake(self) -> nn.Module:
        baked = copy.deepcopy(self.module)
        for name in self.masks:
            parametrize.remove_parametrizations(baked.get_submodule(name), "weight", leave_parametrized=True)
        return baked


class MLP(nn.Module):
    def __init__(self, d_in=16, hidden=32, d_out=4):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, d_out)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def tiny(method="sequential_attention_pp", schedule=(), seed=0, **kw):
    torch.manual_seed(seed)
    plan = make_plan(method, schedule, **kw)
    return FakePruned(MLP(), plan, ["fc1", "fc2"])
