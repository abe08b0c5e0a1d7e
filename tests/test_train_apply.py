"""The built-in trainer, `planc apply` and the run folder: a complete folder that
planc.load reads back with the same outputs, bitwise resume from an atomic checkpoint,
and typed errors for tampered or missing files."""
import json
import os

import pytest
import torch

import planc
from planc.checkpoint import load_tensors
from planc.cli import main
from planc.errors import PlanError, RunFolderError
from planc.runfolder import FILES, read
from planc.plan.presets import scale_schedule
from planc.train import CHECKPOINT, lr_factor, train


def tiny_plan(method="sequential_attention_pp", steps=40, **train_kw):
    data = {
        "version": 1,
        "name": "tiny",
        "model": {"factory": "planc.examples.digits:mlp", "kwargs": {"hidden": 32, "dropout": 0.1},
                  "example_inputs": [[8, 64]], "frontend": "symbolic"},
        "targets": {"defaults": {"block": [8, 8], "sparsity": 0.75, "min_blocks": 16},
                    "rules": [{"match": {"position": "last"}, "skip": True}]},
        "method": {"name": method},
        "train": {"data": {"factory": "planc.examples.digits:loaders",
                           "kwargs": {"batch_size": 32, "train_size": 320}},
                  "steps": steps, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
                  "lr_schedule": "cosine", "eval_every": 10, **train_kw},
    }
    return planc.load_plan(data)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("run") / "tiny")
    result = train(tiny_plan(), out, progress=False)
    return out, result


def test_run_folder_is_complete_and_loads_back_with_the_same_outputs(finished):
    out, result = finished
    assert sorted(os.listdir(out)) == sorted(FILES)          # the checkpoint is gone when done; programs saved
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["steps"] == 40 and report["mean_sparsity"] == pytest.approx(0.75)
    for row in report["layers"]:
        assert row["achieved_sparsity"] == row["target_sparsity"] == 0.75
        assert row["alive_blocks"] == row["target_alive_blocks"]
    assert {"accuracy", "loss"} <= set(report["metrics"]["final"])
    assert [h["step"] for h in report["metrics"]["history"]] == [10, 20, 30, 40]
    assert {"train_s", "eval_s", "bake_s", "total_s"} <= set(report["timings"])
    events = [json.loads(line) for line in open(os.path.join(out, "events.jsonl"))]
    assert events == result.pruned.runtime.events
    assert {e["event"] for e in events} == {"phase", "prune", "eval"}

    model = planc.load(out, trust_factory=True)
    assert not model.training
    x = torch.randn(16, 64)
    with torch.no_grad():
        ref = result.baked(x)
        assert torch.allclose(model(x), ref, atol=1e-6)
        masked = result.pruned.module.eval()(x)
        assert torch.allclose(model(x), masked, atol=1e-5)
    run = read(out)
    assert run.plan == tiny_plan()
    for name, alive in run.masks.items():
        assert torch.equal(alive, result.pruned.masks[name].alive)


def test_tampered_or_missing_files_are_rejected(finished, tmp_path):
    import shutil

    out, _ = finished
    bad = str(tmp_path / "bad")
    shutil.copytree(out, bad)
    weights, meta = load_tensors(os.path.join(bad, "tensors.safetensors"))
    weights["dense"] = torch.ones(32, 64)          # layers.0.weight stored dense, without a zero
    meta["entries"]["state/layers.0.weight"] = {"dense": "dense"}
    from planc.checkpoint import save_tensors
    save_tensors(os.path.join(bad, "tensors.safetensors"), weights, meta)
    with pytest.raises(RunFolderError, match="sha256"):
        planc.load(bad)
    # fix the hash: the zero check still catches weights in pruned blocks
    from planc.checkpoint import sha256_file
    report = json.load(open(os.path.join(bad, "report.json")))
    report["files"]["tensors.safetensors"] = sha256_file(os.path.join(bad, "tensors.safetensors"))
    json.dump(report, open(os.path.join(bad, "report.json"), "w"))
    with pytest.raises(RunFolderError, match="not zero"):
        planc.load(bad)
    os.remove(os.path.join(bad, "masks.safetensors"))
    with pytest.raises(RunFolderError, match="missing"):
        planc.load(bad)
    with pytest.raises(RunFolderError, match="no such run folder"):
        planc.load(str(tmp_path / "nowhere"))


def _tensors(path):
    return load_tensors(path)[0]


def test_resume_from_a_checkpoint_is_bitwise_equal(finished, tmp_path):
    plan = tiny_plan(checkpoint_every=7)
    ref_out, part_out = str(tmp_path / "ref"), str(tmp_path / "part")
    train(plan, ref_out, progress=False)
    first = train(plan, part_out, progress=False, stop_after=17)   # "interrupted" after step 17
    assert not first.finished and os.path.isfile(os.path.join(part_out, CHECKPOINT))
    second = train(plan, part_out, resume=True, progress=False)     # restarts from step 14
    assert second.finished
    a, b = _tensors(os.path.join(ref_out, "tensors.safetensors")), _tensors(os.path.join(part_out, "tensors.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert open(os.path.join(ref_out, "events.jsonl")).read() == open(os.path.join(part_out, "events.jsonl")).read()
    ra = json.load(open(os.path.join(ref_out, "report.json")))
    rb = json.load(open(os.path.join(part_out, "report.json")))
    assert ra["metrics"] == rb["metrics"]
    # a checkpoint from another plan is refused
    train(plan, part_out, progress=False, stop_after=7, overwrite=True)
    with pytest.raises(RunFolderError, match="different plan"):
        train(tiny_plan(checkpoint_every=7, seed=3), part_out, resume=True, progress=False)


def test_checkpointing_changes_nothing_a_run_computes_so_not_its_identity(finished, tmp_path):
    # checkpoint_every only says how much an interruption may cost: the same run with and
    # without checkpoints is bitwise the same, and shares its plan identity, so a finished
    # run is reused and an interrupted one resumed whatever interval either plan sets
    from planc.runfolder import plan_fingerprint

    out, _ = finished
    every = str(tmp_path / "every-5")
    train(tiny_plan(checkpoint_every=5), every, progress=False)
    a, b = _tensors(os.path.join(out, "tensors.safetensors")), _tensors(os.path.join(every, "tensors.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert plan_fingerprint(tiny_plan(checkpoint_every=5)) == plan_fingerprint(tiny_plan())
    assert plan_fingerprint(tiny_plan(eval_every=20)) != plan_fingerprint(tiny_plan())   # what it evaluates, logs
    part = str(tmp_path / "part")
    train(tiny_plan(checkpoint_every=5), part, progress=False, stop_after=12)
    assert train(tiny_plan(checkpoint_every=7), part, resume=True, progress=False).finished
    c = _tensors(os.path.join(part, "tensors.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_cli_apply_writes_a_run_folder_and_maps_errors(tmp_path, capsys):
    plan_path = tmp_path / "plan.yaml"
    from planc.plan import dump_plan
    plan_path.write_text(dump_plan(tiny_plan(method="acdc")))
    out = str(tmp_path / "cli")
    assert main(["apply", str(plan_path), "--out", out, "--steps", "20"]) == 0
    assert set(FILES) <= set(os.listdir(out)) and CHECKPOINT not in os.listdir(out)
    assert "20 steps" in capsys.readouterr().out
    assert planc.load(out, trust_factory=True) is not None
    bad = tmp_path / "bad.yaml"
    bad.write_text(plan_path.read_text().replace("planc.examples.digits:mlp", "planc.examples.digits:nothing"))
    assert main(["apply", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "cannot import" in capsys.readouterr().err


def test_lr_schedules_and_step_override():
    assert lr_factor(0, 100, "constant", 0) == 1.0
    assert lr_factor(50, 100, "cosine", 0) == pytest.approx(0.5)
    assert lr_factor(100, 100, "cosine", 0) == pytest.approx(0.0)
    assert lr_factor(25, 100, "linear", 0) == pytest.approx(0.75)
    assert lr_factor(4, 100, "cosine", 10) == pytest.approx(0.5)         # warm-up (4+1)/10
    assert lr_factor(10, 110, "linear", 10) == pytest.approx(1.0)
    plan = tiny_plan(steps=60)
    scaled = scale_schedule(plan, 120)
    assert scaled.train.steps == 120 and scaled.schedule.total_steps == 120
    assert [p.kind for p in scaled.schedule.phases] == [p.kind for p in plan.schedule.phases]
    with pytest.raises(PlanError):
        scale_schedule(plan, 0)


def test_apply_takes_threads_and_the_report_records_them_with_the_cpu(tmp_path):
    from planc.train import pick_threads

    plan_path = tmp_path / "plan.yaml"
    from planc.plan import dump_plan
    plan_path.write_text(dump_plan(tiny_plan(method="magnitude")))
    before = torch.get_num_threads()
    try:
        assert main(["apply", str(plan_path), "--out", str(tmp_path / "one"), "--steps", "20", "--threads", "1"]) == 0
        report = json.load(open(tmp_path / "one" / "report.json"))
        env = report["environment"]
        assert env["threads"] == 1 and env["cpu"]
        # the sparse-phase kernels' setting and decisions: small layers, never worth timing
        assert report["sparse_kernels"]["setting"] == "auto" and report["sparse_kernels"]["timed"] == {}
        assert set(report["sparse_kernels"]["now"].values()) <= {"dense"}
        # auto: the tiny MLP's weights are small, so one thread whatever torch's default
        torch.set_num_threads(2)
        assert pick_threads(torch.nn.Linear(64, 32)) == 1 and pick_threads(torch.nn.Linear(1024, 1024)) == 2
        assert main(["apply", str(plan_path), "--out", str(tmp_path / "auto"), "--steps", "20"]) == 0
        assert json.load(open(tmp_path / "auto" / "report.json"))["environment"]["threads"] == 1
    finally:
        torch.set_num_threads(before)
    assert main(["apply", str(plan_path), "--threads", "0"]) == 2
