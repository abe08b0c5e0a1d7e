"""Nothing a user loads is unpickled. A tampered run folder or checkpoint gives a clear
RunFolderError (or PlanError), never code execution: the pickle payloads below would
create a marker file if anything unpickled them."""
from __future__ import annotations

import io
import json
import os
import pickle
import shutil

import pytest
import torch

import planc
from planc.checkpoint import save_tensors, sha256_file
from planc.errors import PlancError, RunFolderError

TINY = """
version: 1
name: safe-tiny
model:
  factory: planc.examples.digits:mlp
  kwargs: {hidden: 32}
  example_inputs: [[16, 64]]
targets:
  defaults: {block: [8, 8], sparsity: 0.75, min_blocks: 16}
  rules: [{match: {position: last}, skip: true}]
method: {name: acdc}
schedule: {preset: paper}
train:
  data: {factory: planc.examples.digits:loaders, kwargs: {batch_size: 16, train_size: 160}}
  steps: 40
  optimizer: {name: sgd, lr: 0.1, momentum: 0.9}
  checkpoint_every: 10
lower: {backend: dense}
"""


class Payload:
    """Unpickling this creates `path` (a harmless stand-in for arbitrary code)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    from planc.train import train

    out = str(tmp_path_factory.mktemp("safe") / "run")
    result = train(planc.load_plan(TINY), out, progress=False, log=lambda s: None)
    assert result.finished
    return out


@pytest.fixture
def run(run_folder, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(run_folder, dst)
    return dst


@pytest.fixture
def no_unpickling(monkeypatch):
    """Any call to pickle or torch.load fails the test."""
    def refuse(*a, **k):
        raise AssertionError("something tried to unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def rehash(run) -> None:
    """What a careful attacker does: update report.json's hashes to the tampered files."""
    path = run / "report.json"
    report = json.loads(path.read_text())
    report["files"] = {f: sha256_file(str(run / f)) for f in report["files"]}
    path.write_text(json.dumps(report))


def one_line_error(run, exc=RunFolderError, **kw) -> str:
    with pytest.raises(exc) as info:
        planc.load(str(run), **kw)
    msg = str(info.value)
    assert "\n" not in msg.strip()
    return msg


def test_intact_run_folder_loads_without_unpickling(run, no_unpickling):
    for lowered in (True, False):
        model = planc.load(str(run), lowered=lowered)
        assert not model.training
        assert model(torch.randn(3, 64)).shape == (3, 10)


def edit_store(run, edit) -> None:
    """Change tensors.safetensors as an attacker who re-hashes would: edit(stored, entries)."""
    from planc.checkpoint import load_tensors

    stored, meta = load_tensors(str(run / "tensors.safetensors"))
    edit(stored, meta["entries"])
    save_tensors(str(run / "tensors.safetensors"), stored, meta)
    rehash(run)


def test_resume_from_a_checkpoint_does_not_unpickle(tmp_path, no_unpickling):
    from planc.train import train

    plan = planc.load_plan(TINY)
    out = str(tmp_path / "run")
    assert not train(plan, out, stop_after=20, progress=False, log=lambda s: None).finished
    assert train(plan, out, resume=True, progress=False, log=lambda s: None).finished


@pytest.mark.parametrize("target", ["tensors.safetensors", "masks.safetensors"])
@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_safetensors_swapped_for_a_pickle_never_runs_it(run, tmp_path, target, how):
    marker = tmp_path / "pwned"
    with open(run / target, "wb") as f:
        if how == "pickle":
            pickle.dump({"weight": Payload(marker)}, f)
        else:
            torch.save({"weight": Payload(marker)}, f)
    rehash(run)
    msg = one_line_error(run)
    assert target in msg and "safetensors" in msg
    assert not marker.exists()


def test_checkpoint_swapped_for_a_pickle_never_runs_it(tmp_path):
    from planc.train import CHECKPOINT, train

    plan = planc.load_plan(TINY)
    out = tmp_path / "run"
    train(plan, str(out), stop_after=20, progress=False, log=lambda s: None)
    marker = tmp_path / "pwned"
    for name in os.listdir(out):
        if name.startswith("checkpoint"):
            with open(out / name, "wb") as f:
                pickle.dump(Payload(marker), f)
    with pytest.raises(RunFolderError, match="checkpoint"):
        train(plan, str(out), resume=True, progress=False, log=lambda s: None)
    assert not marker.exists()


def test_edited_report_hash_is_detected(run):
    report = json.loads((run / "report.json").read_text())
    report["files"]["tensors.safetensors"] = "0" * 64
    (run / "report.json").write_text(json.dumps(report))
    assert "sha256" in one_line_error(run)


def test_report_that_is_not_json_is_detected(run):
    (run / "report.json").write_text("{not json")
    assert "report.json" in one_line_error(run)


def test_report_without_hashes_is_detected(run):
    report = json.loads((run / "report.json").read_text())
    del report["files"]
    (run / "report.json").write_text(json.dumps(report))
    assert "report.json" in one_line_error(run)


def test_edited_weights_without_rehash_are_detected(run):
    data = bytearray((run / "tensors.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (run / "tensors.safetensors").write_bytes(bytes(data))
    assert "tensors.safetensors" in one_line_error(run)


@pytest.mark.parametrize("lowered", [True, False])
def test_weights_of_the_wrong_shape_are_named(run, lowered):
    def grow(stored, entries):
        key = entries["lowered/head.weight" if lowered else "baked/head.weight"]["dense"]
        stored[key] = torch.zeros(stored[key].shape[0] + 1, stored[key].shape[1])

    edit_store(run, grow)
    msg = one_line_error(run, lowered=lowered)
    assert "head.weight" in msg and "expected" in msg


def test_pruned_blocks_that_are_not_zero_are_detected(run):
    def fill(stored, entries):
        for name, entry in list(entries.items()):
            if name.startswith("state/") and "bsc" in entry:        # a pruned weight: store it dense, no zeros
                shape = entry["view"]["weight_shape"]
                stored[f"dense-{name}"] = torch.ones(shape)
                entries[name] = {"dense": f"dense-{name}"}

    edit_store(run, fill)
    assert "not zero" in one_line_error(run)


def test_plan_with_a_python_tag_never_runs_it(run, tmp_path):
    marker = tmp_path / "pwned"
    text = (run / "plan.yaml").read_text()
    (run / "plan.yaml").write_text(text.replace("name: ", f"name: !!python/object/apply:os.system ['touch {marker}']\n"
                                                         "# was: ", 1))
    assert "plan.yaml" in one_line_error(run)
    assert not marker.exists()


def test_plan_that_is_not_a_plan_is_detected(run):
    (run / "plan.yaml").write_text("- just\n- a list\n")
    assert "plan.yaml" in one_line_error(run)


def test_events_that_are_not_json_are_detected(run):
    with open(run / "events.jsonl", "a") as f:
        f.write("{broken\n")
    assert "events.jsonl" in one_line_error(run)


@pytest.mark.parametrize("missing", ["plan.yaml", "tensors.safetensors", "masks.safetensors", "report.json",
                                     "lowered.json"])
def test_missing_file_is_named(run, missing):
    os.remove(run / missing)
    assert missing in one_line_error(run)


def test_loading_a_run_folder_runs_none_of_its_code(run, tmp_path, monkeypatch):
    """A run folder's plan names code (model.factory). Loading rebuilds the model from
    the folder's programs and never imports or calls the factory; without programs it is
    called only when asked (trust_factory=True); an edited plan.yaml fails its hash; a
    re-hashed one naming the standard library is refused."""
    import yaml

    import planc.examples.digits as digits
    from planc.examples.digits import mlp

    def refuse(**kw):
        raise AssertionError("the plan's factory was called")

    monkeypatch.setattr(digits, "mlp", refuse)
    assert planc.load(str(run))(torch.randn(2, 64)).shape == (2, 10)
    assert planc.load(str(run), lowered=False)(torch.randn(2, 64)).shape == (2, 10)
    assert planc.load(str(run), model=mlp(hidden=32))(torch.randn(2, 64)).shape == (2, 10)
    monkeypatch.undo()

    for f in ("baked.json", "lowered.json"):                  # a folder saved without programs
        os.remove(run / f)
    report = json.loads((run / "report.json").read_text())
    report["files"] = {k: v for k, v in report["files"].items() if not k.endswith(".json")}
    (run / "report.json").write_text(json.dumps(report))
    msg = one_line_error(run)
    assert "holds no program" in msg and "model=" in msg and "trust_factory=True" in msg
    assert planc.load(str(run), trust_factory=True)(torch.randn(2, 64)).shape == (2, 10)

    marker = tmp_path / "factory-ran"
    doc = yaml.safe_load((run / "plan.yaml").read_text())
    doc["model"]["factory"] = "pathlib:Path.touch"          # a stand-in for code an attacker names
    doc["model"]["kwargs"] = {"self": str(marker)}
    (run / "plan.yaml").write_text(yaml.safe_dump(doc))
    assert "plan.yaml: sha256 differs" in one_line_error(run)
    rehash(run)
    msg = one_line_error(run, trust_factory=True)             # trusted, and still refused
    assert "plan.yaml" in msg and "'pathlib' is part of the Python standard library" in msg
    assert not marker.exists()


def test_cli_never_prints_a_traceback_for_a_tampered_plan(run, capsys):
    from planc.cli import main

    (run / "plan.yaml").write_bytes(b"\x00\xff" * 10)
    assert main(["validate", str(run / "plan.yaml")]) == 2
    assert main(["explain", str(run / "plan.yaml")]) == 2
    assert "Traceback" not in capsys.readouterr().err
