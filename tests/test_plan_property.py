"""Property: however a valid plan is mutated (keys deleted or inserted, values replaced
by other types or garbage, text spliced), loading it either succeeds or raises PlanError,
and every problem of a plan loaded from text has a position."""
import copy
import os
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from planc.errors import PlanError
from planc.plan import load_plan

# PLANC_FUZZ=5000 for a long run; the default keeps the suite fast.
N = int(os.environ.get("PLANC_FUZZ", "150"))
ROOT = Path(__file__).resolve().parents[1]
BASES = [yaml.safe_load((ROOT / "plans" / n).read_text())
         for n in ("digits-sapp.yaml", "digits-acdc.yaml", "digits-magnitude-gradual.yaml", "digits-tiny.yaml")]
BASES.append({"version": 1, "method": {"name": "powerprop"},
              "schedule": {"phases": [{"phase": "dense", "steps": 5}, {"phase": "sparsify", "steps": 5, "c": 2}]}})
TEXTS = [(ROOT / "plans" / n).read_text() for n in ("digits-sapp.yaml", "digits-powerprop.yaml")]

garbage = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(["paper", "dense", "sparsify", "a:b", "1e-4", ".nan", "cubic"]),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6)
KEYS = ["version", "method", "name", "steps", "phases", "phase", "preset", "block", "sparsity", "c", "skip",
        "match", "rules", "defaults", "factory", "kwargs", "example_inputs", "variant", "clip", "every", "x"]


def _containers(node, out):
    if isinstance(node, (dict, list)):
        out.append(node)
        for child in (node.values() if isinstance(node, dict) else node):
            _containers(child, out)
    return out


@st.composite
def mutated(draw):
    plan = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 4))):
        nodes = _containers(plan, [])
        node = draw(st.sampled_from(nodes))
        op = draw(st.sampled_from(["delete", "insert", "replace"]))
        if isinstance(node, dict):
            if op == "delete" and node:
                del node[draw(st.sampled_from(sorted(node)))]
            elif op == "insert":
                node[draw(st.sampled_from(KEYS))] = draw(garbage)
            elif node:
                node[draw(st.sampled_from(sorted(node)))] = draw(garbage)
        elif node:
            i = draw(st.integers(0, len(node) - 1))
            if op == "delete":
                del node[i]
            else:
                node.insert(i, draw(garbage)) if op == "insert" else node.__setitem__(i, draw(garbage))
    return plan


def _check_text(text):
    try:
        load_plan(text)
    except PlanError as err:
        assert err.problems
        for p in err.problems:
            assert p.line > 0 and p.col > 0, str(p)
            assert "\n" not in str(p)


@settings(max_examples=N, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_plans_raise_only_plan_errors_with_positions(plan):
    try:
        load_plan(plan)                         # as a dict: no positions, still only PlanError
    except PlanError as err:
        assert err.problems and all(p.message for p in err.problems)
    _check_text(yaml.safe_dump(plan, sort_keys=False))      # asserts positions and one line each


@settings(max_examples=N, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(TEXTS), st.data())
def test_spliced_text_raises_only_plan_errors_with_positions(text, data):
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(text)))
        j = data.draw(st.integers(i, min(len(text), i + 8)))
        junk = data.draw(st.text(alphabet=st.sampled_from(list(":-[]{}&*!|>'\"#\t\n ,?%@`") + ["x", "1", "\x00", "é"]),
                                 max_size=4))
        text = text[:i] + junk + text[j:]
    _check_text(text)


@settings(max_examples=max(1, N // 2), deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes(data):
    try:
        load_plan(data)
    except PlanError as err:
        assert all(p.line > 0 for p in err.problems)
