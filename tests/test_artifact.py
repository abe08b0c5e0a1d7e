"""The lowered model is the artifact (planc.artifact, planc.runfolder): a run folder holds
the baked and the lowered model as programs over block-sparse tensors; it loads in a
process that cannot import the model's code, agrees with the baked model (also under
torch.compile and re-exported), and its files and the loaded model shrink with the
sparsity. Crafted programs are one RunFolderError, never code."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import planc
from planc.artifact import held_bytes
from planc.errors import RunFolderError

USER_MODULE = textwrap.dedent("""
    import torch
    from torch import nn

    class Net(nn.Module):
        '''A linear stack and a conv, so both lowered kinds are in the program.'''
        def __init__(self, width=256):
            super().__init__()
            self.conv = nn.Conv2d(16, 32, 3, padding=1)
            self.up = nn.Linear(32 * 4 * 4, width)
            self.mid = nn.Linear(width, width)
            self.head = nn.Linear(width, 10)

        def forward(self, x):
            h = torch.relu(self.conv(x.view(-1, 16, 4, 4))).flatten(1)
            return self.head(torch.relu(self.mid(torch.relu(self.up(h)))))

    def net(width=256):
        return Net(width)

    def digits_net(hidden=64):
        return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                             nn.Linear(hidden, 10))
""")

APPLY_PLAN = textwrap.dedent("""
    version: 1
    name: artifact-apply
    model: {factory: userpkg_artifact:digits_net, kwargs: {hidden: 64}, example_inputs: [[32, 64]]}
    targets:
      defaults: {block: [8, 8], sparsity: 0.75, min_blocks: 16}
      rules: [{match: {position: last}, skip: true}]
    method: {name: acdc}
    schedule: {preset: paper}
    train:
      data: {factory: planc.examples.digits:loaders, kwargs: {batch_size: 32, train_size: 320}}
      steps: 40
      optimizer: {name: sgd, lr: 0.1, momentum: 0.9}
    lower: {backend: cpu, min_speedup: 1.0e-6}
""")


def plan_text(sparsity: float) -> str:
    return textwrap.dedent(f"""
        version: 1
        name: artifact-{int(sparsity * 100)}
        model: {{factory: userpkg_artifact:net, kwargs: {{width: 256}}, example_inputs: [[8, 256]]}}
        targets:
          defaults: {{block: [16, 16], sparsity: {sparsity}, min_blocks: 16}}
          rules: [{{match: {{position: last}}, skip: true}}]
        method: {{name: magnitude, variant: pretrained}}
        schedule: {{phases: [{{phase: finetune, steps: 2}}]}}
        train: {{steps: 2}}
    """)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Run folders written by planc.save after pruning with the runtime and forcing the
    lowering (min_speedup 0), at 75% and 90%; the model's code lives in a module that
    only this process can import."""
    root = tmp_path_factory.mktemp("artifact")
    (root / "userpkg_artifact.py").write_text(USER_MODULE)
    sys.path.insert(0, str(root))
    try:
        import userpkg_artifact

        out = {}
        for sparsity in (0.75, 0.9):
            torch.manual_seed(0)
            model = userpkg_artifact.net()
            pruned = planc.compile(model, planc.load_plan(plan_text(sparsity)), torch.randn(8, 256))
            pruned.attach(torch.optim.SGD(pruned.param_groups(lr=0.0)))    # prunes at step 0 (pretrained)
            baked = pruned.bake().eval()
            lowered = planc.lower(baked, backend="cpu", min_speedup=0)
            folder = str(root / f"run-{sparsity}")
            planc.save(folder, pruned, baked=baked, lowered=lowered)
            dense_bytes = {k: v.numel() * v.element_size() for k, v in baked.state_dict().items()}
            out[sparsity] = dict(folder=folder, baked=baked, lowered=lowered, dense_bytes=dense_bytes,
                                 pruned_keys=[k for k in dense_bytes if k.endswith("weight") and "head" not in k])
        from planc.train import train

        result = train(planc.load_plan(APPLY_PLAN), str(root / "applied"), progress=False, log=lambda s: None)
        assert result.report["lowering"]["lowered_layers"] == 2
        out["applied"] = dict(folder=str(root / "applied"), baked=result.baked, shape=(64,))
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("userpkg_artifact", None)
    return out


def test_the_lowered_program_calls_block_sparse_kernels(saved):
    graph = json.load(open(os.path.join(saved[0.9]["folder"], "lowered.json")))
    targets = [n.get("target") for n in graph["nodes"] if n["op"] == "call_function"]
    assert targets.count("planc.bsr_linear.default") == 2            # up, mid; the head stays dense
    assert targets.count("planc.bsr_conv2d.default") == 1            # the conv: the implicit GEMM, one op
    baked = json.load(open(os.path.join(saved[0.9]["folder"], "baked.json")))
    assert not any("planc" in str(n.get("target")) for n in baked["nodes"])


@pytest.mark.parametrize("case,width", [("applied", 64), (0.9, 256)])
def test_a_fresh_process_that_cannot_import_the_model_loads_and_agrees(saved, tmp_path, case, width):
    """From `planc apply` (its lowering kept) and from planc.save."""
    folder = saved[case]["folder"]
    script = textwrap.dedent(f"""
        import importlib.util, torch, planc
        assert importlib.util.find_spec("userpkg_artifact") is None      # the model's code is not here
        torch.manual_seed(1)
        x = torch.randn(5, {width})
        lowered = planc.load({folder!r})
        baked = planc.load({folder!r}, lowered=False)
        names = {{type(m).__name__ for m in lowered.modules()}}
        ref = baked(x)
        err = float((lowered(x) - ref).abs().max() / ref.abs().max())
        compiled = torch.compile(lowered)
        err_c = float((compiled(x) - ref).abs().max() / ref.abs().max())
        reexported = torch.export.export(lowered, (x,), strict=False).module()
        err_e = float((reexported(x) - ref).abs().max() / ref.abs().max())
        print(err, err_c, err_e, sorted(names))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0, done.stderr[-3000:]
    err, err_c, err_e, *_ = done.stdout.split()
    assert float(err) <= 1e-5 and float(err_c) <= 1e-5 and float(err_e) <= 1e-5, done.stdout
    assert "Net" not in done.stdout                                   # no class of the model's code


def test_loaded_models_agree_with_the_models_that_were_saved(saved):
    x = torch.randn(7, 256)
    for case in (saved[0.75], saved[0.9]):
        with torch.no_grad():
            ref = case["baked"](x)
            assert rel_err(planc.load(case["folder"], lowered=False)(x), ref) <= 1e-6
            assert rel_err(planc.load(case["folder"])(x), ref) <= 1e-5
            assert rel_err(case["lowered"](x), ref) <= 1e-5


@pytest.mark.parametrize("sparsity", [0.75, 0.9])
def test_files_and_loaded_model_shrink_with_the_sparsity(saved, sparsity):
    case = saved[sparsity]
    pruned = sum(case["dense_bytes"][k] for k in case["pruned_keys"])
    rest = sum(v for k, v in case["dense_bytes"].items() if k not in case["pruned_keys"])
    dense = pruned + rest
    expected = (1 - sparsity) * pruned + rest            # the kept blocks and every unpruned tensor
    size = os.path.getsize(os.path.join(case["folder"], "tensors.safetensors"))
    # 16x16 blocks: each kept block (1 KiB of values) carries ~40 bytes of indices; plus the header
    assert size <= 1.1 * expected + 16384, (size, expected, dense)
    assert size < (1.1 * (1 - sparsity) + 0.1) * dense
    for module in (planc.load(case["folder"]), case["lowered"]):
        held = held_bytes(module)
        assert held <= 1.1 * expected + 4096, (held, expected, dense)


def test_layers_apply_kept_dense_are_stored_as_kept_blocks_and_load_dense(tmp_path):
    from planc.train import train

    text = open(os.path.join(os.path.dirname(__file__), "..", "plans", "digits-tiny.yaml")).read()
    # backend dense: no layer lowered, deterministically (what a measured-slower lowering also gives)
    plan = planc.load_plan(text.replace("output: runs/digits-tiny", "lower: {backend: dense}"))
    result = train(plan, str(tmp_path / "run"), progress=False, log=lambda s: None)
    assert result.lowered is None
    graph = json.load(open(tmp_path / "run" / "lowered.json"))
    assert not any("planc" in str(n.get("target")) for n in graph["nodes"])
    from planc.checkpoint import load_tensors

    _, meta = load_tensors(str(tmp_path / "run" / "tensors.safetensors"))
    assert "bsc" in meta["entries"]["lowered/layers.0.weight"] and "bsc" in meta["entries"]["state/layers.0.weight"]
    x = torch.randn(4, 64)
    with torch.no_grad():
        assert rel_err(planc.load(str(tmp_path / "run"))(x), result.baked(x)) <= 1e-6


def test_programs_from_apply_load_as_lowered_and_baked(tmp_path):
    from planc.train import train

    text = open(os.path.join(os.path.dirname(__file__), "..", "plans", "digits-tiny.yaml")).read()
    plan = planc.load_plan(text.replace("output: runs/digits-tiny", "lower: {backend: cpu, min_speedup: 1.0e-6}"))
    result = train(plan, str(tmp_path / "run"), progress=False, log=lambda s: None)
    assert result.report["lowering"]["lowered_layers"] == 2 and result.lowered is not None
    report = json.load(open(tmp_path / "run" / "report.json"))
    assert report["program"]["saved"] and report["program"]["lowered"]
    x = torch.randn(9, 64)
    with torch.no_grad():
        ref = result.baked(x)
        assert rel_err(planc.load(str(tmp_path / "run"))(x), ref) <= 1e-5
        assert rel_err(planc.load(str(tmp_path / "run"), lowered=False)(x), ref) <= 1e-6


# ---- crafted programs --------------------------------------------------------------------
def _rehash(folder) -> None:
    from planc.checkpoint import sha256_file

    path = os.path.join(folder, "report.json")
    report = json.load(open(path))
    report["files"] = {f: sha256_file(os.path.join(folder, f)) for f in report["files"]}
    open(path, "w").write(json.dumps(report))


def _first(nodes, op):
    return next(n for n in nodes if n["op"] == op)


CRAFTED = {
    "a torch function as a call target": lambda nodes: _first(nodes, "call_function").update(target="torch.hub.load"),
    "an operator of another namespace": lambda nodes: _first(nodes, "call_function").update(
        target="quantized.linear.default"),
    "code in a node name": lambda nodes: _first(nodes, "call_function").update(name="x; import os"),
    "code in an input name": lambda nodes: _first(nodes, "placeholder").update(target="x=__import__('os')"),
    "a path out of the module": lambda nodes: _first(nodes, "get_attr").update(target="__class__.__init__"),
    "an unknown node kind": lambda nodes: _first(nodes, "call_function").update(op="call_method"),
    "an argument object": lambda nodes: _first(nodes, "call_function").update(args=[{"sympy": "__import__('os')"}]),
    "deep arguments": lambda nodes: _first(nodes, "call_function").update(args=json.loads("[" * 200 + "]" * 200)),
    "a dangling node reference": lambda nodes: _first(nodes, "call_function").update(args=[{"node": "nowhere"}]),
}


@pytest.mark.parametrize("craft", sorted(CRAFTED))
def test_crafted_programs_are_one_run_folder_error(saved, tmp_path, craft):
    import shutil

    folder = str(tmp_path / "run")
    shutil.copytree(saved[0.75]["folder"], folder)
    path = os.path.join(folder, "lowered.json")
    graph = json.load(open(path))
    CRAFTED[craft](graph["nodes"])
    open(path, "w").write(json.dumps(graph))
    _rehash(folder)
    with pytest.raises(RunFolderError) as info:
        planc.load(folder)
    assert "\n" not in str(info.value) and "lowered.json" in str(info.value)


def test_a_crafted_pytree_spec_is_refused(saved, tmp_path):
    import shutil

    folder = str(tmp_path / "run")
    shutil.copytree(saved[0.75]["folder"], folder)
    path = os.path.join(folder, "baked.json")
    graph = json.load(open(path))
    graph["pytree"]["in_spec"] = json.dumps([1, {"type": "os.system", "context": "null", "children_spec": []}])
    open(path, "w").write(json.dumps(graph))
    _rehash(folder)
    with pytest.raises(RunFolderError, match="baked.json"):
        planc.load(folder, lowered=False)


def test_column_ordered_values_compute_the_same_with_the_same_gradients():
    """A layer lowered for the CPU stores its kept blocks by column (no gather per call);
    forward, dX, dvalues (in the stored order) and dbias equal the row-ordered layer's."""
    from planc.kernels.format import BlockSparseMatrix, inverse
    from planc.kernels.ops import BlockSparseLinear

    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 80, generator=g)
    alive = torch.rand(6, 5, generator=g) > 0.6
    bsm = BlockSparseMatrix.from_weight(w, (16, 16), alive)
    bias = torch.randn(96, generator=g)
    x = torch.randn(33, 80, generator=g)
    outs = {}
    for order in ("row", "col"):
        for strategy in ("cols", "dense"):
            layer = BlockSparseLinear(bsm, bias, backend="cpu", strategy=strategy, order=order)
            xi = x.clone().requires_grad_(True)
            y = layer(xi)
            y.pow(2).sum().backward()
            dv = layer.values.grad if order == "row" else layer.values.grad[inverse(bsm.tperm)]
            outs[order, strategy] = (y.detach(), xi.grad, dv, layer.bias.grad)
    ref = outs["row", "cols"]
    dense = torch.nn.functional.linear(x, bsm.to_dense(), bias)
    assert rel_err(ref[0], dense) <= 1e-5
    for key, got in outs.items():
        for a, b in zip(got, ref):
            assert rel_err(a, b) <= 1e-5, key


def test_a_transposed_conv1d_layer_saves_and_loads(tmp_path):
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = Conv1D(128, 64)          # weight stored (in, out) = (64, 128)
            self.c_proj = Conv1D(64, 128)

        def forward(self, x):
            return self.c_proj(torch.relu(self.c_fc(x)))

    torch.manual_seed(0)
    plan = planc.load_plan(textwrap.dedent("""
        version: 1
        name: conv1d
        model: {example_inputs: [[4, 64]]}
        targets: {defaults: {block: [16, 16], sparsity: 0.75, min_blocks: 16}}
        method: {name: magnitude, variant: pretrained}
        schedule: {phases: [{phase: finetune, steps: 1}]}
        train: {steps: 1}
    """))
    pruned = planc.compile(Block(), plan, torch.randn(4, 64))
    pruned.attach(torch.optim.SGD(pruned.param_groups(lr=0.0)))
    baked = pruned.bake().eval()
    lowered = planc.lower(baked, backend="cpu", min_speedup=0)
    planc.save(str(tmp_path / "run"), pruned, baked=baked, lowered=lowered)
    x = torch.randn(6, 64)
    with torch.no_grad():
        ref = baked(x)
        assert rel_err(planc.load(str(tmp_path / "run"))(x), ref) <= 1e-5
        assert rel_err(planc.load(str(tmp_path / "run"), lowered=False)(x), ref) <= 1e-6
    graph = json.load(open(tmp_path / "run" / "lowered.json"))
    assert sum(n.get("target") == "planc.bsr_linear.default" for n in graph["nodes"]) == 2
