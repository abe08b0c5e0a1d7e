"""The `planc` command: `main(argv) -> exit status`.

Commands live in their own modules, listed in COMMANDS; each exposes
`add_arguments(parser)` and `run(args) -> int`, and keeps heavy imports (torch) inside
`run` so `planc validate` stays fast. Arguments are parsed into an object first, then
the command runs; library code never exits, only `main` turns errors into statuses:

    0  success
    1  anything else (a model that fails to trace, an internal error, ...)
    2  a bad plan or bad arguments
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from types import ModuleType
from typing import Dict, List, Optional, Sequence, Tuple
from planc import __version__
from planc.errors import OutputFolderError, PlancError, PlanError, SelectError

# name -> module: a command is one line here and its module (add_arguments, run).
# A listed module that is not there is left out of the parser, not an error.
COMMANDS: Dict[str, str] = {
    "validate": "planc.cmd_validate",
    "explain": "planc.cmd_explain",
    "schema": "planc.cmd_schema",
    "apply": "planc.cmd_apply",
    "bench": "planc.cmd_bench",
    "compare": "planc.cmd_compare",
}

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def _import(module: str) -> Tuple[Optional[ModuleType], Optional[str]]:
    """(module, None), (None, None) if it does not exist, or (None, why) if it is broken."""
    try:
        return importlib.import_module(module), None
    except ModuleNotFoundError as err:
        if err.name == module:
            return None, None
        return None, f"{type(err).__name__}: {err}"
    except Exception as err:          # a broken command must not take the others down
        return None, f"{type(err).__name__}: {err}"


def build_parser(only: Optional[str] = None) -> Tuple[argparse.ArgumentParser, Dict[str, str]]:
    """The parser, and the commands that failed to import (name -> why). With `only`,
    just that command's module is imported; the others get bare entries."""
    parser = argparse.ArgumentParser(prog="planc", description="A declarative pruning-plan compiler over torch.fx graphs.",
                                     epilog="exit status: 0 ok, 2 bad plan or arguments, 1 anything else")
    parser.add_argument("--version", action="version", version=f"planc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    broken: Dict[str, str] = {}
    for name, module_name in COMMANDS.items():
        if only is not None and name != only:
            sub.add_parser(name)
            continue
        module, why = _import(module_name)
        if module is None:
            if why:
                broken[name] = why
                sub.add_parser(name, help="(unavailable)")
            continue
        doc = (module.__doc__ or "").strip()
        p = sub.add_parser(name, help=" ".join(doc.split("\n\n")[0].split()) if doc else None, description=doc or None,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser, broken


def _command_in(argv: Sequence[str]) -> Optional[str]:
    for token in argv:
        if not token.startswith("-"):
            return token if token in COMMANDS else None
    return None


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _error(text: str) -> None:
    """Print an error to stderr. Under torchrun every rank reports; lines from ranks
    other than 0 say which rank they come from."""
    rank = os.environ.get("RANK", "0") if os.environ.get("WORLD_SIZE", "1") not in ("", "0", "1") else "0"
    prefix = "" if rank == "0" else f"[rank {rank}] "
    print("\n".join(prefix + line for line in text.splitlines()), file=sys.stderr)


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser, broken = build_parser(only=_command_in(argv))
        try:
            args = parser.parse_args(argv)
        except SystemExit as done:          # argparse's own exit: --help (0) or bad usage (2)
            return int(done.code or 0) if not isinstance(done.code, str) else EXIT_USAGE
        if args.command in broken:
            _error(f"planc: command {args.command!r} is unavailable: {_one_line(broken[args.command])}")
            return EXIT_ERROR
        if not getattr(args, "_run", None):
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return int(args._run(args))
    except PlanError as err:
        _error(str(err))                     # one line per problem already
        return EXIT_USAGE
    except (SelectError, OutputFolderError) as err:   # the rules do not fit the model; a bad --out
        _error(f"planc: {_one_line(err)}")
        return EXIT_USAGE
    except PlancError as err:
        _error(f"planc: {_one_line(err)}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        _error("planc: interrupted")
        return 130
    except BrokenPipeError:                  # `planc schema | head`
        return EXIT_OK
    except Exception as err:                 # never a traceback
        _error(f"planc: internal error: {type(err).__name__}: {_one_line(err)}")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
