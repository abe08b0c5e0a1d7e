"""Show a resolved plan: its settings, the expanded phase table and, when the plan names
a model factory, the layer table (and with --graph the rewritten graph).

The phase table gives each phase's steps [start, end), its share of training (a
preset's exact share), its curve, and the sparsity the
schedule asks for at both edges, as a fraction of each layer's target and as the
sparsity that gives with the plan's default target."""
from __future__ import annotations

import argparse
from typing import List, Sequence

from planc.plan.load import load_plan
from planc.plan.presets import parts, target_fraction
from planc.plan.registry import METHODS
from planc.plan.types import Plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", metavar="PLAN", help="plan file (YAML)")
    parser.add_argument("--graph", action="store_true", help="also print the rewritten fx graph (needs model.factory)")
    parser.add_argument("--no-layers", action="store_true", help="skip the layer table (does not build the model)")


def table(header: Sequence[str], rows: List[Sequence[object]], right: Sequence[bool]) -> List[str]:
    cells = [list(map(str, header))] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.rjust(w) if right[i] else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    return [fmt(r).rstrip() for r in cells]


def _kwargs(pairs) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in pairs)


def shares(plan: Plan) -> List[str]:
    """Each phase's share of training: a preset's exact share (docs/plan-format.md's
    arithmetic, e.g. 2.5%), else its steps over the total."""
    sched = plan.schedule
    if sched.preset is not None and sched.preset in METHODS[plan.method.name].presets:
        exact = [part.weight for part in parts(plan.method.name, sched.preset)]
        if len(exact) == len(sched.phases):
            return [f"{float(w) * 100:.4g}%" for w in exact]
    total = sched.total_steps
    return [f"{100 * p.steps / total:.4g}%" if total else "-" for p in sched.phases]


def phase_table(plan: Plan) -> List[str]:
    s = plan.targets.defaults.sparsity
    rows = []
    for i, (p, share) in enumerate(zip(plan.schedule.phases, shares(plan))):
        f0, f1 = target_fraction(p, at_end=False), target_fraction(p, at_end=True)
        curve = "-" if p.kind != "sparsify" else (f"{p.curve} c={p.c:g}" if p.c is not None else p.curve)
        every = p.every if p.kind == "sparsify" else "-"
        rows.append((i, p.kind, p.start, p.end, p.steps, share, curve, every,
                     f"{f0:.2f} -> {f1:.2f}", f"{f0 * s:.3f} -> {f1 * s:.3f}"))
    return table(("#", "phase", "start", "end", "steps", "share", "curve", "every", "of target", f"sparsity @{s:g}"),
                 rows, (True, False, True, True, True, True, False, True, False, False))


def _distill_lines(tr) -> List[str]:
    lines = [] if tr.dropout else ["dropout  off while training"]
    d = tr.distill
    if d is None:
        return lines
    teacher = "self (the dense model, frozen before masking)" if d.teacher is None else \
        f"{d.teacher.path}({_kwargs(d.teacher.kwargs)})"
    terms = [f"{d.task:g}·{tr.loss}(out, y)"] if d.task else []
    if d.output:
        kind = d.output_loss if d.output_loss != "auto" else ("kl" if tr.loss == "cross_entropy" else "mse")
        terms.append(f"{d.output:g}·{kind}(out, teacher)" + (f" T={d.temperature:g}" if kind == "kl" else ""))
    if d.hidden:
        terms.append(f"{d.hidden:g}·relative mse of hidden states at {', '.join(d.modules)}")
    return lines + [f"distill  teacher {teacher}", f"         loss = {' + '.join(terms) or '0'}"]


def summary(plan: Plan) -> List[str]:
    m, t, d, tr = plan.model, plan.targets, plan.targets.defaults, plan.train
    keys = METHODS[plan.method.name].keys
    method = " ".join(f"{k}={getattr(plan.method, k)}" for k in keys if getattr(plan.method, k) is not None)
    lines = [f"plan     {plan.name}" + (f"  ({plan.source})" if plan.source else ""),
             f"method   {plan.method.name}" + (f"  {method}" if method else "")]
    if m.factory:
        lines.append(f"model    {m.factory.path}({_kwargs(m.factory.kwargs)})  inputs {[list(x) for x in m.example_inputs]}"
                     f" {m.input_dtype}  frontend {m.frontend}")
    else:
        lines.append("model    (none: Python users pass a module to planc.compile)")
    lines.append(f"targets  block {d.block[0]}x{d.block[1]}  sparsity {d.sparsity:g}  min_blocks {d.min_blocks}"
                 f"  budget {t.budget}")
    for r in t.rules:
        cond = " ".join(f"{k}={v}" for k, v in (("type", r.match.type), ("name", r.match.name),
                                                   ("position", r.match.position)) if v is not None) or "(any)"
        what = "skip" if r.skip else " ".join(
            f"{k} {v}" for k, v in (("block", r.block and f"{r.block[0]}x{r.block[1]}"), ("sparsity", r.sparsity),
                                    ("min_blocks", r.min_blocks)) if v is not None) or "defaults"
        lines.append(f"  rule {r.index}: {cond} -> {what}")
    o = tr.optimizer
    opt = f"{o.name} lr {o.lr:g}" + (f" momentum {o.momentum:g}" if o.name == "sgd" else f" betas {list(o.betas)}")
    opt += " fused" if o.fused else ""
    lines.append(f"train    {tr.steps} steps  {opt} weight_decay {o.weight_decay:g}  lr {tr.lr_schedule}"
                 f" (warmup {tr.warmup_steps})  eval_every {tr.eval_every or 'end'}  seed {tr.seed}"
                 + (f"  precision {tr.precision}" if tr.precision != "float32" else ""))
    if tr.data:
        lines.append(f"data     {tr.data.path}({_kwargs(tr.data.kwargs)})")
    lines += _distill_lines(tr)
    lines.append(f"lower    backend {plan.lower.backend}" + (f"  dtype {plan.lower.dtype}" if plan.lower.dtype else ""))
    if plan.output:
        lines.append(f"output   {plan.output}")
    sched = plan.schedule
    lines += ["", f"schedule {'preset ' + sched.preset if sched.preset else 'explicit phases'}: "
              f"{len(sched.phases)} phases, {sched.total_steps} steps, "
              f"sparse phases on the kernels: {str(sched.sparse_kernels).lower()}"]
    return lines


def run(args: argparse.Namespace) -> int:
    plan = load_plan(args.plan)
    print("\n".join(summary(plan) + phase_table(plan)))
    if args.no_layers:
        return 0
    if plan.model.factory is None:
        if args.graph:
            print("\n(no model.factory: the layer table and graph need a model; use planc.compile from Python)")
        return 0
    # lazy: every command module is imported to build `planc --help`; torch loads only for a command that runs
    from planc.explain import layer_report

    print()
    print(layer_report(plan, show_graph=args.graph))
    return 0
