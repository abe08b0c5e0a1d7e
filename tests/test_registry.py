"""The method registry (planc.plan.registry) is the one record of each method: the JSON
Schema's method section is generated from it and agrees with it, and every field of a
record points at something real (a strategy class, a mask mode, presets that expand)."""
from __future__ import annotations

import dataclasses

import pytest

from planc.mask import MODES
from planc.plan import presets
from planc.plan.registry import DEFAULT_METHOD, METHODS
from planc.plan.schema import schema
from planc.plan.types import Method
from planc.runtime.methods import PruningMethod, make_method


def test_the_schema_and_the_registry_agree():
    section = schema()["$defs"]["method"]
    assert section["properties"]["name"]["enum"] == list(METHODS)
    allowed = {rule["if"]["properties"]["name"]["const"]: rule["then"]["propertyNames"]["enum"]
               for rule in section["allOf"]}
    assert allowed == {name: ["name", *spec.keys] for name, spec in METHODS.items()}
    keys = {k for spec in METHODS.values() for k in spec.keys}
    assert keys <= set(section["properties"])                      # every key has a type in the schema
    fields = {f.name for f in dataclasses.fields(Method)} - {"name"}
    assert keys == fields                                          # and a default in the resolved Method
    preset_doc = schema()["$defs"]["schedule"]["properties"]["preset"]["description"]
    assert all(f"{name}: {' | '.join(spec.presets)}" in preset_doc for name, spec in METHODS.items())


@pytest.mark.parametrize("name", list(METHODS))
def test_every_record_points_at_real_things(name):
    spec = METHODS[name]
    strategy = make_method(Method(name=name))
    assert isinstance(strategy, PruningMethod) and type(strategy).__name__ == spec.strategy
    assert spec.mask_mode in MODES and strategy.mode == spec.mask_mode
    assert set(spec.shown) <= set(spec.keys)
    for preset in spec.presets:
        phases = presets.expand(name, preset, 1000)
        assert sum(p.steps for p in phases) == 1000
    assert spec.default_preset == list(spec.presets)[0]
    if spec.preset_key:
        assert spec.preset_key in spec.keys
    assert set(spec.may_be_empty) <= set(spec.presets)
    assert DEFAULT_METHOD in METHODS and Method().name == DEFAULT_METHOD


def test_the_schema_lists_the_lowering_backends():
    """The plan's lower.backend is checked against the backend registry (kernels/backends.py;
    it needs torch, which `planc validate` does not load, so the schema lists the names)."""
    from planc.kernels.backends import BACKENDS, PLAN_NAMES

    assert schema()["$defs"]["lower"]["properties"]["backend"]["enum"] == list(PLAN_NAMES)
    import torch

    for backend in BACKENDS.values():
        if backend.unavailable(torch.device("cpu")) is None:       # its kernel module imports here
            module = backend.module()
            assert all(callable(getattr(module, f)) for f in ("forward_stored", "grad_input", "grad_values"))
        assert backend.values_order in ("row", "col")
