"""The pass contract and the pipeline that runs passes.

A pass is built with its typed configuration (what it needs from the plan, given once)
and run on a module: `run(module) -> PassResult(module, changed)`. The five passes —
TracePass, SelectPass, InsertMasksPass, BakePass, LowerPass — follow it, and every caller
runs them through a Pipeline: `planc.compile` runs trace → select → insert_masks,
`Pruned.bake` runs bake, `planc.lower` runs lower. When a pass fails, the Pipeline raises
a PassError naming it and the passes that ran before it; a planc error raised inside a
pass (TraceError, SelectError, ...) comes out as an error of both kinds, so callers may
catch either. What a pass learns goes into `node.meta` as the records of planc.meta."""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence, Tuple, Type

from planc.errors import PassError, PlancError


@dataclass(frozen=True)
class PassResult:
    module: Any          # the (graph) module after the pass
    changed: bool        # whether the pass changed anything


class GraphPass:
    """A pass: `name`, and `run(module) -> PassResult`. Subclasses take their typed
    configuration in __init__."""

    name: str = ""

    def run(self, module) -> PassResult:
        raise NotImplementedError


class FunctionPass(GraphPass):
    """A pass from a function `fn(module) -> PassResult` (small passes, tests)."""

    def __init__(self, name: str, fn: Callable[[Any], PassResult]):
        self.name, self.fn = name, fn

    def run(self, module) -> PassResult:
        return self.fn(module)


@dataclass(frozen=True)
class PipelineResult(PassResult):
    log: Tuple[Tuple[str, bool], ...] = ()      # (pass name, changed) in the order they ran


class Pipeline:
    def __init__(self, passes: Sequence[GraphPass]):
        names = [p.name for p in passes]
        if len(set(names)) != len(names) or not all(names):
            raise ValueError(f"expected distinct, non-empty pass names, got {names}")
        self.passes = tuple(passes)

    def run(self, module) -> PipelineResult:
        """Run every pass in order on `module`."""
        ran: List[str] = []
        log: List[Tuple[str, bool]] = []
        for p in self.passes:
            try:
                result = p.run(module)
            except Exception as err:   # any failure is reported with its place in the pipeline
                raise _pass_error(err, p.name, ran) from err
            if not isinstance(result, PassResult):
                raise PassError(p.name, f"expected the pass to return a PassResult, got {type(result).__name__}", ran)
            module = result.module
            log.append((p.name, bool(result.changed)))
            ran.append(p.name)
        return PipelineResult(module, any(changed for _, changed in log), tuple(log))

    def __repr__(self) -> str:
        return f"Pipeline({' -> '.join(p.name for p in self.passes)})"


_COMBINED: Dict[Type[BaseException], Type[PassError]] = {}


def _pass_error(err: BaseException, name: str, ran: Sequence[str]) -> PassError:
    if isinstance(err, PassError):
        return PassError(name, err.message, ran)
    message = str(err) if isinstance(err, PlancError) else f"{type(err).__name__}: {err}"
    if isinstance(err, PlancError):
        # A PassError that is also the original kind (SelectError, TraceError, ...).
        cls = _COMBINED.get(type(err))
        if cls is None:
            cls = type(f"{type(err).__name__[:-5] if type(err).__name__.endswith('Error') else type(err).__name__}PassError",
                       (PassError, type(err)), {"__module__": __name__})
            _COMBINED[type(err)] = cls
        return cls(name, message, ran)
    return PassError(name, message, ran)


def copy_module(module):
    """A deep copy of a (graph) module. Copying an exported GraphModule deep-copies its
    pytree specs, which makes torch 2.13 emit a FutureWarning about its own internal
    `LeafSpec` use; that says nothing to a planc user, so it is silenced here only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(module)
