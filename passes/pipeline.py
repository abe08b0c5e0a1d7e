"""A small pass pipeline. Every pass has one contract, `fn(gm, ctx) -> (gm, changed)`:
it takes a GraphModule (the trace pass takes the nn.Module) and a PassContext holding
what it needs from the plan, and says whether it changed anything. The pipeline runs
passes in order; when one fails it raises a PassError naming that pass and the ones that
ran before it. A planc error raised inside a pass (TraceError, SelectError, ...) comes
out as an error of both kinds, so callers may catch either."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Type

from planc.errors import PassError, PlancError

PassFn = Callable[[Any, "PassContext"], Tuple[Any, bool]]


@dataclass
class PassContext:
    """What passes read besides the graph. `log` records (pass name, changed) as they run."""

    plan: Any = None                          # planc.plan.types.Plan
    example_inputs: Tuple[Any, ...] = ()
    frontend: str = "export"
    options: Dict[str, Any] = field(default_factory=dict)
    log: List[Tuple[str, bool]] = field(default_factory=list)


@dataclass(frozen=True)
class Pass:
    name: str
    fn: PassFn

    def __call__(self, gm, ctx: PassContext):
        return self.fn(gm, ctx)


class Pipeline:
    def __init__(self, passes: Sequence[Pass]):
        names = [p.name for p in passes]
        if len(set(names)) != len(names):
            raise ValueError(f"expected distinct pass names, got {names}")
        self.passes = tuple(passes)

    def run(self, gm, ctx: Optional[PassContext] = None):
        """Run every pass in order; returns (gm, changed by any pass)."""
        ctx = ctx if ctx is not None else PassContext()
        ran: List[str] = []
        any_changed = False
        for p in self.passes:
            try:
                result = p(gm, ctx)
            except Exception as err:   # any failure is reported with its place in the pipeline
                raise _pass_error(err, p.name, ran) from err
            if not (isinstance(result, tuple) and len(result) == 2):
                raise PassError(p.name, f"expected the pass to return (graph_module, changed), got {type(result).__name__}", ran)
            gm, changed = result
            ctx.log.append((p.name, bool(changed)))
            any_changed |= bool(changed)
            ran.append(p.name)
        return gm, any_changed

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
    import copy
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        return copy.deepcopy(module)
