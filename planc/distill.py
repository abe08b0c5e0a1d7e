"""Distillation: train a pruned model towards a teacher's outputs and hidden states.

The teacher is the dense model itself (a frozen copy of the compiled model taken before
training: its masks are still the identity, so its outputs are the dense model's) or a
model a factory builds, traced like the student. Both run on the same batch; the teacher
under no_grad and in eval mode, once per step.

Hidden states are the outputs of module scopes named by glob patterns
(`bert.encoder.layer.*`; `*` stays within one part of a dotted name, `**` spans parts). A traced graph has no modules to hook, so the scopes are found
through the `nn_module_stack` that tracing records on every node: a scope's output is
its last node that a node outside the scope reads. `tap()` builds a *view* of a
GraphModule, a second GraphModule over the same submodules and parameters whose graph
also hands those nodes to a recorder; training the view trains the model, and the model
itself (what bake, lower and the run folder read) is never changed.

The loss, with the weights of `train.distill` (planc.plan.types.Distill):

    task   · train.loss(out, y)                         the data's own targets
  + output · L_out(out, out_T)                          mse: mean (out − out_T)²
                                                        cosine: mean over rows of 1 − cos
                                                        kl: T² · KL(softmax(out_T/T) ‖ softmax(out/T)), per row
                                                        (a row equal to the teacher's: exactly 0)
  + hidden · mean over taps k of ‖h_k − h_T,k‖² / ‖h_T,k‖²

The hidden term is each tap's squared error relative to the teacher's, over every token
and feature, so layers of different scale weigh the same and 1.0 means "no better than
zeros".
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Callable, ContextManager, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from planc.errors import PlancError, PlanError
from planc.losses import compute_loss
from planc.passes.pipeline import copy_module
from planc.passes.trace import TraceConfig, TracePass, TrainFlagOp, TrainSDPA
from planc.plan.factory import call_factory
from planc.plan.types import Distill, Plan
from planc.precision import as_float

TAP_MODULE = "planc_distill_taps"


class _Recorder(nn.Module):
    """Keeps the last value each tap handed it (the view's only module of its own)."""

    def __init__(self):
        super().__init__()
        self.values: Dict[str, torch.Tensor] = {}

    def forward(self, key: str, value):
        self.values[key] = value
        return value


def scope_outputs(gm: fx.GraphModule, patterns: Sequence[str]) -> Dict[str, fx.Node]:
    """{module name: its output node} for every module scope of `gm`'s graph whose name
    matches one of `patterns` (glob), in graph order. A pattern that matches no scope is
    an error naming the scopes there are."""
    scopes: Dict[str, List[fx.Node]] = {}
    for node in gm.graph.nodes:
        for path, _ in (node.meta.get("nn_module_stack") or {}).values():
            scopes.setdefault(_clean(path), []).append(node)
    found: Dict[str, fx.Node] = {}
    for pattern in patterns:
        names = [name for name in scopes if name and _matches(name, pattern)]
        if not names:
            known = ", ".join(sorted(n for n in scopes if n.count(".") <= 3)[:12])
            raise PlancError(f"distill module pattern {pattern!r} matches no module of the traced model "
                             f"(modules: {known}, ...)")
        for name in names:
            found.setdefault(name, _output_of(scopes[name]))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return dict(sorted(found.items(), key=lambda kv: order[kv[1]]))


def _matches(name: str, pattern: str) -> bool:
    """Glob over dotted names: `*` stays within one name part, `**` spans parts, so
    `bert.encoder.layer.*` is the layers and not their children."""
    regex = "".join(".*" if part == "**" else "[^.]*" if part == "*" else re.escape(part)
                    for part in re.split(r"(\*\*|\*)", pattern))
    return re.fullmatch(regex, name) is not None


def _clean(path: str) -> str:
    """export's scope paths are module names; some torch versions write L['self'].a.b."""
    for prefix in ("L['self'].", "L__self__."):
        if path.startswith(prefix):
            path = path[len(prefix):]
    return path


def _output_of(nodes: List[fx.Node]) -> fx.Node:
    inside = set(nodes)
    escaping = [n for n in nodes if any(u not in inside for u in n.users)]
    return (escaping or nodes)[-1]


def tap(gm: fx.GraphModule, patterns: Sequence[str]) -> Tuple[fx.GraphModule, _Recorder, Tuple[str, ...]]:
    """(view, recorder, tap names): a GraphModule sharing `gm`'s modules and parameters
    whose forward also records the outputs of the matching module scopes."""
    outputs = scope_outputs(gm, patterns) if patterns else {}
    graph = fx.Graph()
    graph._codegen = gm.graph._codegen          # the same input/output handling (pytree specs); never mutated
    val_map: Dict[fx.Node, fx.Node] = {}
    result = graph.graph_copy(gm.graph, val_map)
    graph.output(result)
    for name, node in outputs.items():
        copied = val_map[node]
        with graph.inserting_after(copied):
            graph.call_module(TAP_MODULE, (name, copied))
    recorder = _Recorder()
    root = nn.Module()
    for child, module in gm.named_children():
        root.add_module(child, module)
    for pname, param in gm.named_parameters(recurse=False):
        root.register_parameter(pname, param)
    for bname, buf in gm.named_buffers(recurse=False):
        root.register_buffer(bname, buf)
    for node in gm.graph.nodes:               # plain tensor constants export keeps as attributes
        if node.op == "get_attr" and "." not in node.target and not hasattr(root, node.target):
            setattr(root, node.target, getattr(gm, node.target))
    root.add_module(TAP_MODULE, recorder)
    view = fx.GraphModule(root, graph, class_name=type(gm).__name__ + "Tapped")
    view.train(gm.training)
    return view, recorder, tuple(outputs)


def output_loss(kind: str, out: torch.Tensor, ref: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The output term, a mean over rows (the first dimension). A row the student computes
    exactly as its teacher adds exactly zero, gradient included: 1 − cos(x, x) and KL(p ‖ p)
    are rounding noise in floating point, and Adam divides a gradient by its own size, so
    noise would move every weight by the full learning rate while there is nothing to learn
    (a dense phase with a self teacher). mse needs no care: equal values give exact zeros."""
    if kind == "mse":
        return F.mse_loss(out, ref)
    if kind not in ("cosine", "kl"):
        raise PlancError(f"expected output_loss mse, cosine or kl, got {kind!r}")
    rows = out.shape[0]
    differ = (out != ref).reshape(rows, -1).any(dim=1)
    if not bool(differ.all()):                 # the usual case needs no copy of the outputs
        out, ref = out[differ], ref[differ]
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(out.flatten(1), ref.flatten(1), dim=-1)).sum() / rows
    t = temperature
    return F.kl_div(F.log_softmax(out / t, dim=-1), F.log_softmax(ref / t, dim=-1), log_target=True,
                    reduction="sum") / rows * (t * t)


def hidden_loss(hs: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> torch.Tensor:
    """mean over taps of ‖h − h_T‖² / ‖h_T‖² (each tap's squared error relative to the teacher's)."""
    terms = [(h.float() - r.float()).pow(2).sum() / r.float().pow(2).sum().clamp_min(1e-12) for h, r in zip(hs, refs)]
    return torch.stack(terms).mean()


def _first_tensor(value) -> torch.Tensor:
    while isinstance(value, (tuple, list)) and value:
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise PlancError(f"a distilled module returned {type(value).__name__}, not a tensor")
    return value


@dataclass
class Parts:
    """The last step's loss terms, unweighted (for logs and the report)."""

    task: Optional[float] = None
    output: Optional[float] = None
    hidden: Optional[float] = None


class Distiller:
    """Computes the distillation loss of one batch. `student` is the compiled model's
    GraphModule (trained through a tapped view: `.student`), `teacher` a GraphModule of
    the same architecture or any module when no hidden states are compared."""

    def __init__(self, student: fx.GraphModule, teacher: nn.Module, config: Distill, task_loss: str = "mse"):
        self.config = config
        self.task_loss = task_loss
        self.kind = config.output_loss if config.output_loss != "auto" else (
            "kl" if task_loss == "cross_entropy" else "mse")
        patterns = config.modules if config.hidden > 0 else ()
        self.student, self._student_taps, names = tap(student, patterns)
        teacher = _frozen(teacher)
        if patterns:
            if not isinstance(teacher, fx.GraphModule):
                raise PlancError("a hidden-state loss needs a traced teacher (a GraphModule)")
            self.teacher, self._teacher_taps, teacher_names = tap(teacher, patterns)
            if teacher_names != names:
                missing = sorted(set(names) ^ set(teacher_names))[:4]
                raise PlancError(f"the teacher's and the student's distilled modules differ: {', '.join(missing)}")
        else:
            self.teacher, self._teacher_taps = teacher, None
        self.taps = names
        self.parts = Parts()

    def loss(self, x, y=None, forward=None, cast: Callable[[], ContextManager] = contextlib.nullcontext) -> torch.Tensor:
        """The weighted loss of one batch. `x`: the model's input (a tensor, a tuple of
        positional inputs or a dict of keyword inputs). `forward` runs the student view
        (default: the view itself; the trainer passes its DDP wrapper of the view).
        `cast`: the context both forwards run in (planc.precision.autocast); the losses
        are computed in float32 whatever it is."""
        c = self.config
        with torch.no_grad(), cast():
            ref = as_float(_call(self.teacher, x))
        with cast():
            out = as_float(_call(forward or self.student, x))
        for what, value in (("the student", out), ("the teacher", ref)):
            if not isinstance(value, torch.Tensor):
                raise PlancError(f"{what} returned {type(value).__name__}; distillation compares tensors "
                                 "(wrap the model so its forward returns one)")
        total = out.new_zeros(())
        if c.task > 0:
            task = compute_loss(self.task_loss, out, y)
            total = total + c.task * task
            self.parts.task = float(task.detach())
        if c.output > 0:
            term = output_loss(self.kind, out, ref, c.temperature)
            total = total + c.output * term
            self.parts.output = float(term.detach())
        if self.taps:
            hs = [_first_tensor(self._student_taps.values[k]) for k in self.taps]
            refs = [_first_tensor(self._teacher_taps.values[k]) for k in self.taps]
            term = hidden_loss(hs, refs)
            total = total + c.hidden * term
            self.parts.hidden = float(term.detach())
            self._student_taps.values.clear()
            self._teacher_taps.values.clear()
        return total

    def as_module(self) -> "DistillModule":
        """An nn.Module whose forward(**inputs, labels=None) returns {"loss": ...}: give
        it to `transformers.Trainer` as the model (with PlancCallback(pruned)) and the
        Trainer trains the student by this loss. Its parameters are the student's."""
        return DistillModule(self)

    def loss_fn(self, module, batch) -> torch.Tensor:
        """For planc.integrations.prune_loop: `loss_fn(module, (x, y))`."""
        x, y = batch if isinstance(batch, (tuple, list)) and len(batch) == 2 else (batch, None)
        return self.loss(x, y)


def _call(module, x):
    if isinstance(x, dict):
        return module(**x)
    if isinstance(x, (tuple, list)):
        return module(*x)
    return module(x)


class DistillModule(nn.Module):
    """Distiller.as_module(): the student view as a submodule (so `.parameters()` and
    `.train()` reach the student), the teacher held outside the module tree (frozen,
    never handed to an optimizer)."""

    def __init__(self, distiller: Distiller):
        super().__init__()
        self.student = distiller.student
        self._distiller = distiller

    def forward(self, labels=None, num_items_in_batch=None, **inputs):
        # the Trainer passes num_items_in_batch to a forward that takes **kwargs; a mean loss needs none
        return {"loss": self._distiller.loss(inputs, labels, forward=self.student)}


def _frozen(teacher: nn.Module) -> nn.Module:
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def self_teacher(module: fx.GraphModule) -> fx.GraphModule:
    """A frozen copy of a compiled model before training: its masks are the identity
    (every block alive, A = 1), so it computes the dense model."""
    return _frozen(copy_module(module))


def teacher_for(plan: Plan, pruned) -> nn.Module:
    """The plan's teacher: a frozen copy of `pruned` taken now (call it before training),
    or the teacher factory's model traced with the plan's example inputs."""
    d = plan.train.distill
    if d is None:
        raise PlanError([plan.problem("train.distill", "this plan has no train.distill section")])
    if d.teacher is None:
        return self_teacher(pruned.module)
    model = call_factory(plan, "train.distill.teacher", factory=d.teacher)
    if not isinstance(model, nn.Module):
        raise PlanError([plan.problem("train.distill.teacher", "the teacher factory must return a torch.nn.Module")])
    config = TraceConfig(example_inputs=pruned.example_inputs, frontend=plan.model.frontend,
                         dynamic=plan.model.dynamic_batch)
    return _frozen(TracePass(config).run(model.eval()).module)


def from_plan(plan: Plan, pruned) -> Distiller:
    """The Distiller of `plan.train.distill` for `pruned` (call before training). Its
    student view is switched with the model in sparse phases (planc.runtime.sparse_phases)."""
    distiller = Distiller(pruned.module, teacher_for(plan, pruned), plan.train.distill, plan.train.loss)
    pruned.pruning_runtime().kernels.add_graph(distiller.student)
    return distiller


# ---- dropout --------------------------------------------------------------------------
def dropout_modules(module: nn.Module) -> List[nn.Module]:
    """The modules that apply dropout in train mode: torch's Dropout layers, and the
    train-flag wrappers the trace pass puts around exported dropout ops and attention."""
    found = []
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) or isinstance(m, TrainSDPA):
            found.append(m)
        elif isinstance(m, TrainFlagOp) and "dropout" in str(m.op):
            found.append(m)
    return found


def set_dropout(module: nn.Module, enabled: bool) -> int:
    """Dropout on (its module's mode) or off, leaving every other train-mode behaviour
    (batch norm statistics, ...) as it is. Returns how many modules it set."""
    mods = dropout_modules(module)
    for m in mods:
        m.train(enabled and module.training)
    return len(mods)
