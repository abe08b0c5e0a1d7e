"""planc.lower never returns a model that measured slower than its input: after the pass,
the whole lowered model is timed against the baked one (on `example_inputs`, or on the
shapes an exported graph records) and a dense copy comes back when it missed
min_speedup. The timings are faked here (no speed is asserted); the decision must follow
them."""
import os

import pytest
import torch
from torch import fx

import planc
from planc import lowering
from planc.examples.digits import mlp
from planc.kernels.ops import BlockSparseLinear
from planc.passes import lower as lower_pass
from planc.passes.lower import report

from test_lower import prune


def sparse_modules(gm):
    return [n for n, m in gm.named_modules() if isinstance(m, BlockSparseLinear)]


@pytest.fixture
def fake_times(monkeypatch):
    """Every layer 'measures' 3x faster alone; the whole model as the test says."""
    monkeypatch.setattr(lower_pass, "_measure_linear", lambda *a, **k: 3.0)
    whole = {}

    def fake_interleaved(fns, repeats, sync=None):
        for fn in fns.values():
            fn()
        whole["calls"] = whole.get("calls", 0) + 1
        return {"baked": 1.0, "lowered": 1.0 / whole["ratio"]}

    monkeypatch.setattr(lowering, "interleaved", fake_interleaved)
    return whole


def exported_baked():
    torch.manual_seed(0)
    model = prune(mlp(hidden=128), (16, 16), 0.75)
    return torch.export.export(model, (torch.randn(32, 64),), strict=False).module()


@pytest.mark.parametrize("ratio,kept", [(0.8, False), (1.5, True)])
def test_the_whole_model_decides_on_recorded_shapes(fake_times, ratio, kept):
    fake_times["ratio"] = ratio
    baked = exported_baked()
    out = planc.lower(baked, backend="cpu", blocks=(16, 16))
    assert fake_times["calls"] == 1
    check = out.meta[lowering.CHECK_KEY]
    assert check["inputs"] == [[32, 64]] and check["speedup"] == pytest.approx(ratio)
    assert bool(sparse_modules(out)) == kept
    rows = [r for r in report(out) if "measured_speedup" in r]
    assert rows and all(r["action"] == ("lowered" if kept else "dense") for r in rows)
    if not kept:
        assert all("kept dense" in r["reason"] for r in rows) and "kept_dense" in check
    x = torch.randn(32, 64)
    torch.testing.assert_close(out(x), baked(x), rtol=1e-5, atol=1e-5)


def test_symbolic_graphs_are_checked_on_the_inputs_given(fake_times):
    fake_times["ratio"] = 0.5
    baked = fx.symbolic_trace(prune(mlp(hidden=128), (16, 16), 0.75))
    assert lowering.inputs_from_graph(baked) is None          # symbolic_trace records no shapes
    unchecked = planc.lower(baked, backend="cpu", blocks=(16, 16))
    assert "calls" not in fake_times and sparse_modules(unchecked)
    checked = planc.lower(baked, backend="cpu", blocks=(16, 16), example_inputs=torch.randn(8, 64))
    assert fake_times["calls"] == 1 and not sparse_modules(checked)


def test_min_speedup_zero_lowers_everything_unchecked(fake_times):
    fake_times["ratio"] = 0.1
    out = planc.lower(exported_baked(), backend="cpu", blocks=(16, 16), min_speedup=0)
    assert "calls" not in fake_times and sparse_modules(out)


def test_inputs_from_an_exported_graph_with_a_dynamic_batch():
    pruned = planc.compile(mlp(hidden=64), "version: 1\nmodel: {example_inputs: [[16, 64]]}\n"
                           "targets: {defaults: {block: [8, 8], sparsity: 0.5, min_blocks: 4}}\n"
                           "method: {name: magnitude}\n")
    (x,) = lowering.inputs_from_graph(pruned.bake())
    assert tuple(x.shape) == (16, 64) and x.dtype == torch.float32


class _TokenModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(100, 64)
        self.fc = torch.nn.Linear(64, 256)

    def forward(self, ids):
        return self.fc(self.emb(ids)).mean(1)


@pytest.mark.parametrize("entry", ["apply", "planc.lower"])
def test_each_layer_is_decided_at_the_rows_it_sees(monkeypatch, entry):
    """Token ids (2, 32) reach the Linear as 64 rows: the per-layer timing and the
    prediction use 64, not the model input's first dimension (2)."""
    seen = []
    monkeypatch.setattr(lower_pass, "_measure_linear", lambda module, weight, bias, tokens: seen.append(tokens) or 3.0)
    plan = planc.load_plan(
        "version: 1\nmodel: {example_inputs: [[2, 32]], input_dtype: int64}\n"
        "targets: {defaults: {block: [16, 16], sparsity: 0.9, min_blocks: 1}}\n"
        "method: {name: magnitude, variant: pretrained}\nschedule: {phases: [{phase: finetune, steps: 1}]}\n"
        "train: {steps: 1}\n")
    ids = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(0))
    pruned = planc.compile(_TokenModel(), plan, ids)
    pruned.start()
    baked = pruned.bake().eval()
    if entry == "apply":
        rows = lowering.lower_and_measure(baked, plan, (ids,), repeats=1)["layers"]
    else:
        rows = report(planc.lower(baked, example_inputs=(ids,), repeats=1))
    fc = {r["layer"]: r for r in rows}["fc"]
    assert seen == [64] and "at 64 tokens" in fc["reason"], fc["reason"]


def test_a_model_that_fails_on_the_inputs_is_still_lowered_by_the_graph_shapes():
    """Recording shapes is a better guess, not a requirement: inputs the model cannot
    run leave the graph as it was (no half-annotated nodes) and the pass goes on."""
    baked = fx.symbolic_trace(prune(mlp(hidden=128), (16, 16), 0.75))
    lowering.record_shapes(baked, (torch.randn(4, 7),))          # the MLP wants 64 features
    assert all("tensor_meta" not in n.meta for n in baked.graph.nodes)
    lowering.record_shapes(baked, (torch.randn(4, 64),))
    fc = next(n for n in baked.graph.nodes if n.op == "call_module" and n.target == "layers.0")
    assert tuple(fc.meta["tensor_meta"].shape) == (4, 128)


@pytest.mark.parametrize("serving", [None, [256, 64]])
def test_apply_decides_and_times_the_lowering_on_lower_example_inputs(tmp_path, monkeypatch, fake_times, serving):
    """A model traced on one batch (32 rows) and served at another: `planc apply` records
    shapes, times each layer and checks the whole model on lower.example_inputs when the
    plan gives them, else on model.example_inputs."""
    from planc.train import train

    fake_times["ratio"] = 2.0
    seen = []
    monkeypatch.setattr(lower_pass, "_measure_linear", lambda module, weight, bias, tokens: seen.append(tokens) or 3.0)
    tiny = os.path.join(os.path.dirname(__file__), "..", "plans", "digits-tiny.yaml")
    text = (open(tiny).read()                              # 60 steps: the shortest the paper preset allows
            .replace("{hidden: 64}", "{hidden: 256}").replace("block: [8, 8], sparsity: 0.75", "block: [16, 16], sparsity: 0.9"))
    text += "lower: {backend: cpu" + (f", example_inputs: [{serving}]" if serving else "") + "}\n"
    result = train(planc.load_plan(text), str(tmp_path / "run"), progress=False, log=lambda s: None)
    rows = 256 if serving else 32
    assert result.report["lowering"]["inputs"] == [[rows, 64]]
    assert seen and set(seen) == {rows}, result.report["lowering"]["layers"]
    assert result.report["lowering"]["lowered_layers"] == 2 and fake_times["calls"] == 1
