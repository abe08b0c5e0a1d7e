"""insert_masks and bake on hand-built graphs: structure, modes, changed flags, exactness."""
import copy

import pytest
import torch
from torch import fx

import planc
from planc import meta
from planc.examples.digits import cnn, mlp
from planc.mask import BlockMask
from planc.passes import bake, insert_masks, masks_of, select, targets_of, trace
from planc.passes.insert_masks import mask_for
from planc.passes.lower import report
from planc.passes.trace import relative_error
from planc.plan.types import Match

from _passes_helpers import Conv1DStyle, Functional, max_diff, plan, prune_half, run, skip_last


def _masked(model, p, frontend=None, inputs=None):
    gm = fx.symbolic_trace(model) if frontend is None else trace(model, inputs, frontend=frontend)
    gm, _ = select(gm, p)
    return insert_masks(gm, p)


def test_structure_after_insert_symbolic():
    model = mlp(hidden=32, depth=2)
    gm, changed = _masked(model, skip_last())
    assert changed
    calls = [n for n in gm.graph.nodes if n.op == "call_module"]
    assert [n.target for n in calls] == ["planc_masks.layers_0", "layers.1", "planc_masks.layers_2", "layers.3", "head"]
    linears = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is torch.nn.functional.linear]
    assert [n.args[1].target for n in linears] == ["planc_masks.layers_0", "planc_masks.layers_2"]
    assert linears[0].args[1].args[0].op == "get_attr" and linears[0].args[1].args[0].target == "layers.0.weight"
    assert linears[0].meta[meta.MASK] == "planc_masks.layers_0"
    assert any(n.op == "call_module" and n.target == "head" for n in gm.graph.nodes)   # skipped: untouched
    assert list(masks_of(gm)) == ["layers.0", "layers.2"]
    assert {n for n, _ in gm.named_parameters() if "planc_masks" in n} == {"planc_masks.layers_0.logits", "planc_masks.layers_2.logits"}
    assert insert_masks(gm, skip_last())[1] is False          # idempotent
    x = torch.randn(5, 64)
    assert max_diff(gm(x), model(x)) <= 1e-6                  # zero logits: the dense model


@pytest.mark.parametrize("method,mode", [("sequential_attention_pp", "attention"), ("acdc", "support"),
                                         ("magnitude", "support"), ("powerprop", "powerprop")])
def test_mode_follows_the_method(method, mode):
    gm, _ = _masked(mlp(hidden=16, depth=1), skip_last(method=method))
    (m,) = masks_of(gm).values()
    assert m.mode == mode and (m.logits is not None) == (mode == "attention")


def test_method_options_reach_the_mask():
    gm, _ = _masked(mlp(hidden=16, depth=1), skip_last(clip=(0.5, 2.0)))
    assert next(iter(masks_of(gm).values())).clip == (0.5, 2.0)
    gm, _ = _masked(mlp(hidden=16, depth=1), skip_last(method="powerprop", alpha=3.0, granularity="element"))
    m = next(iter(masks_of(gm).values()))
    assert (m.alpha, m.granularity) == (3.0, "element")
    with pytest.raises(ValueError, match="expected a method"):
        mask_for(targets_of(gm)[0], "nope")


def test_clip_defaults_to_the_papers_density_range():
    last = ({"match": Match(position="last"), "skip": True},)
    gm, _ = _masked(mlp(hidden=16, depth=1), plan(sparsity=0.8, rules=last))
    assert next(iter(masks_of(gm).values())).clip == pytest.approx((0.2, 5.0))     # [density, 1/density]
    gm, _ = _masked(mlp(hidden=16, depth=1), skip_last(clip=None))
    assert next(iter(masks_of(gm).values())).clip is None


@pytest.mark.parametrize("alpha,granularity", [(2.0, "block"), (3.0, "block"), (2.0, "element")])
def test_powerprop_compiled_model_starts_as_the_dense_model(alpha, granularity):
    model = mlp(hidden=32, depth=2)
    dense = copy.deepcopy(model)
    gm, _ = _masked(model, skip_last(method="powerprop", alpha=alpha, granularity=granularity))
    x = torch.randn(7, 64)
    assert max_diff(gm(x), dense(x)) <= 1e-5


def test_insert_without_select_changes_nothing():
    gm = fx.symbolic_trace(mlp(hidden=16, depth=1))
    before = gm.code
    gm, changed = insert_masks(gm, "acdc")
    assert changed is False and gm.code == before


def test_functional_and_conv_uses_get_masks():
    model = Functional()
    gm, _ = _masked(model, plan(block=(2, 2)))
    assert set(masks_of(gm)) == {"w1", "out"}                 # grouped conv skipped
    x, img = torch.randn(3, 6), torch.randn(3, 4, 5, 5)
    assert max_diff(gm(x, img), model(x, img)) <= 1e-6


def test_bake_folds_masks_with_exact_zeros():
    model = cnn(4).eval()
    x = torch.randn(6, 64)
    gm, _ = _masked(model, skip_last(block=(2, 4)), frontend="export", inputs=(x,))
    prune_half(masks_of(gm))
    with torch.no_grad():
        for m in masks_of(gm).values():
            m.logits.normal_()                                 # attention != 1 must be folded too
    gm.eval()
    expected = run(gm, x)
    baked, changed = bake(copy.deepcopy(gm))
    assert changed and bake(baked)[1] is False
    assert not any(isinstance(m, BlockMask) for m in baked.modules()) and not hasattr(baked, "planc_masks")
    assert max_diff(run(baked.eval(), x), expected) <= 1e-5
    for t in targets_of(baked):
        if not t.targeted:
            continue
        node = next(n for n in baked.graph.nodes if n.meta.get(meta.TARGET) == t and meta.BAKED in n.meta)
        rec = node.meta[meta.BAKED]
        mask = masks_of(gm)[t.name]
        w = baked.get_parameter(t.weight_target)
        assert torch.all(mask.view.to_blocks(w)[~mask.alive] == 0)
        assert rec.blocks == t.num_blocks and rec.blocks_pruned == int((~mask.alive).sum())
        assert rec.block_sparsity == pytest.approx(rec.blocks_pruned / rec.blocks) and rec.block == t.block
        assert rec.weight_sparsity == pytest.approx(float((w == 0).float().mean()))
    # the masked module still works and is unchanged
    assert max_diff(run(gm, x), expected) == 0


def test_bake_of_a_shared_weight_folds_once():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(self.lin(x))

    model = Twice()
    gm, _ = _masked(model, plan(block=(2, 2)))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["planc_masks.lin", "planc_masks.lin"]
    (mask,) = masks_of(gm).values()
    prune_half({"lin": mask})
    x = torch.randn(2, 8)
    expected = gm(x)
    baked, _ = bake(gm)
    assert max_diff(baked(x), expected) <= 1e-6


def test_transposed_linear_blocks_are_out_by_in_through_mask_bake_and_lower():
    # a block (r, c) is r output features x c input features, whatever the storage
    model = Conv1DStyle(n_in=8, n_out=12).eval()
    x = torch.randn(2, 3, 8)
    pruned = planc.compile(model, plan(block=(4, 2), sparsity=0.5), (x,))
    info = {t.name: t for t in pruned.targets}["weight"]
    assert (info.transposed, info.weight_shape, info.grid) == (True, (8, 12), (3, 4))
    assert "linear^T" in pruned.table() and "Conv1D-style" in pruned.table()
    mask = pruned.masks["weight"]
    with torch.no_grad():
        mask.alive.fill_(True)
        mask.alive[0, 1] = False                            # outputs 0..3, inputs 2..3
    baked = pruned.bake().eval()
    w = baked.get_parameter("weight")                        # stored (in, out)
    assert torch.count_nonzero(w[2:4, 0:4]) == 0 and torch.count_nonzero(w) == w.numel() - 8
    assert relative_error(run(pruned.module, x), run(baked, x)) <= 1e-6
    lowered = planc.lower(baked, backend="cpu", min_speedup=0)
    assert {r["layer"]: (r["action"], r["shape"]) for r in report(lowered)}["weight"] == ("lowered", (12, 8))
    assert relative_error(run(baked, x), run(lowered, x)) <= 1e-5


def test_a_run_folder_with_a_transposed_layer_reads_back(tmp_path):
    from planc import runfolder

    model = Conv1DStyle(n_in=8, n_out=12).eval()
    plan_data = {"version": 1, "name": "conv1d", "model": {"example_inputs": [[2, 3, 8]]},
                 "targets": {"defaults": {"block": [4, 2], "sparsity": 0.5, "min_blocks": 1}},
                 "method": {"name": "magnitude"}, "schedule": {"phases": [{"phase": "dense", "steps": 1}]},
                 "train": {"steps": 1}}
    pruned = planc.compile(model, plan_data)
    prune_half(pruned.masks)
    baked = pruned.bake()
    runfolder.write(str(tmp_path), pruned.plan, pruned, baked, {"format": runfolder.REPORT_FORMAT}, [])
    run_back = runfolder.read(str(tmp_path), model=Conv1DStyle(n_in=8, n_out=12))
    assert torch.equal(run_back.masks["weight"], pruned.masks["weight"].alive)
    assert torch.equal(run_back.model.weight, baked.get_parameter("weight"))
