"""trace: an nn.Module and example inputs -> an fx GraphModule that behaves like it.

Frontends (docs/passes.md, "trace"):

- `export` (default): `torch.export.export(strict=False)` with the batch dimension of
  every tensor input, and the sequence dimension of 2-D integer (token id) inputs, left
  free (`Dim.AUTO`, so export never fails for a dimension it has to specialise).
- `symbolic`: `torch.fx.symbolic_trace` with leaf modules of the caller's choosing.
- `auto`: export, then symbolic, then the largest traceable submodules: the model is
  copied, every largest child subtree that symbolic_trace can trace (and that applies a
  weight) is replaced by its GraphModule, and the result is wrapped in a GraphModule that
  calls the copy as `module` (later passes walk nested GraphModules; names then carry a
  `module.` prefix, which rules ignore as they ignore DDP's).

Train and eval mode. `ExportedProgram.module()` refuses `.train()`/`.eval()` (torch 2.13
raises NotImplementedError) and bakes the mode it was exported in into the graph:
`aten.dropout(x, p, True)`, `aten.batch_norm(..., training=True, ...)` plus an
`add_` on num_batches_tracked, `scaled_dot_product_attention(..., dropout_p)` (transformers
picks dropout_p from self.training), and every other op with a `train`/`training` flag:
the in-place forms (`dropout_`, `alpha_dropout_`, `feature_dropout_`,
`feature_alpha_dropout_`, which `nn.Dropout(inplace=True)` records), `native_dropout`,
`rrelu`, `lstm`/`gru`/`rnn_*` with dropout, `instance_norm` with running statistics. So
this pass exports in *train* mode — where every mode-dependent op is present — and
rewrites those ops into small modules under `planc_modes` that read `self.training`
(found through the op's schema, so a variant no table lists is not missed), then returns
a plain GraphModule (train/eval work, the mode of the original model is kept).

With `check=True` (default) the traced module is run against the original on the
example inputs in eval mode and, with one RNG seed, in train mode (buffers restored
afterwards), comparing with a tolerance relative to the output's magnitude (an absolute
one passes anything on a model whose outputs are 1e-9); two eval-mode forwards of the
trace with different seeds must agree exactly (a random op left on in eval mode). A
mismatch is a TraceError (and `auto` moves on). A model whose output holds a KV cache
(transformers' DynamicCache) cannot be exported: the error says to set use_cache=False.

Parameters and buffers are shared with the original model, as symbolic_trace and
torch.export both do: the passes after this one rewrite the graph, not the model.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import sys
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils import _pytree as pytree

from planc.errors import TraceError

from .nodes import weight_uses
from .pipeline import GraphPass, PassResult

FRONTENDS = ("export", "symbolic", "auto")
aten = torch.ops.aten

# Bool arguments by which an op takes the module's mode; export records them as constants.
_MODE_FLAGS = ("train", "training")
# instance_norm's flag follows the mode only when running statistics are tracked
# (InstanceNorm: use_input_stats = training or not track_running_stats).
_STATS_FLAG = "use_input_stats"
# The check's tolerance: max |trace - model| over the largest magnitude of either output,
# at least a few units in the last place of the output's dtype.
_CHECK_RTOL = 1e-5


# ---- the modules that make an exported graph follow .train()/.eval() -----------------

class TrainFlagOp(nn.Module):
    """An exported op whose train flag export baked in as True (dropout and its in-place
    and feature/alpha variants, native_dropout, rrelu, lstm/gru dropout, ...), called with
    the flag set from the module's mode instead. Takes the op's arguments as they were."""

    def __init__(self, op, flag: str, index: int):
        super().__init__()
        self.op, self.flag, self.index = op, flag, index

    def forward(self, *args, **kwargs):
        if self.flag in kwargs or len(args) <= self.index:
            kwargs[self.flag] = self.training
        else:
            args = args[:self.index] + (self.training,) + args[self.index + 1:]
        return self.op(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.op}, {self.flag}=self.training"


class TrainBatchNorm(nn.Module):
    """An exported batch_norm: batch statistics and running-stat updates in train mode,
    running statistics in eval mode (as nn.BatchNorm does). The tensors stay where
    export put them (get_attr inputs), so the state dict does not change."""

    def __init__(self, momentum: float, eps: float):
        super().__init__()
        self.momentum, self.eps = float(momentum), float(eps)

    def forward(self, x, weight, bias, running_mean, running_var, num_batches_tracked=None):
        if self.training and num_batches_tracked is not None:
            num_batches_tracked.add_(1)
        use_batch_stats = self.training or running_mean is None
        return F.batch_norm(x, running_mean, running_var, weight, bias, use_batch_stats, self.momentum, self.eps)

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, eps={self.eps}"


class TrainSDPA(nn.Module):
    """scaled_dot_product_attention whose attention dropout applies in train mode only."""

    def __init__(self, dropout_p: float):
        super().__init__()
        self.dropout_p = float(dropout_p)

    def forward(self, q, k, v, attn_mask=None, is_causal=False, scale=None, enable_gqa=False):
        p = self.dropout_p if self.training else 0.0
        return aten.scaled_dot_product_attention.default(q, k, v, attn_mask, p, is_causal,
                                                          scale=scale, enable_gqa=enable_gqa)

    def extra_repr(self) -> str:
        return f"dropout_p={self.dropout_p}"


# ---- entry points ---------------------------------------------------------------------

def trace(model: nn.Module, example_inputs: Any = (), *, frontend: str = "export", dynamic: bool = True,
          dynamic_shapes: Any = None, leaf_modules: Iterable[Any] = (), check: bool = True) -> fx.GraphModule:
    """Trace `model` into a GraphModule with the chosen frontend (see the module doc).

    example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
    dynamic: leave batch (and token sequence) dimensions free (export only).
    dynamic_shapes: an explicit torch.export dynamic_shapes spec (overrides `dynamic`).
    leaf_modules: module classes or qualified names symbolic_trace must not enter.
    check: run the trace against the model on the example inputs, in both modes.
    Raises TraceError naming the module and the reason when nothing traces."""
    if frontend not in FRONTENDS:
        raise TraceError(f"unknown frontend {frontend!r}: expected one of {', '.join(FRONTENDS)}")
    if isinstance(model, fx.GraphModule):
        return model                     # already a graph: the later passes work on it as is
    if not isinstance(model, nn.Module):
        raise TraceError(f"expected a torch.nn.Module to trace, got {type(model).__name__}")
    args, kwargs = _split_inputs(example_inputs)
    leaves = tuple(leaf_modules)
    name = type(model).__name__
    attempts = {
        "export": lambda: _export(model, args, kwargs, dynamic, dynamic_shapes),
        "symbolic": lambda: _symbolic(model, leaves),
        "submodules": lambda: _submodules(model, leaves),
    }
    order = {"export": ["export"], "symbolic": ["symbolic"], "auto": ["export", "symbolic", "submodules"]}[frontend]
    reasons: List[str] = []
    for how in order:
        try:
            gm = attempts[how]()
            if check and (args or kwargs):
                _check(model, gm, args, kwargs, how)
            return gm
        except TraceError as err:
            reasons.append(str(err))
        except Exception as err:   # the frontends raise anything; keep the first line
            reasons.append(f"{how}: {type(err).__name__}: {_first_line(err)}")
    raise TraceError(f"could not trace {name} ({frontend} frontend): " + "; ".join(reasons))


@dataclass(frozen=True)
class TraceConfig:
    """What trace needs (trace()'s arguments; see there)."""

    example_inputs: Any = ()
    frontend: str = "export"
    dynamic: bool = True
    dynamic_shapes: Any = None
    leaf_modules: Tuple[Any, ...] = ()
    check: bool = True


class TracePass(GraphPass):
    """trace as a pass: takes the nn.Module, gives the GraphModule."""

    name = "trace"

    def __init__(self, config: TraceConfig):
        self.config = config

    def run(self, model) -> PassResult:
        c = self.config
        gm = trace(model, c.example_inputs, frontend=c.frontend, dynamic=c.dynamic, dynamic_shapes=c.dynamic_shapes,
                   leaf_modules=c.leaf_modules, check=c.check)
        return PassResult(gm, gm is not model)


# ---- export -----------------------------------------------------------------------------

def _export(model, args, kwargs, dynamic, dynamic_shapes) -> fx.GraphModule:
    # A strided view as example input (x[:, :64] of a wider batch) makes torch 2.13's
    # exported guard function fail on every later call ("'NoneType' object has no
    # attribute 'size'"); the graph does not depend on the example's strides, so export
    # a contiguous copy.
    args, kwargs = pytree.tree_map_only(torch.Tensor, lambda t: t.contiguous(), (args, kwargs))
    if dynamic_shapes is None and dynamic:
        dynamic_shapes = dynamic_shapes_for(model, args, kwargs)
    was_training = model.training
    model.train()            # every mode-dependent op appears in a train-mode export
    try:
        with _torch_output_held():
            ep = torch.export.export(model, args, kwargs or None, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception:
        _refuse_cache_output(model, args, kwargs)   # the likeliest cause on a decoder: say what to set
        raise
    finally:
        model.train(was_training)
    em = ep.module()
    gm = fx.GraphModule(em, em.graph, class_name=type(model).__name__)   # a plain GraphModule: train/eval work
    _copy_non_persistent(model, gm)
    _follow_mode(gm)
    gm.train(was_training)
    return gm


def _refuse_cache_output(model: nn.Module, args, kwargs) -> None:
    """TraceError when the model's output holds a KV cache (transformers' DynamicCache and
    its kin): torch.export cannot return one, and a pruning trace has no use for it. Runs
    one eval-mode forward (no buffer moves), only after export has failed."""
    was_training = model.training
    try:
        out = _run(model.eval(), args, kwargs)
    except Exception:
        return                          # the model cannot run these inputs: export's own error says more
    finally:
        model.train(was_training)
    for leaf in pytree.tree_leaves(out):
        if any(cls.__name__.endswith("Cache") for cls in type(leaf).__mro__):
            how = " (config.use_cache = False)" if hasattr(getattr(model, "config", None), "use_cache") else ""
            raise TraceError(f"export: model output holds a KV cache ({type(leaf).__name__}); "
                             f"build the model with use_cache=False{how}")


class _Held(logging.Handler):
    """Stands in for one logger's handlers and keeps what reaches them, in order."""

    def __init__(self, handlers, sink: list):
        super().__init__(logging.DEBUG)
        self.handlers, self.sink = handlers, sink

    def emit(self, record):
        self.sink.append((self.handlers, record))


@contextlib.contextmanager
def _torch_output_held():
    """Hold what torch prints while export runs. When export fails, its fake-tensor and
    shape loggers print the failure as a logged traceback, and export itself prints the
    partial graph to sys.stderr, all before the exception reaches planc, which reports it
    in one line: what was held is dropped. When export succeeds, the held records and text
    go out as they would have."""
    loggers = [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)
               if n == "torch" or n.startswith("torch.")]
    sink: list = []
    saved = {lg: lg.handlers for lg in loggers if lg.handlers}
    for lg, handlers in saved.items():
        lg.handlers = [_Held(handlers, sink)]
    text = io.StringIO()
    try:
        with contextlib.redirect_stderr(text):
            yield
    finally:
        for lg, handlers in saved.items():
            lg.handlers = handlers
    sys.stderr.write(text.getvalue())      # reached only when export succeeded
    for handlers, record in sink:
        for handler in handlers:
            if record.levelno >= handler.level:
                handler.handle(record)


def dynamic_shapes_for(model, args, kwargs=None):
    """torch.export's dynamic_shapes for these inputs: every tensor's batch dimension free,
    and the sequence dimension of (batch, seq) integer (token id) inputs."""
    auto = torch.export.Dim.AUTO

    def spec(x):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            return None
        dims = {0: auto}
        if x.dim() == 2 and not x.is_floating_point() and not x.is_complex():
            dims[1] = auto   # (batch, sequence) token ids
        return dims

    if not kwargs:
        return tuple(pytree.tree_map(spec, a) if not isinstance(a, torch.Tensor) else spec(a) for a in args)
    bound = inspect.signature(model.forward).bind_partial(*args, **kwargs)
    return {k: pytree.tree_map(spec, v) if not isinstance(v, torch.Tensor) else spec(v) for k, v in bound.arguments.items()}


def _copy_non_persistent(model: nn.Module, gm: fx.GraphModule) -> None:
    # GraphModule's constructor registers every copied buffer as persistent; keep the
    # model's non-persistent ones (e.g. BERT's position_ids) out of the state dict.
    for name, mod in model.named_modules():
        if not mod._non_persistent_buffers_set:
            continue
        try:
            target = gm.get_submodule(name) if name else gm
        except AttributeError:
            continue
        target._non_persistent_buffers_set |= {b for b in mod._non_persistent_buffers_set if b in target._buffers}


def _follow_mode(gm: fx.GraphModule) -> bool:
    """Rewrite train-mode-baked ops into planc_modes modules that read self.training."""
    graph, changed, count = gm.graph, False, 0

    def swap(node, module, args, kwargs=None):
        nonlocal changed, count
        path = f"planc_modes.{node.name}"
        gm.add_submodule(path, module)
        with graph.inserting_before(node):
            new = graph.call_module(path, tuple(args), kwargs or {})
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        changed = True
        count += 1

    if not isinstance(getattr(gm, "planc_modes", None), nn.Module):
        gm.add_module("planc_modes", nn.Module())
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.batch_norm.default and _arg(node, 5, "training") is True:
            running_mean = _arg(node, 3, "running_mean")
            if running_mean is None:
                continue                 # no running stats: batch statistics in both modes
            nbt, add = _num_batches_tracked(graph, running_mean)
            args = [_arg(node, i, n) for i, n in enumerate(("input", "weight", "bias", "running_mean", "running_var"))]
            swap(node, TrainBatchNorm(_arg(node, 6, "momentum", 0.1), _arg(node, 7, "eps", 1e-5)), args + [nbt])
            if add is not None:
                graph.erase_node(add)    # TrainBatchNorm counts batches itself, in train mode only
        elif node.target is aten.scaled_dot_product_attention.default and float(_arg(node, 4, "dropout_p", 0.0) or 0.0) > 0:
            names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal")
            q, k, v, mask = (_arg(node, i, n) for i, n in enumerate(names[:4]))
            kwargs = {"is_causal": _arg(node, 5, "is_causal", False), "scale": node.kwargs.get("scale"),
                      "enable_gqa": node.kwargs.get("enable_gqa", False)}
            swap(node, TrainSDPA(_arg(node, 4, "dropout_p")), [q, k, v, mask], kwargs)
        else:
            flag = _mode_flag(node)
            if flag is not None:
                swap(node, TrainFlagOp(node.target, *flag), node.args, dict(node.kwargs))
    if not count:
        delattr(gm, "planc_modes")
    graph.lint()
    gm.recompile()
    return changed


def _mode_flag(node: fx.Node) -> Optional[Tuple[str, int]]:
    """(name, position) of the op's train flag when export recorded it as True, else None."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return None
    names = [a.name for a in schema.arguments]
    for index, arg in enumerate(schema.arguments):
        if "bool" not in str(arg.type).lower() or _arg(node, index, arg.name) is not True:
            continue
        if arg.name in _MODE_FLAGS:
            return arg.name, index
        if arg.name == _STATS_FLAG and "running_mean" in names:
            if _arg(node, names.index("running_mean"), "running_mean") is not None:
                return arg.name, index
    return None


def _num_batches_tracked(graph: fx.Graph, running_mean) -> Tuple[Optional[fx.Node], Optional[fx.Node]]:
    """The num_batches_tracked get_attr node next to a running_mean, and the add_(…, 1)
    export recorded on it in train mode."""
    if not isinstance(running_mean, fx.Node) or running_mean.op != "get_attr":
        return None, None
    want = running_mean.target.rsplit(".", 1)[0] + ".num_batches_tracked" if "." in running_mean.target else "num_batches_tracked"
    for n in graph.nodes:
        if n.op == "get_attr" and n.target == want:
            adds = [u for u in n.users if u.op == "call_function" and u.target is aten.add_.Tensor and u.args[0] is n]
            return n, (adds[0] if adds and not adds[0].users else None)
    return None, None


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


# ---- symbolic ---------------------------------------------------------------------------

class _LeafTracer(fx.Tracer):
    def __init__(self, leaves: Sequence[Any]):
        super().__init__()
        self.leaf_types = tuple(x for x in leaves if isinstance(x, type))
        self.leaf_names = {x for x in leaves if isinstance(x, str)}

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            return True    # keep weight layers as call_module: names stay the module's
        return (qualname in self.leaf_names or (self.leaf_types and isinstance(m, self.leaf_types))
                or super().is_leaf_module(m, qualname))


def _symbolic(model: nn.Module, leaves: Sequence[Any]) -> fx.GraphModule:
    tracer = _LeafTracer(leaves)
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, class_name=type(model).__name__)


# ---- auto's last resort: the largest traceable submodules --------------------------------

class _Wrapper(nn.Module):
    """Holds the partly traced copy as `module`, like DDP, so names carry `module.`."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def _submodules(model: nn.Module, leaves: Sequence[Any]) -> fx.GraphModule:
    root = copy.deepcopy(model)
    traced: List[str] = []

    def visit(module: nn.Module, prefix: str):
        for name, child in list(module.named_children()):
            qual = f"{prefix}{name}"
            try:
                gm = _symbolic(child, leaves)
                ok = bool(weight_uses(gm))
            except Exception:
                gm, ok = None, False
            if ok:
                gm.train(child.training)
                setattr(module, name, gm)
                traced.append(qual)
            else:
                visit(child, qual + ".")

    visit(root, "")
    if not traced:
        raise TraceError("submodules: no submodule that applies a weight could be traced")
    wrapper = _Wrapper(root)
    graph = fx.Graph()
    params = [p for p in inspect.signature(model.forward).parameters.values()]
    args, kwargs = [], {}
    for p in params:
        if p.kind is p.VAR_POSITIONAL:
            raise TraceError("submodules: a forward taking *args cannot be wrapped")
        if p.kind is p.VAR_KEYWORD:
            continue
        default = () if p.default is inspect.Parameter.empty else (p.default,)
        node = graph.placeholder(p.name, default_value=default[0]) if default else graph.placeholder(p.name)
        (kwargs.__setitem__(p.name, node) if p.kind is p.KEYWORD_ONLY else args.append(node))
    out = graph.call_module("module", tuple(args), kwargs)
    graph.output(out)
    gm = fx.GraphModule(wrapper, graph, class_name=type(model).__name__)
    gm.train(model.training)
    return gm


# ---- checks -----------------------------------------------------------------------------

def _check(model: nn.Module, gm: fx.GraphModule, args, kwargs, how: str) -> None:
    """The trace must compute what the model computes, in eval and in train mode, and
    be deterministic in eval mode whenever the model is."""
    buffers = [(b, b.detach().clone()) for b in _unique(list(model.buffers()) + list(gm.buffers()))]
    was = model.training, gm.training
    try:
        for mode in (False, True):
            model.train(mode)
            gm.train(mode)
            try:
                ref = _run(model, args, kwargs)
            except Exception:
                if mode:
                    continue     # the model itself cannot run this input in train mode
                raise
            out = _run(gm, args, kwargs)
            _compare(ref, out, f"{how}: the trace differs from the model in {'train' if mode else 'eval'} mode")
            if not mode:
                _check_deterministic(model, gm, out, args, kwargs, how)
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        model.train(was[0])
        gm.train(was[1])


def _compare(ref, out, what: str) -> None:
    """TraceError unless every tensor of `out` matches `ref` within _CHECK_RTOL relative
    to the larger magnitude of the two (integers and bools exactly)."""
    ref_leaves, _ = pytree.tree_flatten(ref)
    out_leaves, _ = pytree.tree_flatten(out)
    if len(ref_leaves) != len(out_leaves):
        raise TraceError(f"{what}: it returns {len(out_leaves)} outputs, the model {len(ref_leaves)}")
    for k, (a, b) in enumerate(zip(ref_leaves, out_leaves)):
        if not isinstance(a, torch.Tensor):
            continue
        if not isinstance(b, torch.Tensor) or a.shape != b.shape:
            got = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
            raise TraceError(f"{what}: output {k} is {got}, expected shape {tuple(a.shape)}")
        err = relative_error(a, b)
        if err > _tolerance(a.dtype):
            raise TraceError(f"{what}: output {k} has relative error {err:.3g} (tolerance {_tolerance(a.dtype):.1g}; "
                             f"Python control flow on self.training, or an op planc cannot switch between modes?)")


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max(max |a|, max |b|) over finite entries: 0 for equal tensors (NaNs
    or infinities in the same places count as equal), 1 when one is all zeros and the
    other is not, inf for misplaced NaNs or infinities."""
    if not (a.is_floating_point() or a.is_complex()):
        return 0.0 if torch.equal(a, b) else float("inf")
    wide = torch.complex128 if a.is_complex() else torch.float64
    a, b = a.detach().to(wide), b.detach().to(wide)
    nan_a, nan_b = a.isnan(), b.isnan()
    if not torch.equal(nan_a, nan_b):
        return float("inf")
    a, b = a.masked_fill(nan_a, 0), b.masked_fill(nan_b, 0)
    if a.numel() == 0:
        return 0.0
    diff = float((a - b).abs().masked_fill(a == b, 0).max())     # equal infinities are equal
    if diff == 0:
        return 0.0
    finite = lambda t: t.abs().masked_fill(~t.isfinite(), 0).max()  # noqa: E731
    scale = float(torch.maximum(finite(a), finite(b)))
    return diff / scale if scale > 0 else float("inf")


def _tolerance(dtype: torch.dtype) -> float:
    return max(_CHECK_RTOL, 4 * torch.finfo(dtype).eps) if dtype.is_floating_point or dtype.is_complex else 0.0


def _check_deterministic(model, gm, out, args, kwargs, how: str) -> None:
    """A second eval-mode forward with another seed gives the same output, unless the
    model itself is random in eval mode (then the trace only has to match it per seed)."""
    if _same(out, _run(gm, args, kwargs, seed=1)):
        return
    if _same(_run(model, args, kwargs), _run(model, args, kwargs, seed=1)):
        raise TraceError(f"{how}: two eval-mode forwards of the trace differ, the model's do not "
                         f"(a random op such as dropout still active in eval mode)")


def _same(x, y) -> bool:
    xs, _ = pytree.tree_flatten(x)
    ys, _ = pytree.tree_flatten(y)
    return len(xs) == len(ys) and all(not isinstance(a, torch.Tensor) or (isinstance(b, torch.Tensor) and a.shape == b.shape
                                                                        and torch.equal(a, b)) for a, b in zip(xs, ys))


def _run(module, args, kwargs, seed: int = 0):
    with torch.no_grad(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return module(*args, **kwargs)


def _unique(tensors):
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _split_inputs(example_inputs) -> Tuple[tuple, Dict[str, Any]]:
    if example_inputs is None:
        return (), {}
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    return tuple(example_inputs), {}


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else ""
