"""train.precision (bfloat16 autocast of the training forward) and train.optimizer.fused."""
from __future__ import annotations

import os

import pytest
import torch

import planc
from planc import distill, precision
from planc.errors import PlanError
from planc.plan import dump_plan
from planc.runfolder import CHECKPOINT
from planc.train import make_optimizer, train
from test_distill import distill_section, plan_data


def _plan(**train_kw):
    return planc.load_plan(plan_data(**train_kw))


def test_the_distillers_loss_under_bfloat16_is_float32_and_close_to_the_float32_loss():
    torch.manual_seed(0)
    plan = _plan(dropout=False, distill=distill_section())
    model = __import__("planc.examples.digits", fromlist=["mlp"]).mlp(hidden=32, dropout=0.3)
    pruned = planc.compile(model, plan)
    d = distill.from_plan(plan, pruned)
    with torch.no_grad():                                     # the student moves away from its teacher
        for p in pruned.module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pruned.module.eval()                                      # no dropout: the two losses see one network
    x = torch.randn(32, 64)
    exact = d.loss(x)
    parts_exact = (d.parts.output, d.parts.hidden)
    mixed = d.loss(x, cast=precision.autocast("bfloat16", pruned.module))
    assert mixed.dtype == torch.float32
    # bfloat16 keeps 8 bits: the loss moves, by about its rounding and not more
    assert mixed.item() != exact.item()
    assert mixed.item() == pytest.approx(exact.item(), rel=0.05)
    assert all(a != b and b == pytest.approx(a, rel=0.05) for a, b in zip(parts_exact, (d.parts.output, d.parts.hidden)))
    mixed.backward()
    grads = [p.grad for p in pruned.module.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(g.dtype == torch.float32 for g in grads)


@pytest.mark.parametrize("with_distill", [False, True])
def test_a_bfloat16_run_trains_close_to_the_float32_run_and_keeps_float32_weights(with_distill):
    extra = {"dropout": False, "distill": distill_section()} if with_distill else {}
    f32 = train(_plan(steps=20, **extra), None, progress=False)
    b16 = train(_plan(steps=20, precision="bfloat16", **extra), None, progress=False)
    la, lb = f32.history[-1]["train_loss"], b16.history[-1]["train_loss"]
    assert la != lb and lb == pytest.approx(la, rel=0.2)
    assert b16.report["mean_sparsity"] == pytest.approx(0.75, abs=0.01)
    assert all(t.dtype == torch.float32 for t in b16.baked.state_dict().values() if t.is_floating_point())
    assert b16.report["sparse_kernels"]["setting"] == "auto"      # the plan's setting, as written
    assert b16.pruned.pruning_runtime().kernels.setting is False  # the float32 kernels stay off


def test_bfloat16_with_a_fused_optimizer_resumes_bitwise(tmp_path):
    data = plan_data(steps=24, dropout=False, checkpoint_every=7, precision="bfloat16", distill=distill_section())
    data["train"]["optimizer"] = {"name": "adamw", "lr": 0.01, "fused": True}
    plan = planc.load_plan(data)
    ref, part = str(tmp_path / "ref"), str(tmp_path / "part")
    assert train(plan, ref, progress=False).finished
    first = train(plan, part, progress=False, stop_after=10)
    assert not first.finished and os.path.isfile(os.path.join(part, CHECKPOINT))
    assert train(plan, part, resume=True, progress=False).finished
    a, b = planc.runfolder.state_dict(ref), planc.runfolder.state_dict(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name,extra", [("sgd", {"momentum": 0.9}), ("adam", {}), ("adamw", {})])
def test_fused_reaches_the_optimizer_and_is_off_by_default(name, extra):
    for fused in (False, True):
        data = plan_data()
        data["train"]["optimizer"] = {"name": name, "lr": 0.01, "fused": fused, **extra}
        plan = planc.load_plan(data)
        pruned = planc.compile(__import__("planc.examples.digits", fromlist=["mlp"]).mlp(hidden=32), plan)
        opt = make_optimizer(plan, pruned.pruning_runtime())
        assert bool(opt.defaults.get("fused")) is fused


def test_precision_and_fused_round_trip_and_their_mistakes_are_placed():
    data = plan_data(precision="bfloat16")
    data["train"]["optimizer"]["fused"] = True
    plan = planc.load_plan(data)
    assert plan.train.precision == "bfloat16" and plan.train.optimizer.fused is True
    assert planc.load_plan(dump_plan(plan)) == plan
    assert planc.load_plan(plan_data()).train.precision == "float32"
    text = dump_plan(plan)
    cases = [
        (text.replace("precision: bfloat16", "precision: float16"), "train.precision"),
        (text.replace("fused: true", "fused: 1"), "fused"),
        (text.replace("sparse_kernels: auto", "sparse_kernels: true"), "float32 only"),
        (text.replace("distributed: ddp", "distributed: fsdp"), "not supported"),
    ]
    for bad, message in cases:
        assert bad != text
        with pytest.raises(PlanError, match=message) as err:
            planc.load_plan(bad)
        assert ":" in str(err.value).splitlines()[0]                 # placed at a line and column


def test_bfloat16_on_a_cpu_whose_bfloat16_products_are_slower_is_said_to_be_slow(monkeypatch):
    # Measured, not read off the CPU flags: an Intel Xeon listing AVX512-BF16 under a
    # hypervisor hiding AMX runs bfloat16 products at 0.6x float32 (docs/runtime.md).
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    monkeypatch.setattr(precision, "bfloat16_speedup", lambda: 0.61)
    said = []
    train(_plan(steps=16, precision="bfloat16"), None, progress=False, stop_after=1, log=said.append)
    warned = [line for line in said if "bfloat16" in line]
    assert len(warned) == 1 and "0.61x the float32 speed" in warned[0] and "warning" in warned[0]
    said.clear()
    monkeypatch.setattr(precision, "bfloat16_speedup", lambda: 1.7)
    train(_plan(steps=16, precision="bfloat16"), None, progress=False, stop_after=1, log=said.append)
    assert not any("bfloat16" in line for line in said)


def test_a_float32_run_does_not_measure_bfloat16(monkeypatch):
    def measured():
        raise AssertionError("a float32 run measured bfloat16's speed")
    monkeypatch.setattr(precision, "bfloat16_speedup", measured)
    said = []
    train(_plan(steps=16), None, progress=False, stop_after=1, log=said.append)
    assert not any("bfloat16" in line for line in said)


def test_the_bfloat16_speed_measurement_leaves_the_global_generator_alone():
    torch.manual_seed(3)
    expected = torch.rand(4)
    torch.manual_seed(3)
    ratio = precision.bfloat16_speedup(repeats=1)
    assert ratio > 0 and ratio == ratio and ratio != float("inf")
    assert torch.equal(torch.rand(4), expected)             # the run's seeded draws are not shifted


# ---- precision: auto ---------------------------------------------------------------------
def _tensors_equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("speedup,chosen", [(1.47, "bfloat16"), (1.05, "float32"), (0.61, "float32")])
def test_auto_trains_in_the_precision_that_is_faster_here_and_says_which(monkeypatch, tmp_path, speedup, chosen):
    monkeypatch.setattr(precision, "bfloat16_speedup", lambda: speedup)
    extra = {"dropout": False, "distill": distill_section()}
    said = []
    auto = train(_plan(steps=16, precision="auto", **extra), str(tmp_path / "auto"), progress=False, log=said.append)
    same = train(_plan(steps=16, precision=chosen, **extra), str(tmp_path / "same"), progress=False)
    record = auto.report["precision"]
    assert record["setting"] == "auto" and record["chosen"] == chosen and record["bfloat16_speedup"] == speedup
    assert [line for line in said if "precision auto" in line] == [
        f"planc: train.precision auto: {chosen} ({record['reason']})"]
    assert f"{speedup:.2f}x" in record["reason"]
    # bitwise the run of the plan that names the chosen precision
    assert _tensors_equal(planc.runfolder.state_dict(str(tmp_path / "auto")),
                          planc.runfolder.state_dict(str(tmp_path / "same")))
    assert auto.pruned.pruning_runtime().kernels.setting == (False if chosen == "bfloat16" else "auto")
    assert "precision: auto" in open(tmp_path / "auto" / "plan.yaml").read()   # the folder keeps the plan as written


def test_auto_resumes_in_the_precision_it_began_with_on_a_machine_that_would_choose_otherwise(monkeypatch, tmp_path):
    data = plan_data(steps=24, dropout=False, checkpoint_every=7, precision="auto", distill=distill_section())
    plan = planc.load_plan(data)
    monkeypatch.setattr(precision, "bfloat16_speedup", lambda: 1.5)
    ref, part = str(tmp_path / "ref"), str(tmp_path / "part")
    assert train(plan, ref, progress=False).report["precision"]["chosen"] == "bfloat16"
    assert not train(plan, part, progress=False, stop_after=10).finished
    monkeypatch.setattr(precision, "bfloat16_speedup", lambda: 0.6)      # "another machine"
    resumed = train(plan, part, resume=True, progress=False)
    assert resumed.finished and resumed.report["precision"]["chosen"] == "bfloat16"
    assert "checkpoint" in resumed.report["precision"]["reason"]
    assert _tensors_equal(planc.runfolder.state_dict(ref), planc.runfolder.state_dict(part))


def test_auto_is_float32_where_bfloat16_cannot_train_without_measuring():
    def measured():
        raise AssertionError("measured bfloat16 where it cannot be chosen")
    assert precision.choose("cpu", sparse_kernels=True, speedup=measured).chosen == "float32"
    assert precision.choose("cpu", fsdp=True, speedup=measured).chosen == "float32"
    assert precision.choose("cpu", sparse_kernels="auto", speedup=lambda: 1.1).chosen == "bfloat16"   # the margin
    assert precision.choose("cpu", speedup=lambda: 1.09).chosen == "float32"
    plan = planc.load_plan(plan_data(precision="auto"))                   # valid with every sparse_kernels
    assert plan.train.precision == "auto" and planc.load_plan(dump_plan(plan)) == plan
