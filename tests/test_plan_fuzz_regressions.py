"""Inputs the fuzzer found that once escaped as tracebacks; each must be a PlanError."""
import pytest

import planc
from planc.errors import PlanError


def test_a_path_with_a_nul_byte_is_a_plan_error():
    with pytest.raises(PlanError, match="cannot read plan"):
        planc.load_plan(__import__("pathlib").Path("plans/x\x00.yaml"))


def test_deeply_nested_yaml_is_a_positioned_plan_error():
    with pytest.raises(PlanError) as info:
        planc.load_plan("[" * 5000)
    (problem,) = info.value.problems
    assert "nested too deeply" in problem.message and problem.line == 1
