"""The shipped JSON Schema (planc/schema/plan-v1.json) and the translation of
jsonschema's errors into planc Problems: one line each, at the offending value's YAML
position, saying what was expected and what was found."""
from __future__ import annotations

import difflib
import functools
import json
import math
from importlib import resources
from typing import Any, Iterable, List, Optional, Sequence, Tuple

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match

from planc.errors import Problem
from planc.plan.positions import PathT, Positions
from planc.plan.registry import METHODS

SCHEMA_RESOURCE = "schema/plan-v1.json"
MESSAGE_KEY = "x-planc-message"     # our annotation: the message for a failing subschema
_TYPE_WORDS = {"object": "a mapping", "array": "a list", "string": "a string", "integer": "an integer",
               "number": "a number", "boolean": "true or false", "null": "null"}


@functools.lru_cache(maxsize=None)
def schema_text() -> str:
    """The plan schema as JSON text: the shipped file with its method section filled in
    from the method registry (names, each method's keys, presets)."""
    data = json.loads(resources.files("planc").joinpath(SCHEMA_RESOURCE).read_text(encoding="utf-8"))
    return json.dumps(with_methods(data), indent=2) + "\n"


def with_methods(data: dict) -> dict:
    """`data` (the shipped schema) with the parts that depend on the methods generated
    from planc.plan.registry, so that adding a method needs no schema edit."""
    section = data["$defs"]["method"]
    section["properties"]["name"] = {"enum": list(METHODS), "description": "The pruning method."}
    section["allOf"] = [
        {"if": {"properties": {"name": {"const": name}}, "required": ["name"]},
         "then": {"propertyNames": {"enum": ["name", *spec.keys], MESSAGE_KEY: f"does not apply to method {name}"}}}
        for name, spec in METHODS.items()
    ]
    preset = data["$defs"]["schedule"]["properties"]["preset"]
    preset["description"] = "A named schedule of the method; per method: " + "; ".join(
        f"{name}: {' | '.join(spec.presets)}" for name, spec in METHODS.items()) + "."
    return data


def schema() -> dict:
    """A fresh copy of the plan schema (callers may mutate it)."""
    return json.loads(schema_text())


@functools.lru_cache(maxsize=None)
def _shared() -> dict:
    """The parsed schema, shared read-only by the validator and the message lookup."""
    return json.loads(schema_text())


@functools.lru_cache(maxsize=None)
def _validator() -> Draft202012Validator:
    return Draft202012Validator(_shared())


def describe(value: Any, limit: int = 60) -> str:
    """A value as a message shows it: YAML-like, short."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = repr(value)
    elif isinstance(value, bytes):
        return "binary data"
    elif isinstance(value, dict) and not value:
        return "an empty mapping"
    else:
        try:
            text = json.dumps(value, default=str, allow_nan=True)
        except (TypeError, ValueError, RecursionError):
            text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def suggest(word: str, choices: Iterable[str]) -> str:
    """", did you mean 'x'?" or ""."""
    close = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return f", did you mean {close[0]!r}?" if close else ""


def choices_text(choices: Sequence[Any]) -> str:
    return " | ".join("null" if c is None else str(c) for c in choices)


def _resolve_ref(ref: str) -> dict:
    node: Any = _shared()
    for part in ref.lstrip("#/").split("/"):
        node = node[part]
    return node


def _annotated(err: ValidationError) -> Optional[Tuple[str, int]]:
    """The deepest `x-planc-message` on the way from the root schema to the failing
    keyword, and the instance depth at which it applies. jsonschema leaves `$ref` out of
    schema paths, so we follow a ref whenever the next key is not in the current node."""
    node: Any = _shared()
    keys = list(err.absolute_schema_path)
    depth, found, i = 0, None, 0

    def note(n: Any) -> None:
        nonlocal found
        if isinstance(n, dict) and MESSAGE_KEY in n:
            found = (n[MESSAGE_KEY], depth)

    note(node)
    while i < len(keys):
        key = keys[i]
        while isinstance(node, dict) and key not in node and "$ref" in node:
            node = _resolve_ref(node["$ref"])
            note(node)
        if not isinstance(node, dict) or key not in node:
            break
        if key in ("properties", "patternProperties") and i + 1 < len(keys):
            node, i, depth = node[key][keys[i + 1]], i + 2, depth + 1
        elif key in ("items", "additionalProperties", "contains"):
            node, i, depth = node[key], i + 1, depth + 1
        elif key in ("prefixItems", "allOf", "anyOf", "oneOf") and i + 1 < len(keys):
            node, i = node[key][keys[i + 1]], i + 2
        elif key in ("then", "else", "not", "propertyNames"):
            node, i = node[key], i + 1
        else:
            break                                 # a validation keyword: the end
        note(node)
    return found


def _value_at(data: Any, path: PathT) -> Any:
    for part in path:
        data = data[part]
    return data


def _plain(err: ValidationError) -> str:
    v, want, got = err.validator, err.validator_value, err.instance
    if v == "type":
        kinds = [want] if isinstance(want, str) else list(want)
        return f"expected {' or '.join(_TYPE_WORDS.get(k, k) for k in kinds)}, got {describe(got)}"
    if v == "enum":
        hint = suggest(got, [c for c in want if isinstance(c, str)]) if isinstance(got, str) else ""
        return f"expected one of {choices_text(want)}, got {describe(got)}{hint}"
    if v == "const":
        return f"expected {describe(want)}, got {describe(got)}"
    bounds = {"minimum": ">=", "maximum": "<=", "exclusiveMinimum": ">", "exclusiveMaximum": "<"}
    if v in bounds:
        return f"expected a number {bounds[v]} {want}, got {describe(got)}"
    if v == "minItems":
        return f"expected at least {want} item{'s' * (want != 1)}, got {describe(got)}"
    if v == "maxItems":
        return f"expected at most {want} item{'s' * (want != 1)}, got {describe(got)}"
    if v == "minLength":
        return f"expected a non-empty string, got {describe(got)}"
    if v == "pattern":
        return f"expected a string matching {want}, got {describe(got)}"
    return " ".join(err.message.split())


def _convert(err: ValidationError, data: Any, pos: Positions) -> List[Tuple[Problem, str]]:
    """(problem, kind) pairs for one jsonschema error; kind lets the caller deduplicate."""
    path = tuple(err.absolute_path)
    if err.validator == "additionalProperties" and isinstance(err.instance, dict):
        allowed = list(err.schema.get("properties", {}))
        out = []
        for key in err.instance:
            if key not in allowed:
                hint = suggest(key, allowed) or f" (expected one of: {', '.join(allowed)})"
                out.append((pos.problem(path + (key,), f"unknown key {key!r}{hint}", key=True), "unknown"))
        return out
    if "propertyNames" in err.absolute_schema_path:
        # a key that exists, but for another method: name the method's own keys
        key, note = err.instance, (_annotated(err) or ("is not allowed here", 0))[0]
        own = [k for k in err.validator_value if k != "name"] if isinstance(err.validator_value, list) else []
        tail = f" (its keys: {', '.join(own)})" if own else " (it takes no keys besides name)"
        return [(pos.problem(path + (key,), f"key {key!r} {note}{tail}", key=True), "foreign")]
    if err.validator == "required" and isinstance(err.instance, dict):
        missing = [k for k in err.validator_value if k not in err.instance]
        return [(pos.problem(path, f"missing required key {k!r}"), "required") for k in missing]
    if err.context:
        ann = _annotated(err)
        if ann is None:
            return _convert(best_match(err.context), data, pos)     # anyOf/oneOf: most relevant
    ann = _annotated(err)
    if ann is not None:
        message, depth = ann
        at = path[:depth]
        try:
            value = _value_at(data, at)
        except (KeyError, IndexError, TypeError):
            at, value = path, err.instance
        return [(pos.problem(at, f"{message}, got {describe(value)}"), "value")]
    return [(pos.problem(path, _plain(err)), "value")]


def schema_problems(data: Any, pos: Positions) -> List[Problem]:
    """Every schema problem of `data`, one per offending value, in document order."""
    out: List[Tuple[Problem, str]] = []
    for err in _validator().iter_errors(data):
        out.extend(_convert(err, data, pos))
    unknown = {(p.path) for p, kind in out if kind == "unknown"}
    seen, problems = set(), []
    for p, kind in out:
        if kind == "foreign" and p.path in unknown:
            continue                        # already reported as an unknown key
        if (p.path, p.message) in seen:
            continue                        # an annotated parent reached by two item errors
        seen.add((p.path, p.message))
        problems.append(p)
    return problems


def non_finite(data: Any, path: PathT = ()) -> Iterable[Tuple[PathT, float]]:
    """Paths of NaN/inf numbers: JSON Schema's range checks let NaN through."""
    if isinstance(data, float) and not math.isfinite(data):
        yield path, data
    elif isinstance(data, dict):
        for k, v in data.items():
            yield from non_finite(v, path + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from non_finite(v, path + (i,))
