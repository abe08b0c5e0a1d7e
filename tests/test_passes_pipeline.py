"""The pass pipeline: order, changed flags, and errors that name the failing pass."""
import pytest

from planc.errors import PassError, SelectError
from planc.passes import FunctionPass, PassResult, Pipeline


def test_runs_in_order_and_reports_changes():
    seen = []
    p = Pipeline([FunctionPass("a", lambda g: PassResult(seen.append("a") or g, False)),
                  FunctionPass("b", lambda g: PassResult(seen.append("b") or g, True))])
    result = p.run("g")
    assert (result.module, result.changed, seen, result.log) == ("g", True, ["a", "b"], (("a", False), ("b", True)))


def test_failure_names_the_pass_and_those_before():
    def boom(g):
        raise ValueError("bad shape")

    p = Pipeline([FunctionPass("trace", lambda g: PassResult(g, True)), FunctionPass("select", lambda g: PassResult(g, False)),
                  FunctionPass("insert_masks", boom)])
    with pytest.raises(PassError) as err:
        p.run(None)
    assert str(err.value) == "pass insert_masks (after trace, select): ValueError: bad shape"
    assert err.value.pass_name == "insert_masks" and err.value.ran_before == ("trace", "select")


def test_planc_errors_keep_their_kind():
    def sel(g):
        raise SelectError("rule 0 matches nothing")

    with pytest.raises(SelectError) as err:
        Pipeline([FunctionPass("select", sel)]).run(None)
    assert isinstance(err.value, PassError) and "pass select: rule 0 matches nothing" == str(err.value)


def test_a_pass_must_return_a_pass_result():
    with pytest.raises(PassError, match="expected the pass to return"):
        Pipeline([FunctionPass("x", lambda g: g)]).run(None)
    with pytest.raises(ValueError):
        Pipeline([FunctionPass("x", lambda g: PassResult(g, False)), FunctionPass("x", lambda g: PassResult(g, False))])


def test_a_plan_rule_error_from_select_carries_its_position(tmp_path):
    """Through planc.compile, as through explain and apply: file:line:col of the rule."""
    import torch

    import planc
    from planc.examples.digits import mlp

    path = tmp_path / "plan.yaml"
    path.write_text("version: 1\nmethod: {name: acdc}\ntargets:\n  defaults: {block: [8, 8]}\n"
                    "  rules:\n    - match: {name: nothere.*}\n      skip: true\n")
    with pytest.raises(SelectError) as err:
        planc.compile(mlp(hidden=32), planc.load_plan(str(path)), torch.randn(4, 64))
    assert f"{path}:6:7: targets.rules[0]: match {{name: nothere.*}} matches no layer" in str(err.value)
