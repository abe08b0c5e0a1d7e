"""Small models, plans and checks shared by the pass tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils import _pytree as pytree

from planc.plan.types import Match, Method, Plan, Rule, TargetSettings, Targets


def plan(block=(4, 4), sparsity=0.5, min_blocks=1, rules=(), method="sequential_attention_pp", **method_kw) -> Plan:
    rules = tuple(Rule(index=i, **r) if isinstance(r, dict) else r for i, r in enumerate(rules))
    return Plan(targets=Targets(defaults=TargetSettings(block=block, sparsity=sparsity, min_blocks=min_blocks), rules=rules),
                method=Method(name=method, **method_kw))


def skip_last(**kw) -> Plan:
    return plan(rules=({"match": Match(position="last"), "skip": True},), **kw)


class Functional(nn.Module):
    """F.linear with a bare parameter, a shared-weight use and a grouped conv."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 6))
        self.b1 = nn.Parameter(torch.randn(8))
        self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.out = nn.Linear(8, 3)

    def forward(self, x, img):
        h = F.linear(x, self.w1, self.b1).relu()
        c = self.conv(img).mean(dim=(2, 3))
        return self.out(h) + c[:, :3]


class Conv1DStyle(nn.Module):
    """GPT-2's Conv1D: the weight stored (in, out), applied as addmm(b, x, W); and
    Falcon's x @ W.T as a matmul."""

    def __init__(self, n_in=8, n_out=12):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out))
        self.bias = nn.Parameter(torch.randn(n_out))
        self.proj = nn.Parameter(torch.randn(n_out, n_out))     # stored (out, in)

    def forward(self, x):
        h = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)
        return torch.matmul(h, self.proj.t())



def outputs(x):
    leaves, _ = pytree.tree_flatten(x)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def max_diff(a, b) -> float:
    return max(float((x.float() - y.float()).abs().max()) if x.numel() else 0.0 for x, y in zip(outputs(a), outputs(b)))


def run(module, *args, seed=0, **kwargs):
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return module(*args, **kwargs)


def prune_half(masks, seed=0):
    g = torch.Generator().manual_seed(seed)
    for m in masks.values():
        alive = torch.rand(m.view.grid, generator=g) < 0.5
        alive.view(-1)[0] = True
        m.alive.copy_(alive)
