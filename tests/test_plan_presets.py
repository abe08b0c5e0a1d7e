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


def _shares(method, preset):
    return [(p.kind, p.weight) for p in parts(method, preset)]


def test_acdc_paper_fractions_follow_kuznedelev():
    # §4.2: 10% dense, 7 equal sparse-dense phases, the last dense extended by 5%, 15% sparse
    F = Fraction
    assert _shares("acdc", "paper") == (
        [("dense", F(1, 10))] + [("sparse", F(1, 20)), ("dense", F(1, 20))] * 6
        + [("sparse", F(1, 20)), ("dense", F(1, 10)), ("finetune", F(15, 100))])


def test_sapp_paper_fractions_replace_the_seventh_phase_by_one_sparsify():
    # each 10% sparse-dense phase -> sparsify 2.5%, sparse 2.5%, dense 5% (planc's split);
    # the 7th phase with its 5% extension (15%) -> one sparsify phase; then 15% sparse
    F = Fraction
    assert _shares("sequential_attention_pp", "paper") == (
        [("dense", F(1, 10))] + [("sparsify", F(1, 40)), ("sparse", F(1, 40)), ("dense", F(1, 20))] * 6
        + [("sparsify", F(15, 100)), ("finetune", F(15, 100))])
    # the old 19-equal-phase split made the last sparsify 75%/19 = 3.95%: 3.8x shorter
    assert parts("sequential_attention_pp", "paper")[-2].weight / (F(75, 100) / 19) == F(19, 5)


def test_sapp_paper_3000_as_documented():
    ph = expand("sequential_attention_pp", "paper", 3000, c=4.0)
    assert len(ph) == 21
    assert [(p.kind, p.steps) for p in ph] == (
        [("dense", 300)] + [("sparsify", 75), ("sparse", 75), ("dense", 150)] * 6
        + [("sparsify", 450), ("finetune", 450)])
    assert all(p.curve == "exponential" and p.c == 4.0 for p in ph if p.kind == "sparsify")


def test_sapp_without_sparsify_is_acdc_schedule():
    # Appendix D.1: "alternating dense and sparse phases, each of equal duration"
    assert _shares("sequential_attention_pp", "paper-no-sparsify") == _shares("acdc", "paper")


def test_criteo_fractions():
    # §4.2: 20% dense, 10 sparse-dense phases, 20% sparse (no extension stated)
    F = Fraction
    assert _shares("acdc", "criteo") == (
        [("dense", F(1, 5))] + [("sparse", F(3, 100)), ("dense", F(3, 100))] * 10 + [("finetune", F(1, 5))])
    assert _shares("sequential_attention_pp", "criteo") == (
        [("dense", F(1, 5))] + [("sparsify", F(3, 200)), ("sparse", F(3, 200)), ("dense", F(3, 100))] * 9
        + [("sparsify", F(6, 100)), ("finetune", F(1, 5))])


def test_sapp_simple():
    assert [(p.kind, p.steps) for p in expand("sequential_attention_pp", "simple", 1000)] == [
        ("dense", 300), ("sparsify", 300), ("finetune", 400)]


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
