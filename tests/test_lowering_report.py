"""planc.lowering: the last step of `planc apply` lowers, checks and times the baked model."""
import dataclasses

import torch

import planc
from planc.examples.digits import mlp
from planc.lowering import lower_and_measure
from planc.plan.types import Lower, Match, Plan, Rule, TargetSettings, Targets


def _baked(hidden=256, sparsity=0.9):
    plan = Plan(targets=Targets(defaults=TargetSettings(block=(32, 32), sparsity=sparsity, min_blocks=1),
                                rules=(Rule(match=Match(position="last"), skip=True),)))
    pruned = planc.compile(mlp(hidden=hidden), plan, torch.randn(8, 64), check=False)
    g = torch.Generator().manual_seed(0)
    for mask in pruned.masks.values():
        alive = torch.rand(mask.view.grid, generator=g) > sparsity
        alive.view(-1)[0] = True
        mask.alive.copy_(alive)
    return plan, pruned.bake().eval()


def test_every_pruned_layer_lowered_matches_the_baked_model_and_is_timed():
    plan, baked = _baked()
    plan = dataclasses.replace(plan, lower=Lower(backend="cpu", min_speedup=0.0))
    inputs = (torch.randn(48, 64),)
    summary = lower_and_measure(baked, plan, inputs, repeats=3)
    actions = {r["layer"]: r["action"] for r in summary["layers"]}
    assert actions == {"layers.0": "lowered", "layers.2": "lowered", "head": "dense"}
    assert summary["lowered_layers"] == 2
    assert summary["max_rel_error"] <= 1e-5
    assert summary["baked_ms"] > 0 and summary["lowered_ms"] > 0
    assert abs(summary["speedup"] - summary["baked_ms"] / summary["lowered_ms"]) < 1e-9


def test_a_plan_that_lowers_nothing_reports_no_timing():
    plan, baked = _baked()
    plan = dataclasses.replace(plan, lower=Lower(backend="cpu", min_speedup=1e9))
    summary = lower_and_measure(baked, plan, (torch.randn(8, 64),), repeats=3)
    assert summary["lowered_layers"] == 0 and "speedup" not in summary
    assert all(r["action"] == "dense" for r in summary["layers"])


def test_a_lowering_that_slows_the_whole_model_is_kept_dense(monkeypatch):
    # Layers timed faster alone (here: any, min_speedup 0.5 and a stubbed per-layer timing)
    # but the whole model measured slower: the report says so and lowers nothing.
    from planc import lowering
    from planc.passes import lower as lower_module

    monkeypatch.setattr(lower_module, "_measure_linear", lambda module, weight, bias, tokens: 2.0)
    # baked 1 ms, lowered 4 ms (planc.timing's interleaved medians)
    monkeypatch.setattr(lowering, "interleaved", lambda fns, repeats: {"baked": 1.0, "lowered": 4.0})
    plan, baked = _baked()
    plan = dataclasses.replace(plan, lower=Lower(backend="cpu", min_speedup=0.5))
    summary = lower_and_measure(baked, plan, (torch.randn(48, 64),), repeats=3)
    assert summary["speedup"] == 0.25 and summary["lowered_layers"] == 0
    assert summary["kept_dense"] == "the whole lowered model measured 0.25x < min_speedup 0.5: kept dense"
    rows = {r["layer"]: r for r in summary["layers"]}
    for name in ("layers.0", "layers.2"):
        assert rows[name]["action"] == "dense" and rows[name]["measured_speedup"] == 2.0
        assert rows[name]["reason"].startswith("the whole lowered model measured 0.25x")
