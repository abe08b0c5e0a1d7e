"""The malformed-plan corpus: each file reports exactly the problems (line, column, path)
listed in tests/bad_plans/expected.yml, and `planc validate` exits 2 on each."""
from pathlib import Path

import pytest
import yaml

from planc.cli import main
from planc.errors import PlanError
from planc.plan import load_plan

HERE = Path(__file__).parent / "bad_plans"
EXPECTED = yaml.safe_load((HERE / "expected.yml").read_text())
FILES = sorted(p.name for p in HERE.glob("*.yaml"))


def test_corpus_is_large_and_fully_described():
    assert len(FILES) >= 30
    assert sorted(EXPECTED) == FILES


@pytest.mark.parametrize("name", FILES)
def test_bad_plan_reports_exact_positions(name):
    with pytest.raises(PlanError) as info:
        load_plan(HERE / name)
    got = [(p.line, p.col, p.path) for p in info.value.problems]
    want = [(line, col, path) for line, col, path, _ in EXPECTED[name]]
    assert got == want
    for problem, (_, _, _, message) in zip(info.value.problems, EXPECTED[name]):
        assert message in problem.message
        assert problem.file == str(HERE / name)
        assert str(problem).startswith(f"{HERE / name}:{problem.line}:{problem.col}: ")


def test_validate_exits_2_on_every_corpus_plan(capsys):
    assert main(["validate", *(str(HERE / n) for n in FILES)]) == 2
    out = capsys.readouterr()
    assert "Traceback" not in out.out + out.err
    lines = out.out.splitlines()
    assert len(lines) == sum(len(v) for v in EXPECTED.values())    # one line a problem, no "ok"
