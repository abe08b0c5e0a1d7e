"""The trust model (docs/robustness.md): a plan names only code outside the standard
library and builtins; loading a run folder runs none of its code; runtime state and
checkpoints belong to one plan and say so; a run never destroys a user's work; plan
input is bounded. Each test here failed on the code before the rule was built."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import yaml

import planc
from planc.checkpoint import load_state, save_state
from planc.cli import main
from planc.errors import FactoryError, OutputFolderError, PlancError, PlanError, RunFolderError, RuntimeStateError
from planc.plan.factory import call_factory
from planc.train import CHECKPOINT, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(sparsity: float = 0.75, **train_kw) -> str:
    doc = {
        "version": 1, "name": f"trust-{sparsity}",
        "model": {"factory": "planc.examples.digits:mlp", "kwargs": {"hidden": 32}, "example_inputs": [[16, 64]]},
        "targets": {"defaults": {"block": [8, 8], "sparsity": sparsity, "min_blocks": 16},
                    "rules": [{"match": {"position": "last"}, "skip": True}]},
        "method": {"name": "acdc"}, "schedule": {"preset": "paper"},
        "train": {"data": {"factory": "planc.examples.digits:loaders", "kwargs": {"batch_size": 16, "train_size": 160}},
                  "steps": 40, "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9}, "checkpoint_every": 10,
                  **train_kw},
        "lower": {"backend": "dense"},
    }
    return yaml.safe_dump(doc, sort_keys=False)


def quiet(*a, **k):
    pass


def snapshot(folder) -> dict:
    """Every file under `folder` (links not followed) -> sha256 of its bytes or its link target."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, folder)] = (os.readlink(p) if os.path.islink(p)
                                               else hashlib.sha256(open(p, "rb").read()).hexdigest())
    return out


# ---- 1. a plan names no standard-library or builtin callable --------------------------------
DANGEROUS = ["os:system", "subprocess:run", "shutil:rmtree", "runpy:run_path", "builtins:exec", "pathlib:Path.touch",
             "planc.checkpoint:atomic_write_text"]


@pytest.mark.parametrize("factory", DANGEROUS)
@pytest.mark.parametrize("command", ["validate", "explain", "apply"])
def test_standard_library_factories_are_refused_at_their_line(tmp_path, capsys, factory, command):
    marker = tmp_path / "ran"
    text = tiny().replace("planc.examples.digits:mlp", factory).replace(
        "kwargs: {hidden: 32}", f"kwargs: {{command: 'touch {marker}'}}").replace("hidden: 32", f"command: touch {marker}")
    plan = tmp_path / "plan.yaml"
    plan.write_text(text)
    argv = [command, str(plan)] + (["--out", str(tmp_path / "run")] if command == "apply" else [])
    assert main(argv) == 2
    io = capsys.readouterr()
    err = (io.out + io.err).strip().splitlines()           # validate reports on stdout, the others on stderr
    line = next(i for i, l in enumerate(text.splitlines(), 1) if factory in l)
    assert len(err) == 1 and err[0].startswith(f"{plan}:{line}:") and "model.factory: refused" in err[0], err
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_a_path_through_a_module_attribute_is_refused_where_it_lands(tmp_path, monkeypatch):
    """`mypkg:os.system` passes the text check (mypkg is not the standard library) and
    is refused once imported, before it is called."""
    (tmp_path / "userpkg_trust.py").write_text("import os\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    marker = tmp_path / "ran"
    plan = planc.load_plan(tiny().replace("planc.examples.digits:mlp", "userpkg_trust:os.system")
                           .replace("hidden: 32", f"command: touch {marker}"))
    with pytest.raises(PlanError, match="'posix' is part of the Python standard library"):
        call_factory(plan, "model.factory")
    assert not marker.exists()


def test_factories_must_return_what_the_trainer_needs(tmp_path, monkeypatch, capsys):
    (tmp_path / "userpkg_returns.py").write_text(textwrap.dedent("""
        import torch
        def not_a_module(**kw):
            return [1, 2, 3]
        class DictOut(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.layers = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 10))
            def forward(self, x):
                return {"logits": self.layers(x)}
        def dict_model(**kw):
            return DictOut()
        def one_loader(**kw):
            return 7
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    plan = planc.load_plan(tiny().replace("planc.examples.digits:mlp", "userpkg_returns:not_a_module"))
    with pytest.raises(FactoryError, match="returned a list of 3, expected a torch.nn.Module"):
        call_factory(plan, "model.factory")
    plan = planc.load_plan(tiny().replace("planc.examples.digits:loaders", "userpkg_returns:one_loader"))
    with pytest.raises(FactoryError, match=r"returned an int, expected a pair \(train_loader, eval_loader\)"):
        call_factory(plan, "train.data")
    path = tmp_path / "dict.yaml"
    path.write_text(tiny().replace("planc.examples.digits:mlp", "userpkg_returns:dict_model")
                    .replace("hidden: 32", "{}"))
    status = main(["apply", str(path), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 1 and "internal error" not in err and "the model returned a dict" in err, err


# ---- 2. reading a run folder runs none of its code (more in test_safe_artifacts) ----------
@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("trust") / "run")
    assert train(planc.load_plan(tiny()), out, progress=False, log=quiet).finished
    return out


def copy_of(run, tmp_path) -> str:
    import shutil

    dst = str(tmp_path / "copy")
    shutil.copytree(run, dst, symlinks=True)
    return dst


def rehash(run: str) -> None:
    from planc.checkpoint import sha256_file

    path = os.path.join(run, "report.json")
    report = json.load(open(path))
    report["files"] = {f: sha256_file(os.path.join(run, f)) for f in report["files"]}
    open(path, "w").write(json.dumps(report))


def test_every_file_of_a_run_folder_is_hashed(finished_run, tmp_path):
    for name in ("plan.yaml", "events.jsonl", "tensors.safetensors", "masks.safetensors", "baked.json", "lowered.json"):
        run = copy_of(finished_run, tmp_path / name)
        with open(os.path.join(run, name), "ab") as f:
            f.write(b"\n")
        with pytest.raises(RunFolderError, match=f"{name}: sha256 differs"):
            planc.load(run)


def _masks_meta(run: str, edit) -> None:
    from planc.checkpoint import load_tensors, save_tensors

    path = os.path.join(run, "masks.safetensors")
    tensors, meta = load_tensors(path)
    save_tensors(path, tensors, edit(meta))
    rehash(run)


CRAFTED = {
    "report not UTF-8": lambda run: open(os.path.join(run, "report.json"), "wb").write(b'{"format": "\xff\xfe"}'),
    "report deep": lambda run: open(os.path.join(run, "report.json"), "w").write("[" * 100000 + "]" * 100000),
    "report a list": lambda run: open(os.path.join(run, "report.json"), "w").write("[1, 2]"),
    "files not a dict": lambda run: _edit_report(run, files=[1, 2]),
    "layers not a dict": lambda run: _masks_meta(run, lambda m: dict(m, layers=[1])),
    "layer not a record": lambda run: _masks_meta(run, lambda m: dict(m, layers={k: 5 for k in m["layers"]})),
    "block wrong type": lambda run: _masks_meta(run, lambda m: dict(m, layers={
        k: dict(v, block="8x8") for k, v in m["layers"].items()})),
    "shape missing": lambda run: _masks_meta(run, lambda m: dict(m, layers={
        k: {kk: vv for kk, vv in v.items() if kk != "weight_shape"} for k, v in m["layers"].items()})),
    "param wrong type": lambda run: _masks_meta(run, lambda m: dict(m, layers={
        k: dict(v, param=[1]) for k, v in m["layers"].items()})),
    "meta deep": lambda run: _masks_meta(run, lambda m: dict(m, layers=json.loads("[" * 900 + "]" * 900))),
    "events not objects": lambda run: (open(os.path.join(run, "events.jsonl"), "w").write("[1]\n"), rehash(run)),
    "events not UTF-8": lambda run: (open(os.path.join(run, "events.jsonl"), "wb").write(b"\xff\n"), rehash(run)),
}


def _edit_report(run: str, **fields) -> None:
    path = os.path.join(run, "report.json")
    report = json.load(open(path))
    report.update(fields)
    open(path, "w").write(json.dumps(report))


@pytest.mark.parametrize("craft", sorted(CRAFTED))
def test_crafted_run_folder_metadata_is_one_run_folder_error(finished_run, tmp_path, craft):
    from planc.examples.digits import mlp

    run = copy_of(finished_run, tmp_path)
    CRAFTED[craft](run)
    with pytest.raises(RunFolderError) as info:
        planc.load(run, model=mlp(hidden=32))
    assert "\n" not in str(info.value)


# ---- 3. state belongs to one plan ------------------------------------------------------------
def _compiled(sparsity: float):
    from planc.examples.digits import mlp

    torch.manual_seed(0)
    plan = planc.load_plan(tiny(sparsity))
    pruned = planc.compile(mlp(hidden=32), plan)
    pruned.attach(torch.optim.SGD(pruned.param_groups(lr=0.1)))
    return pruned


def test_runtime_state_of_another_plan_is_refused():
    a, b = _compiled(0.25), _compiled(0.75)
    state = b.state_dict()
    before = {n: m.alive.clone() for n, m in a.masks.items()}
    with pytest.raises(RuntimeStateError, match=r"different plan: layer 'layers.0' is .*0\.75.* there, .*0\.25.* here"):
        a.load_state_dict(state)
    assert all(torch.equal(before[n], m.alive) for n, m in a.masks.items())      # nothing changed
    a.load_state_dict(_compiled(0.25).state_dict())                                # the same plan loads
    old = dict(state)
    del old["plan"]
    with pytest.raises(RuntimeStateError, match="no plan identity"):
        b.load_state_dict(old)


def test_the_checkpoint_checksum_covers_its_metadata(tmp_path):
    """Every single-bit flip in a state file's header either fails to load or loads the
    very same state: the old checksum covered only the tensors."""
    import random

    path = str(tmp_path / "s.safetensors")
    state = {"step": 17, "phase": 2, "lr": 0.1, "position": {"epoch": 3, "index": 5}, "w": torch.arange(4.0)}
    save_state(path, state)
    raw = open(path, "rb").read()
    header = int.from_bytes(raw[:8], "little")
    rnd = random.Random(0)
    accepted_changed = []
    for _ in range(300):
        i = 8 + rnd.randrange(header)
        flipped = bytearray(raw)
        flipped[i] ^= 1 << rnd.randrange(8)
        open(path, "wb").write(bytes(flipped))
        try:
            got = load_state(path)
        except RunFolderError:
            continue
        same = (set(got) == set(state) and torch.equal(got["w"], state["w"])
                and all(got[k] == state[k] for k in state if k != "w"))
        if not same:
            accepted_changed.append(i)
    assert not accepted_changed, f"flips at header bytes {accepted_changed[:10]} changed the state silently"


# ---- 4. a run never destroys a user's work ------------------------------------------------
def _apply(plan_text: str, out, *flags, tmp_path, capsys):
    plan = tmp_path / f"plan-{hashlib.sha256(plan_text.encode()).hexdigest()[:8]}.yaml"
    plan.write_text(plan_text)
    status = main(["apply", str(plan), "--out", str(out), "--progress", "off", *flags])
    return status, capsys.readouterr()


def test_out_onto_another_plans_run_is_refused_and_untouched(finished_run, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path)
    before = snapshot(run)
    status, io = _apply(tiny(0.5), run, tmp_path=tmp_path, capsys=capsys)
    assert status == 2 and "different plan" in io.err and len(io.err.strip().splitlines()) == 1
    assert snapshot(run) == before
    status, io = _apply(tiny(0.75), run, tmp_path=tmp_path, capsys=capsys)          # the same plan, finished
    assert status == 2 and "finished run of this plan" in io.err and snapshot(run) == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("years of work")
    status, io = _apply(tiny(0.75), tmp_path / "mine", tmp_path=tmp_path, capsys=capsys)
    assert status == 2 and "not a planc run" in io.err
    assert os.listdir(tmp_path / "mine") == ["thesis.tex"]


def test_resume_of_a_finished_run_says_so_and_keeps_it(finished_run, tmp_path, capsys):
    run = copy_of(finished_run, tmp_path)
    before = snapshot(run)
    status, io = _apply(tiny(0.75), run, "--resume", tmp_path=tmp_path, capsys=capsys)
    assert status == 0 and "already finished" in io.out
    assert snapshot(run) == before


def test_overwrite_replaces_and_a_failed_run_never_loads(finished_run, tmp_path):
    run = copy_of(finished_run, tmp_path)
    (tmp_path / "copy" / "notes.txt").write_text("mine")
    result = train(planc.load_plan(tiny(0.5)), run, overwrite=True, stop_after=15, progress=False, log=quiet)
    assert not result.finished                                  # the new run was interrupted
    assert not os.path.exists(os.path.join(run, "report.json"))
    with pytest.raises(RunFolderError, match="missing"):
        planc.load(run, trust_factory=True)
    assert (tmp_path / "copy" / "notes.txt").read_text() == "mine"
    with pytest.raises(OutputFolderError, match="unfinished run of this plan .*--resume"):
        train(planc.load_plan(tiny(0.5)), run, progress=False, log=quiet)
    assert train(planc.load_plan(tiny(0.5)), run, resume=True, progress=False, log=quiet).finished
    assert json.load(open(os.path.join(run, "report.json")))["mean_sparsity"] == pytest.approx(0.5)


@pytest.mark.parametrize("flag,links", [("--overwrite", ("events.jsonl", "report.md", "sparsity.png")),
                                        ("--resume", ("events.jsonl",))])
def test_run_files_are_never_written_through_a_link(tmp_path, capsys, flag, links):
    outside = tmp_path / "precious.txt"
    outside.write_text("do not empty me")
    out = tmp_path / "run"
    out.mkdir()
    for name in links:
        os.symlink(outside, out / name)
    status, io = _apply(tiny(0.75, steps=20), out, flag, tmp_path=tmp_path, capsys=capsys)
    assert status == 0, io.err
    assert outside.read_text() == "do not empty me"
    assert not os.path.islink(out / "events.jsonl")


def _refuse_to_work(*a, **k):
    raise AssertionError("the command did its work before checking --out")


def _no_work(monkeypatch):
    import planc.bench
    import planc.compare

    monkeypatch.setattr(planc.bench, "sweep", _refuse_to_work)
    monkeypatch.setattr(planc.compare, "run_jobs", _refuse_to_work)


@pytest.mark.parametrize("command", ["apply", "compare", "bench"])
@pytest.mark.parametrize("blocked", ["under a file", "a file"])
def test_an_out_that_cannot_be_a_folder_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, command, blocked):
    # before: bench timed every kernel for minutes, then died on `--out` as an "internal error"
    _no_work(monkeypatch)
    (tmp_path / "notes.txt").write_text("mine")
    out = tmp_path / "notes.txt" / "sub" if blocked == "under a file" else tmp_path / "notes.txt"
    plan = tmp_path / "plan.yaml"
    plan.write_text(tiny(0.75))
    argv = {"apply": ["apply", str(plan), "--progress", "off"], "compare": ["compare", str(plan)],
            "bench": ["bench"]}[command]
    status = main(argv + ["--out", str(out)])
    err = capsys.readouterr().err
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "internal error" not in err and f"{tmp_path / 'notes.txt'}" in err and "not a folder" in err, err
    assert (tmp_path / "notes.txt").read_text() == "mine"


BENCH_RESULT = {"device": "test cpu", "torch": "x", "backend": "cpu", "cells": [], "models": []}


@pytest.mark.parametrize("command,files", [("bench", ("bench.md", "bench.json")),
                                           ("compare", ("compare.md", "compare.json", "compare_metric.png"))])
def test_bench_and_compare_never_replace_files_they_did_not_write(tmp_path, capsys, monkeypatch, command, files):
    # before: `planc bench` (--out defaults to the current folder) replaced any bench.md there
    import planc.bench
    import planc.compare

    plan = tmp_path / "plan.yaml"
    plan.write_text(tiny(0.75))
    argv = ["bench"] if command == "bench" else ["compare", str(plan)]
    for name in files:
        out = tmp_path / f"user-{name}"
        out.mkdir()
        (out / name).write_text("my own notes")
        _no_work(monkeypatch)
        status = main(argv + ["--out", str(out)])
        err = capsys.readouterr().err
        assert status == 2 and name in err and "not written by planc" in err, err
        assert os.listdir(out) == [name] and (out / name).read_text() == "my own notes"
    # what planc wrote there itself, it replaces
    monkeypatch.setattr(planc.bench, "sweep", lambda **k: dict(BENCH_RESULT))
    monkeypatch.setattr(planc.compare, "run_jobs", lambda *a, **k: [])
    out = tmp_path / "planc's"
    for _ in range(2):
        assert main(argv + ["--out", str(out)]) == 0, capsys.readouterr().err
    assert {files[0], files[1]} <= set(os.listdir(out))


# ---- 5. bounded plan input ------------------------------------------------------------------
def _validate_quickly(path: str) -> subprocess.CompletedProcess:
    # a timeout, not a timing assertion: before the rule a FIFO hung forever and /dev/zero
    # filled memory
    return subprocess.run([sys.executable, "-m", "planc.cli", "validate", path], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


@pytest.mark.parametrize("kind", ["/dev/zero", "fifo", "huge", "directory"])
def test_special_and_huge_plan_files_are_one_line_errors(tmp_path, kind):
    if kind == "fifo":
        path = str(tmp_path / "plan.yaml")
        os.mkfifo(path)
    elif kind == "huge":
        path = str(tmp_path / "plan.yaml")
        with open(path, "w") as f:
            f.write(tiny() + "#" * (2 << 20) + "\n")
    elif kind == "directory":
        path = str(tmp_path)
    else:
        path = kind
    done = _validate_quickly(path)
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and "cannot read plan" in lines[0], done
    expected = {"/dev/zero": "character device", "fifo": "a FIFO", "huge": "over the 256 KiB limit",
                "directory": "a directory"}[kind]
    assert expected in lines[0]


def test_plan_text_over_the_limit_is_refused_in_python():
    with pytest.raises(PlanError, match="over the 256 KiB limit"):
        planc.load_plan(tiny() + "#" * (300 << 10) + "\n")


def test_the_hf_callback_refuses_to_resume_another_plans_state(tmp_path):
    from types import SimpleNamespace

    pytest.importorskip("transformers")
    from planc.integrations.hf import STATE_FILE, PlancCallback

    folder = tmp_path / "checkpoint-12"
    folder.mkdir()
    save_state(str(folder / STATE_FILE), _compiled(0.75).state_dict())
    callback = PlancCallback(_compiled(0.25))
    with pytest.raises(RuntimeStateError, match="different plan"):
        callback._maybe_resume(SimpleNamespace(output_dir=str(tmp_path)), SimpleNamespace(global_step=12))


@pytest.mark.parametrize("out", ["", " "])
@pytest.mark.parametrize("command", ["apply", "compare", "bench"])
def test_an_empty_out_is_refused_not_read_as_the_default(tmp_path, capsys, monkeypatch, command, out):
    # before: `planc apply PLAN --out "$UNSET"` trained into the plan's own output folder,
    # and bench said ": cannot create the folder"
    _no_work(monkeypatch)
    monkeypatch.chdir(tmp_path)
    plan = tmp_path / "plan.yaml"
    plan.write_text(tiny(0.75))
    argv = {"apply": ["apply", str(plan), "--progress", "off"], "compare": ["compare", str(plan)],
            "bench": ["bench"]}[command]
    status = main(argv + ["--out", out])
    err = capsys.readouterr().err
    assert status == 2 and "argument --out: expected a folder, got an empty path" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.yaml"]
