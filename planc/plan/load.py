"""Load a plan: read (path, YAML text or dict), validate against the shipped JSON Schema,
check what a schema cannot say, and resolve into planc.plan.types.Plan.

Every problem is reported at once, one line each, at its YAML position
(`file:line:col: path: message`); the only exception this module raises on bad input is
PlanError. Factories are never imported here: validating a plan must not run its code.

A plan that passes, and one that fails (the tests run these examples):

PASS:
    version: 1
    method: {name: acdc}
    targets: {defaults: {block: [8, 8], sparsity: 0.95}}
    train: {steps: 2000}

FAIL:
    version: 1
    method: {name: acdc, c: 4}
    targets: {defaults: {block: [16], sparsity: 1.5}}
    train: {steps: 2000, optimiser: {lr: 0.1}}
    => <plan>:2:22: method.c: key 'c' does not apply to method acdc (its keys: masking)
    => <plan>:3:29: targets.defaults.block: expected two positive integers, got [16]
    => <plan>:3:45: targets.defaults.sparsity: expected a sparsity in [0, 1), got 1.5
    => <plan>:4:22: train.optimiser: unknown key 'optimiser', did you mean 'optimizer'?
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

from planc.errors import PlanError, Problem
from planc.plan import presets
from planc.plan.positions import Positions, decode, parse
from planc.plan.registry import METHODS
from planc.plan.schema import describe, non_finite, schema_problems, suggest
from planc.plan.trust import refused_path
from planc.safeio import KIB, read_limited
from planc.plan.types import (
    Distill, Factory, Lower, Match, Method, ModelSpec, Optimizer, Phase, Plan, Rule, Schedule,
    TargetSettings, Targets, Train, _freeze,
)

# A plan is a few kilobytes; the limit bounds the time and memory a hostile file can take
# (256 KiB of YAML rules parse and validate in about a second on 2 cores; a file over it
# is refused before it is read). docs/plan-format.md states the limit.
MAX_PLAN_BYTES = 256 * KIB

Source = Union[str, os.PathLike, bytes, Mapping[str, Any], Plan]

SPARSIFY_ONLY = ("curve", "c", "initial", "every")


def load_plan(source: Source, *, file: Optional[str] = None) -> Plan:
    """A resolved, validated Plan from a path, YAML text (str or bytes), a dict, or a
    Plan (returned as is). `file` names the source in messages. Raises PlanError with
    every problem found."""
    if isinstance(source, Plan):
        return source
    data, pos, problems, origin = read(source, file=file)
    if data is None:
        raise PlanError(problems)
    problems = check(data, pos, problems)
    if problems:
        raise PlanError(problems)
    return resolve(data, origin=origin, positions=pos)


def read(source: Source, *, file: Optional[str] = None) -> Tuple[Any, Positions, List[Problem], Optional[str]]:
    """(data, positions, problems, origin path) without validating. data is None when
    the source is not a YAML document at all."""
    if isinstance(source, Mapping):
        label = file or "<plan>"
        return _plain(dict(source)), Positions(file=label), [], None
    if isinstance(source, os.PathLike) or (isinstance(source, str) and _looks_like_path(source)):
        path = Path(source)
        label = file or str(source)
        try:
            raw = read_limited(str(path), MAX_PLAN_BYTES)
        except (OSError, ValueError) as err:     # ValueError: a NUL byte in the path; FileRefused
            return None, Positions(file=label), [Problem(f"cannot read plan: {getattr(err, 'strerror', None) or err}", "", label)], str(path)
        text, problems = decode(raw, label)
        if problems:
            return None, Positions(file=label), problems, str(path)
        return (*parse(text, label), str(path))
    label = file or "<plan>"
    if isinstance(source, (str, bytes, bytearray)) and len(source) > MAX_PLAN_BYTES:
        return None, Positions(file=label), [Problem(f"cannot read plan: {len(source)} characters, over the "
                                                     f"{MAX_PLAN_BYTES // KIB} KiB limit", "", label)], None
    if isinstance(source, (bytes, bytearray)):
        text, problems = decode(bytes(source), label)
        if problems:
            return None, Positions(file=label), problems, None
        source = text
    if not isinstance(source, str):
        raise TypeError(f"expected a path, YAML text, a dict or a Plan, got {type(source).__name__}")
    return (*parse(source, label), None)


def _looks_like_path(text: str) -> bool:
    # YAML text of a plan always has a newline or a `key: value`; a path has neither
    # (a bare filename that does not exist is still a path: "cannot read" beats
    # "expected a mapping, got 'x.yaml'").
    if "\n" in text or not text.strip():
        return False
    return text.endswith((".yaml", ".yml", ".json")) or os.path.exists(text) or ": " not in text and "/" in text


def _plain(value: Any) -> Any:
    """Tuples → lists, so a dict built in Python validates like the same YAML."""
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# ---- checks ------------------------------------------------------------------------

def check(data: Any, pos: Positions, problems: List[Problem] = ()) -> List[Problem]:
    """Every problem of a parsed document: the parser's, the schema's, then the rules a
    schema cannot express. Sorted in file order; later problems at a path that already
    has one (e.g. a bad tag that became null) are dropped."""
    problems = list(problems)
    if not isinstance(data, dict):
        kind = "a list" if isinstance(data, list) else describe(data)
        problems.append(pos.problem((), f"expected a mapping of plan sections, got {kind}"))
        return _ordered(problems)
    bad = {p.path for p in problems}
    for p in schema_problems(data, pos) + semantic_problems(data, pos):
        if not any(p.path == b or p.path.startswith(b + ".") or p.path.startswith(b + "[") for b in bad if b):
            problems.append(p)
    if not problems:
        problems = lock_problems(data, pos)     # needs a valid plan: it expands the preset
    return _ordered(problems)


def lock_problems(data: dict, pos: Positions) -> List[Problem]:
    """A schedule with both `preset` and `phases` (as `dump` writes it) is a lock: the
    phases must be exactly the preset's expansion, else the label would lie."""
    schedule = data.get("schedule", {})
    if "preset" not in schedule or "phases" not in schedule:
        return []
    got = _phases(data, schedule["phases"])
    total = sum(p.steps for p in got)
    method, preset = data["method"]["name"], schedule["preset"]
    try:
        expected = presets.expand(method, preset, total, c=_method_c(data), every=_method_every(data))
    except ValueError:
        expected = ()
    if got == expected:
        return []
    i = next((k for k, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    path = ("schedule", "phases", i) if i < len(got) else ("schedule", "phases")
    return [pos.problem(path, f"phases differ from preset {preset!r} expanded over {total} steps"
                        f" (first at phases[{i}]); give either preset or phases")]


def _ordered(problems: List[Problem]) -> List[Problem]:
    unique = list(dict.fromkeys(problems))
    return sorted(unique, key=lambda p: (p.line, p.col))      # stable: same place keeps order


def _get(data: Any, *path, kind=None) -> Any:
    """data[path...] if present and of `kind`, else None (checks run on invalid plans
    too, so they must never assume a type the schema has not confirmed)."""
    for part in path:
        if isinstance(part, int):
            if not isinstance(data, list) or part >= len(data):
                return None
        elif not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    if kind is not None and (not isinstance(data, kind) or isinstance(data, bool) and kind is not bool):
        return None
    return data


def _steps_int(value: Any) -> Optional[int]:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        return None
    return int(value) if float(value).is_integer() and value >= 0 else None


class _Found:
    """Problems found by the semantic checks, each at its YAML position."""

    def __init__(self, pos: Positions):
        self.pos, self.problems = pos, []

    def add(self, path, message: str, key: bool = False) -> None:
        self.problems.append(self.pos.problem(path, message, key=key))


def semantic_problems(data: dict, pos: Positions) -> List[Problem]:
    """The rules a schema cannot say, one check per section."""
    found = _Found(pos)
    for path, value in non_finite(data):
        found.add(path, f"expected a finite number, got {value}")
    # reserved by the language, not built: refused here, not after training has started
    if _get(data, "targets", "budget", kind=str) == "global":
        found.add(("targets", "budget"), "budget 'global' is not implemented; use per_layer "
                  "(each layer reaches its own target: the paper's choice, which beat global pruning there)")
    _check_method(data, found)
    _check_phases(data, found)
    _check_rules(data, found)
    _check_model_and_train(data, found)
    return found.problems


def _steps(data: dict) -> Tuple[bool, Optional[int]]:
    """(whether train.steps is given, its value or the default; None if not a step count)."""
    given = _get(data, "train", "steps") is not None
    return given, _steps_int(_get(data, "train", "steps")) if given else Train().steps


def _check_method(data: dict, found: _Found) -> None:
    """The method's preset (its name, a preset key that agrees with it, enough steps for
    every phase) and the method's own key rules."""
    name = _get(data, "method", "name", kind=str)
    if name not in METHODS:
        return                                       # the schema reported it
    method = METHODS[name]
    schedule = _get(data, "schedule", kind=dict) or {}
    preset = _get(schedule, "preset", kind=str)
    keyed = _get(data, "method", method.preset_key, kind=str) if method.preset_key else None
    if preset is not None:
        names = list(method.presets)
        if preset not in names:
            found.add(("schedule", "preset"), f"method {name} has no preset {preset!r}{suggest(preset, names)}"
                      f" (its presets: {', '.join(names)})")
            preset = None
        elif keyed and keyed != preset:
            found.add(("method", method.preset_key), f"{method.preset_key} {keyed!r} contradicts schedule.preset "
                      f"{preset!r} (give one of them)")
    clip = _get(data, "method", "clip", kind=list) if "clip" in method.keys else None
    if clip and len(clip) == 2 and all(isinstance(v, (int, float)) for v in clip) and not clip[0] < clip[1]:
        found.add(("method", "clip"), f"expected low < high, got {describe(clip)}")
    steps_given, steps = _steps(data)
    chosen = preset or keyed or method.default_preset
    if _get(schedule, "phases", kind=list) is None and steps is not None and chosen in method.presets:
        try:
            presets.expand(name, chosen, steps)
        except ValueError:
            where = ("train", "steps") if steps_given else ("schedule", "preset") if preset else ("method", "name")
            found.add(where, f"train.steps = {steps} is too short for preset {chosen!r} of {name}: some phase"
                      f" would get no step (use at least {presets.min_steps(name, chosen)} steps, or schedule.phases)")


def _check_phases(data: dict, found: _Found) -> None:
    """Explicit phases: sparsify-only keys on sparsify phases, the kinds the method
    allows, and their total."""
    phases = _get(data, "schedule", "phases", kind=list)
    if phases is None:
        return
    method = METHODS.get(_get(data, "method", "name", kind=str) or "")
    allowed = method.phase_kinds if method is not None else None
    total, known = 0, True
    for i, ph in enumerate(phases):
        if not isinstance(ph, dict):
            known = False
            continue
        kind = ph.get("phase")
        if allowed is not None and isinstance(kind, str) and kind not in allowed:
            found.add(("schedule", "phases", i, "phase"), f"method {method.name} prunes once, before the first "
                      f"step: its phases may be {' or '.join(allowed)}, not {kind}")
        n = _steps_int(ph.get("steps"))
        total, known = total + (n or 0), known and n is not None
        if isinstance(kind, str) and kind != "sparsify":
            for key in SPARSIFY_ONLY:
                if key in ph:
                    found.add(("schedule", "phases", i, key), f"{key!r} applies to sparsify phases only, not {kind}",
                              key=True)
        elif kind == "sparsify" and ph.get("curve") == "cubic" and "c" in ph:
            found.add(("schedule", "phases", i, "c"), "'c' applies to the exponential curve only, not cubic", key=True)
    steps_given, steps = _steps(data)
    if known and steps_given and steps is not None and total != steps:
        longer = "longer" if total > steps else "shorter"
        found.add(("schedule", "phases"), f"phases total {total} steps, {longer} than train.steps = {steps}"
                  " (make them equal, or leave train.steps out)")


def _check_rules(data: dict, found: _Found) -> None:
    for i, rule in enumerate(_get(data, "targets", "rules", kind=list) or []):
        if isinstance(rule, dict) and rule.get("skip") is True:
            for key in ("block", "sparsity", "min_blocks"):
                if key in rule:
                    found.add(("targets", "rules", i, key), f"a skipped layer stays dense: {key!r} has no effect",
                              key=True)


def _check_model_and_train(data: dict, found: _Found) -> None:
    model = _get(data, "model", kind=dict) or {}
    if "kwargs" in model and "factory" not in model:
        found.add(("model", "kwargs"), "kwargs without a factory: add model.factory", key=True)
    if "factory" in model and "example_inputs" not in model:
        found.add(("model",), "model.factory needs model.example_inputs (the input shapes used to trace)")
    traced, lowered = _get(model, "example_inputs", kind=list), _get(data, "lower", "example_inputs", kind=list)
    if traced is not None and lowered is not None and len(lowered) != len(traced):
        found.add(("lower", "example_inputs"), f"{len(lowered)} input shape(s) for a model traced with "
                  f"{len(traced)} (model.example_inputs): give one shape per model input")
    for where in (("model", "factory"), ("train", "data", "factory")):
        path = _get(data, *where, kind=str)
        why = refused_path(path) if path else None
        if why:
            found.add(where, f"refused {path!r}: {why}; a plan may name only your own code or a library's "
                      "(explain and apply import and call it)")
    opt = _get(data, "train", "optimizer", kind=dict) or {}
    opt_name = opt.get("name", Optimizer().name)
    if opt_name == "sgd" and "betas" in opt:
        found.add(("train", "optimizer", "betas"), "betas apply to adam and adamw, not sgd", key=True)
    if opt_name in ("adam", "adamw") and "momentum" in opt:
        found.add(("train", "optimizer", "momentum"), f"momentum applies to sgd, not {opt_name} (use betas)", key=True)
    warm = _steps_int(_get(data, "train", "warmup_steps"))
    _, steps = _steps(data)
    if warm is not None and steps is not None and warm > steps:
        found.add(("train", "warmup_steps"), f"warmup_steps = {warm} is longer than train.steps = {steps}")
    if opt.get("fused") is True and _get(data, "train", "distributed") == "fsdp":
        found.add(("train", "optimizer", "fused"), "a fused optimizer under train.distributed fsdp is not "
                  "supported (use ddp)", key=True)
    if _get(data, "train", "precision") == "bfloat16":
        if _get(data, "schedule", "sparse_kernels") is True:
            found.add(("schedule", "sparse_kernels"), "the block-sparse kernels train in float32 only: "
                      "sparse_kernels true cannot go with train.precision bfloat16", key=True)
        if _get(data, "train", "distributed") == "fsdp":
            found.add(("train", "precision"), "train.precision bfloat16 under train.distributed fsdp is not "
                      "supported (use ddp)", key=True)
    _check_distill(data, found)


def _check_distill(data: dict, found: _Found) -> None:
    distill = _get(data, "train", "distill", kind=dict)
    if distill is None:
        return
    where = ("train", "distill")
    path = _get(data, "train", "distill", "teacher", "factory", kind=str)
    why = refused_path(path) if path else None
    if why:
        found.add(where + ("teacher", "factory"), f"refused {path!r}: {why}")
    hidden, modules = distill.get("hidden", Distill().hidden), distill.get("modules")
    if isinstance(hidden, (int, float)) and hidden > 0 and not modules:
        found.add(where + ("hidden",), "a hidden-state loss needs modules: the module name patterns whose "
                  "outputs are compared (e.g. ['bert.encoder.layer.*'])")
    if "temperature" in distill and distill.get("output_loss") != "kl":
        found.add(where + ("temperature",), "temperature applies to output_loss kl only", key=True)
    if _get(data, "train", "distributed") == "fsdp":
        found.add(where, "distillation under train.distributed fsdp is not supported (use ddp)", key=True)


def _method_c(data: dict) -> float:
    c = _get(data, "method", "c")
    return float(c) if isinstance(c, (int, float)) and not isinstance(c, bool) else Method().c


def _method_every(data: dict) -> int:
    e = _get(data, "method", "update_every")
    return int(e) if isinstance(e, (int, float)) and not isinstance(e, bool) else Method().update_every


# ---- resolution (only on valid data) -----------------------------------------------

def _phases(data: dict, raw: List[dict]) -> Tuple[Phase, ...]:
    c, every, start, out = _method_c(data), _method_every(data), 0, []
    for ph in raw:
        kind, n = ph["phase"], int(ph["steps"])
        if kind == "sparsify":
            curve = ph.get("curve", "exponential")
            out.append(Phase(kind, start, n, curve=curve,
                             c=float(ph.get("c", c)) if curve == "exponential" else None,
                             initial=float(ph.get("initial", 0.0)), every=int(ph.get("every", every))))
        else:
            out.append(Phase(kind, start, n))
        start += n
    return tuple(out)


def _factory(raw: Optional[dict], path_key: str = "factory") -> Optional[Factory]:
    if not raw or path_key not in raw:
        return None
    return Factory(raw[path_key], _freeze(raw.get("kwargs")))


def _pair(value, cast):
    return None if value is None else (cast(value[0]), cast(value[1]))


def resolve(data: dict, *, origin: Optional[str] = None, positions: Optional[Positions] = None) -> Plan:
    """Valid plan data → Plan, defaults filled and presets expanded. Call check() first."""
    method, schedule, steps = _resolve_method_and_schedule(data)
    default_name = Path(origin).stem if origin else Plan().name
    return Plan(version=int(data["version"]), name=data.get("name", default_name), model=_resolve_model(data),
                targets=_resolve_targets(data), method=method, schedule=schedule, train=_resolve_train(data, steps),
                lower=_resolve_lower(data), output=data.get("output"), source=origin, positions=positions)


def _like(default: Any, value: Any) -> Any:
    """A YAML value as the type of the field's default (validated data: no errors here)."""
    if value is None or default is None or isinstance(default, str):
        return value
    if isinstance(default, bool):
        return bool(value)
    if isinstance(default, int):
        return int(value)
    if isinstance(default, float):
        return float(value)
    if isinstance(default, tuple):
        return tuple(_like(default[0] if default else None, v) for v in value)
    return value


def _section(cls, raw: Mapping[str, Any], **given) -> Any:
    """A plan section's dataclass from its YAML mapping: `given` fields as they are, every
    other field from the mapping (as its default's type) or its default. A plain key
    of a section is one field of its dataclass and one property of the schema."""
    kwargs = dict(given)
    for f in dataclasses.fields(cls):
        if f.name not in given and f.name in raw:
            kwargs[f.name] = _like(f.default if f.default is not dataclasses.MISSING else None, raw[f.name])
    return cls(**kwargs)


def _resolve_model(data: dict) -> ModelSpec:
    raw = data.get("model", {})
    factory = _factory({"factory": raw["factory"], "kwargs": raw.get("kwargs")}) if "factory" in raw else None
    return _section(ModelSpec, raw, factory=factory, example_inputs=_shapes(raw.get("example_inputs", ())))


def _shapes(raw: Sequence[Sequence[int]]) -> Tuple[Tuple[int, ...], ...]:
    return tuple(tuple(int(n) for n in shape) for shape in raw)


def _resolve_targets(data: dict) -> Targets:
    t_raw = data.get("targets", {})
    dd, ds = t_raw.get("defaults", {}), TargetSettings()
    defaults = TargetSettings(
        block=_pair(dd.get("block", ds.block), int),
        sparsity=float(dd.get("sparsity", ds.sparsity)),
        min_blocks=int(dd.get("min_blocks", ds.min_blocks)),
    )
    rules = tuple(
        Rule(match=Match(**{k: r["match"].get(k) for k in ("type", "name", "position")}),
             skip=bool(r.get("skip", False)),
             block=_pair(r.get("block"), int),
             sparsity=float(r["sparsity"]) if "sparsity" in r else None,
             min_blocks=int(r["min_blocks"]) if "min_blocks" in r else None,
             index=i)
        for i, r in enumerate(t_raw.get("rules", ()))
    )
    return Targets(defaults=defaults, rules=rules, budget=t_raw.get("budget", Targets().budget))


# How a method key's YAML value becomes the Method field (keys not listed are taken as is).
METHOD_KEY_TYPES: Dict[str, Callable[[Any], Any]] = {
    "c": float, "alpha": float, "logits_lr": float, "logits_weight_decay": float, "update_every": int,
    "calibration_batches": int, "damp": float,
    "clip": lambda v: v if isinstance(v, str) else _pair(v, float),
}


def _resolve_method_and_schedule(data: dict) -> Tuple[Method, Schedule, int]:
    m_raw, s_raw, tr = data["method"], data.get("schedule", {}), data.get("train", {})
    spec = METHODS[m_raw["name"]]
    preset = s_raw.get("preset")
    if spec.preset_key and preset is None and "phases" not in s_raw:
        preset = m_raw.get(spec.preset_key, spec.default_preset)       # the key names the preset
    kwargs = {k: m_raw[k] for k in spec.keys if k in m_raw}
    kwargs = {k: (METHOD_KEY_TYPES[k](v) if v is not None and k in METHOD_KEY_TYPES else v) for k, v in kwargs.items()}
    if spec.preset_key and preset in spec.presets:
        kwargs.setdefault(spec.preset_key, preset)
    method = Method(name=spec.name, **kwargs)
    if "phases" in s_raw:
        phases = _phases(data, s_raw["phases"])
        steps = int(tr.get("steps", sum(p.steps for p in phases)))
    else:
        steps = int(tr.get("steps", Train().steps))
        preset = preset or spec.default_preset
        phases = presets.expand(spec.name, preset, steps, c=method.c, every=method.update_every)
    return method, Schedule(phases=phases, preset=preset, sparse_kernels=s_raw.get("sparse_kernels", "auto")), steps


def _resolve_train(data: dict, steps: int) -> Train:
    raw = data.get("train", {})
    optimizer = _section(Optimizer, raw.get("optimizer", {}))
    return _section(Train, raw, data=_factory(raw.get("data")), steps=steps, optimizer=optimizer,
                    distill=_resolve_distill(raw.get("distill")))


def _resolve_distill(raw: Optional[dict]) -> Optional[Distill]:
    if raw is None:
        return None
    teacher = raw.get("teacher", "self")
    return _section(Distill, raw, teacher=None if teacher == "self" else _factory(teacher))


def _resolve_lower(data: dict) -> Lower:
    raw = data.get("lower", {})
    return _section(Lower, raw, example_inputs=_shapes(raw.get("example_inputs", ())))
