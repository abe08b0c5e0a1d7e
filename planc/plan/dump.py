"""Resolved Plan → plan data / YAML that validates and resolves to an equal Plan.

Everything is written out (defaults included) so a run folder's plan says exactly what
ran. A preset is written with its expanded phases: the loader treats that pair as a lock
and rejects it if the phases are not the preset's expansion.
"""
from __future__ import annotations

from typing import Any, Dict

import yaml

from planc.plan.types import Phase, Plan, Rule


def _phase(p: Phase) -> Dict[str, Any]:
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


def plan_to_data(plan: Plan) -> Dict[str, Any]:
    from planc.plan.load import METHOD_KEYS   # one table of which keys a method has

    m = plan.model
    model: Dict[str, Any] = {}
    if m.factory is not None:
        model["factory"] = m.factory.path
        model["kwargs"] = m.factory.kwargs_dict()
    if m.example_inputs:
        model["example_inputs"] = [list(s) for s in m.example_inputs]
    model.update(input_dtype=m.input_dtype, frontend=m.frontend, dynamic_batch=m.dynamic_batch)

    d = plan.targets.defaults
    method: Dict[str, Any] = {"name": plan.method.name}
    for key in METHOD_KEYS[plan.method.name]:
        value = getattr(plan.method, key)
        if value is not None:
            method[key] = list(value) if isinstance(value, tuple) else value

    schedule: Dict[str, Any] = {}
    if plan.schedule.preset is not None:
        schedule["preset"] = plan.schedule.preset
    schedule["phases"] = [_phase(p) for p in plan.schedule.phases]

    t, o = plan.train, plan.train.optimizer
    optimizer: Dict[str, Any] = {"name": o.name, "lr": o.lr, "weight_decay": o.weight_decay}
    if o.name == "sgd":
        optimizer["momentum"] = o.momentum
    else:
        optimizer["betas"] = list(o.betas)
    train: Dict[str, Any] = {}
    if t.data is not None:
        train["data"] = {"factory": t.data.path, "kwargs": t.data.kwargs_dict()}
    train.update(steps=t.steps, optimizer=optimizer, lr_schedule=t.lr_schedule, warmup_steps=t.warmup_steps,
                 eval_every=t.eval_every, checkpoint_every=t.checkpoint_every, loss=t.loss, seed=t.seed,
                 distributed=t.distributed)

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
        "lower": {"backend": lo.backend, "dtype": lo.dtype, "min_speedup": lo.min_speedup},
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
