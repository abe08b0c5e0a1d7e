"""Check plans against the schema and planc's rules; print every problem, one a line.

Text: `file:line:col: path: message` per problem, `file: ok` per valid plan (-q: only
problems). JSON (--json): a list with one object per plan. Exit 0 if all plans are
valid, 2 otherwise."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Callable, Dict, List, Tuple

from planc.errors import PlanError, Problem
from planc.plan.load import MAX_PLAN_BYTES, load_plan

Result = Tuple[str, List[Problem]]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plans", nargs="+", metavar="PLAN", help="plan files (YAML)")
    parser.add_argument("--format", choices=sorted(FORMATS), default="text", help="output format (default: text)")
    parser.add_argument("--json", dest="format", action="store_const", const="json", help="same as --format json")
    parser.add_argument("-q", "--quiet", action="store_true", help="print problems only")


def _text(results: List[Result], quiet: bool) -> str:
    lines = []
    for file, problems in results:
        lines += [str(p) for p in problems] or ([] if quiet else [f"{file}: ok"])
    return "\n".join(lines)


def _json(results: List[Result], quiet: bool) -> str:
    return json.dumps([{"file": file, "valid": not problems,
                        "problems": [dataclasses.asdict(p) for p in problems]} for file, problems in results],
                      indent=2)


FORMATS: Dict[str, Callable[[List[Result], bool], str]] = {"text": _text, "json": _json}


def validate(path: str) -> List[Problem]:
    try:
        load_plan(path if path != "-" else sys.stdin.read(MAX_PLAN_BYTES + 1), file="<stdin>" if path == "-" else None)
    except PlanError as err:
        return list(err.problems)
    return []


def run(args: argparse.Namespace) -> int:
    results = [(path, validate(path)) for path in args.plans]
    out = FORMATS[args.format](results, args.quiet)
    if out:
        print(out)
    return 2 if any(problems for _, problems in results) else 0
