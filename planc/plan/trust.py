"""What code a plan may name.

A plan names code the way a training script does: `model.factory` and `train.data` are
`module:callable` paths that `planc explain` and `planc apply` import and call. planc
cannot tell good code from bad, but it can refuse the callables that are never a model
or a data factory and are the usual tools of a malicious file: anything in the Python
standard library or the builtins (`os:system`, `subprocess:run`, `shutil:rmtree`,
`runpy:run_path`, `builtins:exec`, ...), and planc's own modules other than its
examples (`planc.checkpoint:atomic_write_text` writes any file). The loader checks the
path as written, without importing anything (so `planc validate` runs no code); the
factory call checks again where the imported callable really lives (a path through a
module attribute, `mypkg:os.system`, lands in the standard library).
"""
from __future__ import annotations

import functools
import sys
import types
from typing import Any, Optional

REFUSED_MODULES = frozenset(sys.stdlib_module_names) | {"builtins", "__main__"}
PLANC_ALLOWED = ("planc.examples",)      # planc's own code a plan may name


def _top(module: str) -> str:
    return module.split(".", 1)[0]


def refusal(module: Optional[str]) -> Optional[str]:
    """Why code from `module` may not be called from a plan, or None if it may."""
    if not module:
        return "it is a builtin"
    if _top(module) in REFUSED_MODULES:
        return f"{_top(module)!r} is part of the Python standard library or builtins"
    if _top(module) == "planc" and not any(module == p or module.startswith(p + ".") for p in PLANC_ALLOWED):
        return f"{module!r} is planc's own code (a plan may name planc.examples and code outside planc)"
    return None


def refused_path(path: str) -> Optional[str]:
    """Why the import path `module:callable` is refused, from its text alone."""
    module, _, attr = path.partition(":")
    return refusal(module)


def _home(obj: Any) -> Optional[str]:
    """The module a callable's code comes from."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    if isinstance(obj, (types.FunctionType, types.MethodType, type)):
        return getattr(obj, "__module__", None)
    if isinstance(obj, types.BuiltinFunctionType):
        return getattr(obj, "__module__", None)
    return type(obj).__module__          # a callable instance: its class's __call__ runs


def refused_object(obj: Any) -> Optional[str]:
    """Why the imported object `obj` may not be called from a plan, or None."""
    return refusal(_home(obj))
