"""YAML text → plain data plus the position of every node, for error messages.

PyYAML's `safe_load` forgets where values came from, so we compose the node graph
ourselves (a SafeLoader subclass) and build the data while recording, for each JSON path,
the 1-based line and column of the value and of its key. Only what `safe_load` accepts
is accepted: other tags (`!!python/object`, `!custom`) are problems, not constructors.

Why our own walk rather than a constructor with marks: it lets us report every
duplicate key and bad tag at once, with positions, and guard against alias cycles and
alias bombs, which `safe_load` would follow forever or expand without bound.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple, Union

import yaml

from planc.errors import Problem

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")
PathT = Tuple[Union[str, int], ...]

_TAG = "tag:yaml.org,2002:"
_SCALAR_TAGS = {_TAG + t for t in ("str", "int", "float", "bool", "null", "binary")}
_SEQ_TAGS = {_TAG + t for t in ("seq", "omap", "pairs")}
_MAP_TAGS = {_TAG + t for t in ("map", "set")}
# An alias may repeat a subtree; past this many values the document is an alias bomb.
MAX_NODES = 200_000


class PlanLoader(yaml.SafeLoader):
    """SafeLoader that also reads YAML 1.2 floats without a dot (`1e-4`), which YAML 1.1
    reads as a string; a learning rate written that way is a common surprise. It also
    remembers where each alias was written (the composer returns the anchored node, whose
    mark is the anchor's), so a problem with an aliased value points at its use."""

    def __init__(self, stream):
        super().__init__(stream)
        self.alias_marks: Dict[Tuple[int, Any], Any] = {}

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent) and parent is not None:
            mark = self.peek_event().start_mark
            where = (id(parent), id(index) if isinstance(index, yaml.Node) else index)
            self.alias_marks[where] = mark
        return super().compose_node(parent, index)


PlanLoader.add_implicit_resolver(
    _TAG + "float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def format_path(path: PathT) -> str:
    """('targets', 'rules', 1, 'block') -> 'targets.rules[1].block'."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _NAME.match(str(part)):
            out += ("." if out else "") + str(part)
        else:                                   # keep a message one line, unambiguous
            out += "[" + json.dumps(str(part)) + "]"
    return out


@dataclass
class Positions:
    """Where each value (and each mapping key) of a document starts, by JSON path."""

    file: str = "<plan>"
    values: Dict[PathT, Tuple[int, int]] = field(default_factory=dict)
    keys: Dict[PathT, Tuple[int, int]] = field(default_factory=dict)

    def at(self, path: PathT, *, key: bool = False) -> Tuple[int, int]:
        """The position of `path` (its key if asked and known), else of its nearest
        ancestor that has one, else (0, 0) (e.g. a plan given as a dict)."""
        if key and tuple(path) in self.keys:
            return self.keys[tuple(path)]
        p = tuple(path)
        while True:
            if p in self.values:
                return self.values[p]
            if not p:
                return (0, 0)
            p = p[:-1]

    def problem(self, path: PathT, message: str, *, key: bool = False) -> Problem:
        line, col = self.at(path, key=key)
        return Problem(message=message, path=format_path(path), file=self.file, line=line, col=col)

    def problem_at(self, dotted: str, message: str) -> Problem:
        """problem() for a path written as text ("targets.rules[1].block"); a path the
        document does not hold is placed at its nearest ancestor that it does."""
        by_text = {format_path(p): p for p in self.values}
        probe = dotted
        while probe and probe not in by_text:
            shorter = re.sub(r"(^|\.)[^.\[\]]+$|\[[^\]]*\]$", "", probe)
            probe = shorter if shorter != probe else ""     # never loop on a path it cannot parse
        line, col = self.values.get(by_text.get(probe, ()), (0, 0))
        return Problem(message=message, path=dotted, file=self.file, line=line, col=col)


def _mark(node_or_mark) -> Tuple[int, int]:
    mark = getattr(node_or_mark, "start_mark", node_or_mark)
    return (mark.line + 1, mark.column + 1)


class _Builder:
    def __init__(self, loader: PlanLoader, positions: Positions):
        self.loader = loader
        self.pos = positions
        self.problems: List[Problem] = []
        self.count = 0
        self.stack: set = set()

    def fail(self, node, path: PathT, message: str) -> None:
        line, col = _mark(node)
        self.problems.append(Problem(message, format_path(path), self.pos.file, line, col))

    def build(self, node, path: PathT, used_at=None) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise _TooLarge(node)
        self.pos.values.setdefault(path, _mark(used_at or node))
        if id(node) in self.stack:
            self.fail(used_at or node, path, "an alias refers to its own ancestor (recursive data is not allowed)")
            return None
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node, path)
        self.stack.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                if node.tag not in _SEQ_TAGS:
                    return self.bad_tag(node, path)
                return [self.build(child, path + (i,), self.loader.alias_marks.get((id(node), i)))
                        for i, child in enumerate(node.value)]
            if node.tag not in _MAP_TAGS:
                return self.bad_tag(node, path)
            return self.mapping(node, path)
        finally:
            self.stack.discard(id(node))

    def bad_tag(self, node, path: PathT) -> None:
        self.fail(node, path, f"unsupported YAML tag {node.tag.replace(_TAG, '!!')!r} (plans use plain YAML values only)")
        return None

    def scalar(self, node, path: PathT) -> Any:
        if node.tag == _TAG + "timestamp":
            return node.value            # a date is only ever a string in a plan
        if node.tag not in _SCALAR_TAGS:
            return self.bad_tag(node, path)
        try:
            return self.loader.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError) as err:   # e.g. bad !!binary
            self.fail(node, path, f"invalid {node.tag.replace(_TAG, '!!')} value: {err}")
            return None

    def mapping(self, node, path: PathT) -> dict:
        try:
            self.loader.flatten_mapping(node)          # `<<: *base` merge keys, as safe_load
        except yaml.YAMLError as err:
            self.fail(getattr(err, "problem_mark", None) or node, path, _yaml_message(err))
        out: dict = {}
        first: Dict[Any, Tuple[int, int]] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                kind = "list" if isinstance(key_node, yaml.SequenceNode) else "mapping"
                self.fail(key_node, path, f"expected a plain scalar key, got a {kind}")
                continue
            key = self.scalar(key_node, path)          # reports a bad tag itself
            if key is None and key_node.tag not in _SCALAR_TAGS | {_TAG + "timestamp"}:
                continue
            if not isinstance(key, str):
                # JSON paths and the schema speak of string keys; `1:` or `yes:` as a
                # key is nearly always a mistake, so say so rather than coerce.
                self.fail(key_node, path, f"expected a string key, got {key_node.value!r}")
                continue
            if key in first:
                line, col = first[key]
                self.fail(key_node, path + (key,), f"duplicate key {key!r} (first defined at line {line}, column {col})")
                continue
            first[key] = _mark(key_node)
            self.pos.keys[path + (key,)] = _mark(key_node)
            out[key] = self.build(value_node, path + (key,), self.loader.alias_marks.get((id(node), id(key_node))))
        return out


class _TooLarge(Exception):
    def __init__(self, node):
        self.node = node


def _yaml_message(err: yaml.YAMLError) -> str:
    parts = [getattr(err, "context", None), getattr(err, "problem", None)]
    text = "; ".join(str(p) for p in parts if p) or str(err)
    return " ".join(text.split())


def _offset_to_line_col(text: str, offset: int) -> Tuple[int, int]:
    before = text[:offset]
    return before.count("\n") + 1, offset - (before.rfind("\n") + 1) + 1


def decode(data: bytes, file: str) -> Tuple[str, List[Problem]]:
    """UTF-8 (BOM allowed) → text, or a problem at the first bad byte's line:col."""
    try:
        return data.decode("utf-8-sig"), []
    except UnicodeDecodeError as err:
        good = data[: err.start].decode("utf-8", errors="replace")
        control = yaml.reader.Reader.NON_PRINTABLE.search(good)
        if control:             # binary data: name its first control character, as YAML would
            line, col = _offset_to_line_col(good, control.start())
            return "", [Problem(f"not a text file: unacceptable character #x{ord(control.group()):04x}",
                                "", file, line, col)]
        line, col = _offset_to_line_col(good, len(good))
        return "", [Problem(f"not UTF-8 text: byte 0x{data[err.start]:02x} cannot be decoded", "", file, line, col)]


def parse(text: str, file: str = "<plan>") -> Tuple[Any, Positions, List[Problem]]:
    """Parse one YAML document. Returns (data, positions, problems); data is None when
    the text is not YAML at all or is empty (problems then say why)."""
    pos = Positions(file=file)
    loader = None
    try:
        try:
            loader = PlanLoader(text)            # the reader rejects control characters here
            node = loader.get_single_node()
        except yaml.MarkedYAMLError as err:
            mark = err.problem_mark or err.context_mark
            line, col = _mark(mark) if mark else (1, 1)
            return None, pos, [Problem(f"YAML syntax: {_yaml_message(err)}", "", file, line, col)]
        except yaml.reader.ReaderError as err:       # control characters, binary data
            line, col = _offset_to_line_col(text, err.position)
            what = f"#x{err.character:04x}" if isinstance(err.character, int) else repr(err.character)
            return None, pos, [Problem(f"not a text file: unacceptable character {what}", "", file, line, col)]
        except yaml.YAMLError as err:                # any other reader/scanner failure
            return None, pos, [Problem(f"YAML error: {_yaml_message(err)}", "", file, 1, 1)]
        except RecursionError:                       # e.g. 5,000 nested `[`: PyYAML's parser recurses
            return None, pos, [Problem("document is nested too deeply", "", file, 1, 1)]
        if node is None:
            return None, pos, [Problem("empty plan: expected a mapping with at least `version` and `method`",
                                       "", file, 1, 1)]
        builder = _Builder(loader, pos)
        try:
            data = builder.build(node, ())
        except _TooLarge as big:
            line, col = _mark(big.node)
            return None, pos, [Problem(f"document expands to more than {MAX_NODES} values (alias bomb?)",
                                       "", file, line, col)]
        except RecursionError:
            return None, pos, [Problem("document is nested too deeply", "", file, 1, 1)]
        return data, pos, builder.problems
    finally:
        if loader is not None:
            loader.dispose()
