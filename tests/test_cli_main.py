"""The planc command: exit codes (0 ok, 2 bad plan/arguments, 1 anything else), output
forms, and never a traceback. In-process through cli.main for speed; a few real
subprocesses check the installed entry point."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from planc import cli
from planc.errors import TraceError

ROOT = Path(__file__).resolve().parents[1]
BAD = ROOT / "tests" / "bad_plans"
SAPP = str(ROOT / "plans" / "digits-sapp.yaml")


def run(capsys, *argv):
    code = cli.main(list(argv))
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    return code, out.out, out.err


def test_validate_ok_and_bad(capsys):
    code, out, _ = run(capsys, "validate", SAPP)
    assert code == 0 and out.strip() == f"{SAPP}: ok"
    code, out, _ = run(capsys, "validate", SAPP, str(BAD / "block-one-int.yaml"))
    assert code == 2
    assert out.splitlines()[1] == (f"{BAD / 'block-one-int.yaml'}:8:14: targets.rules[1].block: "
                                   "expected two positive integers, got [16]")
    code, out, _ = run(capsys, "validate", "-q", SAPP)
    assert code == 0 and out == ""


def test_validate_json(capsys):
    code, out, _ = run(capsys, "validate", "--json", SAPP, str(BAD / "many-problems.yaml"))
    assert code == 2
    report = json.loads(out)
    assert report[0] == {"file": SAPP, "valid": True, "problems": []}
    assert not report[1]["valid"] and len(report[1]["problems"]) == 6
    assert set(report[1]["problems"][0]) == {"message", "path", "file", "line", "col"}


def test_validate_stdin(capsys, monkeypatch):
    import io
    monkeypatch.setattr(sys, "stdin", io.StringIO("version: 1\nmethod: {name: bogus}\n"))
    code, out, _ = run(capsys, "validate", "-")
    assert code == 2 and out.startswith("<stdin>:2:16: method.name:")


def test_missing_plan_file_is_exit_2(capsys):
    code, out, _ = run(capsys, "validate", "no/such/plan.yaml")
    assert code == 2 and "cannot read plan" in out


@pytest.mark.parametrize("argv", [[], ["bogus"], ["validate"], ["explain"], ["validate", "--format", "xml", SAPP]])
def test_bad_arguments_exit_2(capsys, argv):
    code, _, err = run(capsys, *argv)
    assert code == 2 and err


def test_help_and_version_exit_0(capsys):
    assert run(capsys, "--help")[0] == 0
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("planc ")


def test_schema_prints_the_schema(capsys, tmp_path):
    code, out, _ = run(capsys, "schema")
    assert code == 0 and json.loads(out)["title"].startswith("planc plan")
    target = tmp_path / "s.json"
    assert run(capsys, "schema", "-o", str(target))[0] == 0
    assert json.loads(target.read_text()) == json.loads(out)


def test_explain_prints_phase_table(capsys):
    code, out, _ = run(capsys, "explain", "--no-layers", str(ROOT / "plans" / "digits-acdc.yaml"))
    assert code == 0
    assert "schedule preset paper: 16 phases, 3000 steps" in out
    rows = [line.split() for line in out.splitlines() if line.strip()[:2].strip().isdigit()]
    assert rows[0][:5] == ["0", "dense", "0", "300", "300"]
    assert rows[-1][:5] == ["15", "finetune", "2550", "3000", "450"]
    code, out, _ = run(capsys, "explain", str(ROOT / "plans" / "digits-magnitude-gradual.yaml"))
    assert code == 0 and "cubic" in out and "0.00 -> 1.00" in out


def _shares(capsys, plan):
    code, out, _ = run(capsys, "explain", "--no-layers", str(ROOT / "plans" / "paper" / plan))
    assert code == 0
    rows = [line.split() for line in out.splitlines() if line.strip()[:2].strip().isdigit()]
    return [(r[1], r[5]) for r in rows]


def test_explain_prints_the_papers_imagenet_schedules(capsys):
    # §4.2: ACDC 10% dense, 7 equal sparse-dense phases, the last dense extended by 5%,
    # 15% sparse; SA++ each phase sparsify-sparse-dense, the 7th (with its extension)
    # one 15% sparsify phase
    assert _shares(capsys, "imagenet-resnet50-acdc.yaml") == (
        [("dense", "10%")] + [("sparse", "5%"), ("dense", "5%")] * 6
        + [("sparse", "5%"), ("dense", "10%"), ("finetune", "15%")])
    assert _shares(capsys, "imagenet-resnet50-sapp.yaml") == (
        [("dense", "10%")] + [("sparsify", "2.5%"), ("sparse", "2.5%"), ("dense", "5%")] * 6
        + [("sparsify", "15%"), ("finetune", "15%")])


def test_explain_prints_the_papers_criteo_schedules(capsys):
    # §4.2: 20% dense, 10 sparse-dense phases, 20% sparse
    assert _shares(capsys, "criteo-acdc.yaml") == (
        [("dense", "20%")] + [("sparse", "3%"), ("dense", "3%")] * 10 + [("finetune", "20%")])
    assert _shares(capsys, "criteo-sapp.yaml") == (
        [("dense", "20%")] + [("sparsify", "1.5%"), ("sparse", "1.5%"), ("dense", "3%")] * 9
        + [("sparsify", "6%"), ("finetune", "20%")])


def test_explain_bad_plan_exit_2(capsys):
    code, _, err = run(capsys, "explain", str(BAD / "c-zero.yaml"))
    assert code == 2 and ":4:6: method.c:" in err


def test_explain_uses_layer_report_and_maps_its_errors(capsys, monkeypatch):
    import types
    fake = types.ModuleType("planc.explain")
    fake.layer_report = lambda plan, show_graph=False: f"LAYERS graph={show_graph}"
    monkeypatch.setitem(sys.modules, "planc.explain", fake)
    code, out, _ = run(capsys, "explain", "--graph", SAPP)
    assert code == 0 and out.rstrip().endswith("LAYERS graph=True")

    def boom(plan, show_graph=False):
        raise TraceError("cannot trace Foo:\nline two")
    fake.layer_report = boom
    code, _, err = run(capsys, "explain", SAPP)
    assert code == 1 and err.strip() == "planc: cannot trace Foo: line two"


def test_internal_errors_are_one_line_exit_1(capsys, monkeypatch):
    import planc.cmd_schema as cmd
    monkeypatch.setattr(cmd, "run", lambda args: 1 / 0)
    code, _, err = run(capsys, "schema")
    assert code == 1 and err.strip() == "planc: internal error: ZeroDivisionError: division by zero"


def test_missing_and_broken_command_modules_do_not_break_others(capsys, monkeypatch, tmp_path):
    (tmp_path / "planc_broken_cmd.py").write_text("raise RuntimeError('half written')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "apply", "planc.cmd_apply_not_there")
    monkeypatch.setitem(cli.COMMANDS, "bench", "planc_broken_cmd")
    assert run(capsys, "validate", SAPP)[0] == 0
    assert run(capsys, "--help")[0] == 0
    code, _, err = run(capsys, "bench")
    assert code == 1 and "unavailable: RuntimeError: half written" in err
    assert run(capsys, "apply")[0] == 2                        # not a command at all


def _sub(*argv, **kw):
    return subprocess.run([sys.executable, "-m", "planc.cli", *argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=60, **kw)


def test_subprocess_exit_codes_and_no_tracebacks():
    ok = _sub("validate", *[str(p) for p in sorted((ROOT / "plans").rglob("*.yaml"))])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    bad = _sub("validate", *[str(p) for p in sorted(BAD.glob("*.yaml"))])
    assert bad.returncode == 2
    assert "Traceback" not in bad.stdout + bad.stderr
    assert all(line.startswith(str(BAD)) for line in bad.stdout.splitlines())
    assert _sub("nope").returncode == 2


def test_entry_point_installed():
    import shutil
    exe = shutil.which("planc")
    if exe is None:
        pytest.skip("planc is not on PATH (pip install -e . makes it)")
    done = subprocess.run([exe, "validate", "-q", SAPP], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout == ""
