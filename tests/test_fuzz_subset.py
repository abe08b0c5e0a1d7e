"""A fast subset of tools/fuzz.py (the full run: `python3 tools/fuzz.py --cases 1000`,
numbers in docs/robustness.md): generated and mutated plans and command lines go through
planc.cli.main in-process; none may give a traceback, an internal error, an exit status
outside {0, 1, 2}, a non-PlanError from load_plan, or a hang."""
from __future__ import annotations

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _fuzz():
    spec = importlib.util.spec_from_file_location("planc_tools_fuzz", os.path.join(ROOT, "tools", "fuzz.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod             # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


fuzz = _fuzz()


def _report(fz) -> str:
    bad = [o for o in fz.outcomes if o.problem]
    return "\n".join(f"{o.problem}: argv={o.argv} from {o.source}\n{o.output[-600:]}" for o in bad[:5])


def test_generated_cases_give_no_traceback_or_hang(tmp_path):
    fz = fuzz.run(40, seed=20240, work=str(tmp_path / "work"), timeout=30.0)
    assert len(fz.outcomes) >= 40           # each case makes one to five calls into planc
    assert sum(fz.safety_cases.values()) >= 3   # the trust-model cases ran too
    assert not [o for o in fz.outcomes if o.problem], _report(fz)
    statuses = {o.status for o in fz.outcomes if o.kind not in ("load_plan", "safety")}
    assert statuses <= {0, 1, 2} and 2 in statuses


@pytest.mark.parametrize("payload", [fuzz.DEEP_NESTING, b"- " * 20000, fuzz.BILLION_LAUGHS,
                                     bytes(range(256)), b"\xef\xbb\xbf", b"!!python/object/apply:os.system ['true']\n"],
                         ids=["deep-flow", "deep-block", "alias-bomb", "binary", "bom-only", "python-tag"])
def test_nasty_documents_are_one_plan_error(tmp_path, payload, capsys):
    from planc.cli import main

    fz = fuzz.Fuzzer(work=str(tmp_path / "work"), timeout=30.0)
    path = tmp_path / "nasty.yaml"
    path.write_bytes(payload)
    fz.load_plan(payload.decode("utf-8", "replace"), label="nasty")
    o = fz.call(["validate", str(path)], kind="plan")
    assert o.status == 2 and not o.problem, o.output
    assert not [x for x in fz.outcomes if x.problem], _report(fz)


def test_yaml_tags_never_execute(tmp_path):
    from planc.cli import main

    marker = tmp_path / "pwned"
    plan = tmp_path / "p.yaml"
    plan.write_text(f"version: 1\nname: !!python/object/apply:os.system ['touch {marker}']\nmethod: {{name: acdc}}\n")
    assert main(["validate", str(plan)]) == 2
    assert main(["explain", str(plan)]) == 2
    assert not marker.exists()


def test_would_train_guard_keeps_the_fuzzer_from_training(tmp_path):
    fz = fuzz.Fuzzer(work=str(tmp_path / "w"))
    valid = fz.cheap_valid[0]
    assert fz._would_train(["apply", valid, "--out", "x"])
    assert not fz._would_train(["apply", valid, "--steps", "0"])
    assert not fz._would_train(["compare", valid, "--dry-run"])
    assert not fz._would_train(["validate", valid])
