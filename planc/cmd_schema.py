"""Print the plan JSON Schema (draft 2020-12), for editors' YAML language servers.

Point an editor at it with a first line `# yaml-language-server: $schema=plan-v1.json`
after `planc schema > plan-v1.json`."""
from __future__ import annotations

import argparse
import sys
from planc.plan.schema import schema_text
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")


def run(args: argparse.Namespace) -> int:
    text = schema_text()
    if args.output:
        try:
            Path(args.output).write_text(text, encoding="utf-8")
        except OSError as err:
            print(f"planc schema: cannot write {args.output}: {err.strerror or err}", file=sys.stderr)
            return 1
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0
