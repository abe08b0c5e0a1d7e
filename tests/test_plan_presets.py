"""Preset expansion: exact sums, the documented arithmetic, and structure."""
from fractions import Fraction

import pytest
from hypothesis import given, settings, strategies as st

from planc.plan.presets import apportion, expand, min_steps, parts, target_fraction
from planc.plan.registry import METHODS

ALL = [(m, p) for m, spec in METHODS.items() for p in spec.presets]


@pytest.mark.parametrize("method,preset", ALL)
def test_weights_sum_to_one(method, preset):
    assert sum(p.weight for p in parts(method, preset)) == 1


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(ALL), st.integers(0, 2_000_000))
def test_phases_are_contiguous_and_sum_exactly(mp, total):
    method, preset = mp
    if total < min_steps(method, preset):
        return
    phases = expand(method, preset, total)
    assert phases[0].start == 0 and phases[-1].end == total
    assert all(a.end == b.start for a, b in zip(phases, phases[1:]))
    assert all(p.steps >= 1 for p in phases) or preset == "pretrained"
    # largest remainder: no phase is more than one step off its exact share
    for p, part in zip(phases, parts(method, preset)):
        assert abs(p.steps - part.weight * total) < 1


def test_min_steps_is_a_true_bound():
    for method, preset in ALL:
        n = min_steps(method, preset)
        for total in range(n, n + 200):
            phases = expand(method, preset, total)
            assert sum(p.steps for p in phases) == total
            assert all(p.steps >= 1 for p in phases) or preset == "pretrained"


def test_apportion_ties_go_to_the_earlier_phase():
    assert apportion([Fraction(1, 3)] * 3, 4) == [2, 1, 1]
    assert apportion([Fraction(1, 2), Fraction(1, 2)], 0) == [0, 0]


def test_sapp_paper_3000_as_documented():
    ph = expand("sequential_attention_pp", "paper", 3000, c=4.0)
    assert len(ph) == 21
    assert (ph[0].kind, ph[0].steps) == ("dense", 300) and (ph[-1].kind, ph[-1].steps) == ("finetune", 450)
    middle = ph[1:-1]
    assert [p.kind for p in middle] == ["sparsify", "sparse", "dense"] * 6 + ["sparsify"]
    assert [p.steps for p in middle] == [119] * 8 + [118] * 11          # 2250 = 19·118 + 8
    assert all(p.curve == "exponential" and p.c == 4.0 for p in middle if p.kind == "sparsify")


def test_sapp_criteo_and_simple():
    ph = expand("sequential_attention_pp", "criteo", 1000)
    assert len(ph) == 30 and ph[0].steps == 200 and ph[-1].steps == 200
    assert sum(p.kind == "sparsify" for p in ph) == 10
    assert [(p.kind, p.steps) for p in expand("sequential_attention_pp", "simple", 1000)] == [
        ("dense", 300), ("sparsify", 300), ("finetune", 400)]


def test_acdc_paper_3000_is_in_150_step_units():
    ph = expand("acdc", "paper", 3000)
    assert [(p.kind, p.steps) for p in ph] == (
        [("dense", 300)] + [("sparse", 150), ("dense", 150)] * 6 + [("sparse", 150), ("dense", 300), ("finetune", 450)])


def test_magnitude_and_powerprop():
    assert [(p.kind, p.steps) for p in expand("magnitude", "oneshot", 1000)] == [("dense", 850), ("finetune", 150)]
    g = expand("magnitude", "gradual", 1000, every=25)
    assert [(p.kind, p.steps) for p in g] == [("dense", 100), ("sparsify", 750), ("finetune", 150)]
    assert g[1].curve == "cubic" and g[1].every == 25 and g[1].c is None
    assert [(p.kind, p.steps) for p in expand("magnitude", "pretrained", 0)] == [("finetune", 0)]
    assert [(p.kind, p.steps) for p in expand("powerprop", "paper", 1000)] == [("dense", 850), ("finetune", 150)]


def test_too_short_raises():
    with pytest.raises(ValueError):
        expand("sequential_attention_pp", "paper", 10)


def test_target_fraction_at_edges():
    dense, sparsify, sparse = expand("sequential_attention_pp", "paper", 100)[:3]
    assert (target_fraction(dense, False), target_fraction(dense, True)) == (0.0, 0.0)
    assert (target_fraction(sparsify, False), target_fraction(sparsify, True)) == (0.0, 1.0)
    assert (target_fraction(sparse, False), target_fraction(sparse, True)) == (1.0, 1.0)
