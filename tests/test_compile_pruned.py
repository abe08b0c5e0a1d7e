"""planc.compile and the Pruned object; planc.explain's layer report."""
import importlib
import pytest
import torch

import planc
from planc.pruned import Pruned
from planc.errors import PassError, SelectError
from planc.examples.digits import mlp
from planc.explain import layer_report
from planc.mask import BlockMask
from planc.plan.types import Factory, Match, ModelSpec, Plan

from _passes_helpers import max_diff, plan, prune_half, run, skip_last


def test_compile_returns_a_pruned_with_the_contract():
    model = mlp(hidden=32)
    p = planc.compile(model, skip_last(), torch.randn(8, 64))
    importlib.import_module("planc.pruned")  # importing the module must not shadow planc.compile(...)
    p2 = planc.compile(model, skip_last(), torch.randn(8, 64))
    assert isinstance(p, Pruned) and isinstance(p2, Pruned) and callable(planc.compile)
    assert [t.name for t in p.targets] == ["layers.0", "layers.2", "head"]
    assert list(p.masks) == ["layers.0", "layers.2"] and all(isinstance(m, BlockMask) for m in p.masks.values())
    w = p.weight("layers.2")
    assert isinstance(w, torch.nn.Parameter) and w is p.module.get_parameter("layers.2.weight")
    with pytest.raises(KeyError, match="no masked layer named 'head'"):
        p.weight("head")
    table = p.table()
    assert table.splitlines()[0].split() == ["layer", "op", "weight", "block", "grid", "blocks", "sparsity", "kept",
                                             "alive", "rule", "/", "skip", "reason"]
    assert "skipped by targets.rules[0]" in table and "512" not in table


def test_bake_leaves_the_pruned_usable():
    p = planc.compile(mlp(hidden=32), skip_last(), torch.randn(8, 64))
    prune_half(p.masks)
    x = torch.randn(3, 64)
    y = run(p.module, x)
    baked = p.bake()
    assert max_diff(run(baked, x), y) <= 1e-6
    assert max_diff(run(p.module, x), y) == 0 and len(p.masks) == 2
    assert not any(isinstance(m, BlockMask) for m in baked.modules())


def test_compile_errors_name_the_pass():
    with pytest.raises(SelectError) as err:
        planc.compile(mlp(hidden=8), plan(rules=({"match": Match(name="nothing.*")},)), torch.randn(2, 64))
    assert isinstance(err.value, PassError) and str(err.value).startswith("pass select (after trace): targets.rules[0]")


def test_runtime_delegations_are_lazy(monkeypatch):
    import planc.runtime.access

    calls = []

    class FakeRuntime:
        def __init__(self, plan, module, masks, weight, targets):
            calls.append(plan)
            self.events, self.phase = ["e"], "dense"

        def param_groups(self, **kw):
            return [kw]

        def step(self):
            return "stepped"

    monkeypatch.setattr(planc.runtime.access, "Runtime", FakeRuntime)
    p = planc.compile(mlp(hidden=8), skip_last(), torch.randn(2, 64))
    assert p.runtime is None
    assert p.param_groups(lr=0.1) == [{"lr": 0.1}] and p.step() == "stepped"
    assert (p.events, p.phase, len(calls)) == (["e"], "dense", 1)


def test_layer_report_digits():
    p = Plan(name="digits", model=ModelSpec(factory=Factory("planc.examples.digits:mlp", (("hidden", 64),)),
                                            example_inputs=((16, 64),)),
             targets=skip_last(block=(16, 16), sparsity=0.75).targets)
    text = layer_report(p, show_graph=True)
    assert "layers.2  linear  64x64   16x16  4x4   16      0.75      4" in text
    assert "3 weight layers: 2 pruned, 1 dense" in text
    assert "parameters: 8.97k before" in text and "FLOPs per example input:" in text
    assert "rewritten graph:" in text and "planc_masks.layers_0" in text
