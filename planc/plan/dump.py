"""Resolved Plan → plan data / YAML that validates and resolves to an equal Plan.

Everything is written out (defaults included) so a run folder's plan says exactly what
ran. A preset is written with its expanded phases: the loader treats that pair as a lock
and rejects it if the phases are not the preset's expansion.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional

import yaml

from planc.plan.registry import METHODS
from planc.plan.types import Distill, Method, Phase, Plan, Rule


def phase_data(p: Phase) -> Dict[str, Any]:
    """A phase as the plan file writes it."""
    out: Dict[str, Any] = {"phase": p.kind, "steps": p.steps}
    if p.kind == "sparsify":
        out["curve"] = p.curve or "exponential"
        if out["curve"] == "exponential" and p.c is not None:
            out["c"] = p.c
        out["initial"] = p.initial
        out["every"] = p.every
    return out


def _rule(r: Rule) -> Dict[str, Any]:
    out: Dict[str, Any] = {"match": {k: v for k, v in (("type", r.match.type), ("name", r.match.name),
                                                        ("position", r.match.position)) if v is not None}}
    if r.skip:
        out["skip"] = True
    if r.block is not None:
        out["block"] = list(r.block)
    if r.sparsity is not None:
        out["sparsity"] = r.sparsity
    if r.min_blocks is not None:
        out["min_blocks"] = r.min_blocks
    return out


def _section(obj, **given) -> Dict[str, Any]:
    """A plan section's plain fields as YAML data (tuples as lists); `given` replaces or,
    as None, leaves out the structured ones. The inverse of the loader's _section."""
    out: Dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        if f.name in given:
            if given[f.name] is not None:
                out[f.name] = given[f.name]
            continue
        value = getattr(obj, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def _distill(d: Optional[Distill]) -> Optional[Dict[str, Any]]:
    if d is None:
        return None
    teacher = "self" if d.teacher is None else {"factory": d.teacher.path, "kwargs": d.teacher.kwargs_dict()}
    out = _section(d, teacher=teacher, modules=list(d.modules) or None)
    if d.output_loss != "kl":
        out.pop("temperature")        # the loader refuses a temperature without kl
    return out


def plan_to_data(plan: Plan) -> Dict[str, Any]:
    m = plan.model
    model = {"factory": m.factory.path, "kwargs": m.factory.kwargs_dict()} if m.factory is not None else {}
    model.update(_section(m, factory=None, example_inputs=[list(s) for s in m.example_inputs] or None))

    d = plan.targets.defaults
    method: Dict[str, Any] = {"name": plan.method.name}
    for key in METHODS[plan.method.name].keys:
        value = getattr(plan.method, key)
        if value is not None or getattr(Method(), key) is not None:     # clip: null is not its default
            method[key] = list(value) if isinstance(value, tuple) else value

    schedule: Dict[str, Any] = {}
    if plan.schedule.preset is not None:
        schedule["preset"] = plan.schedule.preset
    schedule["phases"] = [phase_data(p) for p in plan.schedule.phases]
    schedule["sparse_kernels"] = plan.schedule.sparse_kernels

    t, o = plan.train, plan.train.optimizer
    # an optimizer key of the other kind would be refused by the loader (momentum is sgd's, betas adam's)
    optimizer = _section(o, **({"betas": None} if o.name == "sgd" else {"momentum": None}))
    data = {"factory": t.data.path, "kwargs": t.data.kwargs_dict()} if t.data is not None else None
    train = _section(t, data=data, optimizer=optimizer, distill=_distill(t.distill))

    lo = plan.lower
    out: Dict[str, Any] = {
        "version": plan.version,
        "name": plan.name,
        "model": model,
        "targets": {"defaults": {"block": list(d.block), "sparsity": d.sparsity, "min_blocks": d.min_blocks},
                    "rules": [_rule(r) for r in plan.targets.rules], "budget": plan.targets.budget},
        "method": method,
        "schedule": schedule,
        "train": train,
        "lower": _section(lo, example_inputs=[list(s) for s in lo.example_inputs] or None),
    }
    if plan.output is not None:
        out["output"] = plan.output
    return out


class _Dumper(yaml.SafeDumper):
    """Block style for sections, flow style for short leaf lists and mappings."""

    def ignore_aliases(self, data):          # shared tuples must not become &id001 anchors
        return True


def dump_plan(plan: Plan) -> str:
    """YAML text of a resolved plan; `load_plan(dump_plan(p)) == p`."""
    head = f"# resolved plan{' from ' + plan.source if plan.source else ''}; every default written out\n"
    return head + yaml.dump(plan_to_data(plan), Dumper=_Dumper, sort_keys=False, default_flow_style=None,
                            allow_unicode=True, width=100)
