"""The pass pipeline: order, changed flags, and errors that name the failing pass."""
import pytest
from torch import fx, nn

from planc.errors import PassError, PlancError, SelectError
from planc.passes import Pass, PassContext, Pipeline


def test_runs_in_order_and_reports_changes():
    seen = []
    p = Pipeline([Pass("a", lambda g, c: (seen.append("a") or g, False)), Pass("b", lambda g, c: (seen.append("b") or g, True))])
    ctx = PassContext()
    gm, changed = p.run("g", ctx)
    assert (gm, changed, seen, ctx.log) == ("g", True, ["a", "b"], [("a", False), ("b", True)])


def test_failure_names_the_pass_and_those_before():
    def boom(g, c):
        raise ValueError("bad shape")

    p = Pipeline([Pass("trace", lambda g, c: (g, True)), Pass("select", lambda g, c: (g, False)), Pass("insert_masks", boom)])
    with pytest.raises(PassError) as err:
        p.run(None)
    assert str(err.value) == "pass insert_masks (after trace, select): ValueError: bad shape"
    assert err.value.pass_name == "insert_masks" and err.value.ran_before == ("trace", "select")


def test_planc_errors_keep_their_kind():
    def sel(g, c):
        raise SelectError("rule 0 matches nothing")

    with pytest.raises(SelectError) as err:
        Pipeline([Pass("select", sel)]).run(None)
    assert isinstance(err.value, PassError) and "pass select: rule 0 matches nothing" == str(err.value)


def test_a_pass_must_return_a_pair():
    with pytest.raises(PassError, match="expected the pass to return"):
        Pipeline([Pass("x", lambda g, c: g)]).run(None)
    with pytest.raises(ValueError):
        Pipeline([Pass("x", lambda g, c: (g, 0)), Pass("x", lambda g, c: (g, 0))])
