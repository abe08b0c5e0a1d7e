"""Run a family of plans and compare them: `planc compare` (planc.cmd_compare).

Each plan × each combination of the sweep's values × each seed is one run of the
built-in trainer (planc.train) in its own run folder `OUT/runs/<label>/` (with its
report.md; a finished run of the same plan there is reused, an unfinished one continues
from its checkpoint); then one comparison table (OUT/compare.md and OUT/compare.json: mean ± std
over seeds) and plots (OUT/compare_*.png).

A sweep axis is `key=v1,v2,...`. The key is a dotted path into the plan's dict form
(`method.c`, `targets.defaults.sparsity`, `train.optimizer.lr`, ...) or one of these
names:

    method     method.name; keys the new method does not take are dropped, and a
               schedule preset it does not have gives way to its default preset.
               `dense` is a pseudo-method: the plan's method with one dense phase.
    sparsity   targets.defaults.sparsity, and removed from every rule that sets it, so
               that every targeted layer follows the sweep
    block      targets.defaults.block (`8x8`, `8` or `[8, 16]`), likewise
    c, score   method.c, method.score
    preset     schedule.preset
    schedule   `preset` (the plan's schedule), `no-sparsify` (the same schedule as
               explicit phases with every sparsify phase replaced by a sparse one, which
               prunes to the target at once, adjacent equal phases merged), `dense`
    seed       train.seed (or use --seeds N: seeds 0..N-1)

Values are read as YAML scalars (`0.9` is a number, `attention` a string). The changed
plan is validated again with the plan's own positions, so a bad sweep value is a
PlanError at the line of the key it replaces (`plans/x.yaml:14:5: method.c: ...`).
"""
from __future__ import annotations

import copy
import dataclasses
import importlib
import io
import itertools
import json
import math
import multiprocessing as mp
import os
import re
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import yaml
from torch import fx

from planc.errors import PlancError, PlanError, Problem, RunFolderError
from planc.passes.lower import lower, report as lower_report
from planc.plan import dump_plan
from planc.plan.dump import phase_data, plan_to_data
from planc.plan.load import check, load_plan, read, resolve
from planc.plan.positions import PlanLoader
from planc.plan.presets import scale_schedule
from planc.plan.registry import METHODS
from planc.report import write_report
from planc.runfolder import REPORT, load, plan_fingerprint, prepare_output
from planc.safeio import atomic_write_bytes, atomic_write_text, make_folder, refuse_foreign_outputs
from planc.timing import median_ms
from planc.train import train

# `--sweep method=dense`: a method with support masks and one dense phase (the resolved
# plan's schedule is replaced), i.e. the model trained without pruning.
DENSE_BASELINE = next(name for name, spec in METHODS.items() if spec.mask_mode == "support")

ALIASES = {
    "method": "method.name",
    "sparsity": "targets.defaults.sparsity",
    "block": "targets.defaults.block",
    "c": "method.c",
    "score": "method.score",
    "preset": "schedule.preset",
    "seed": "train.seed",
}
SCHEDULE_VARIANTS = ("preset", "no-sparsify", "dense")
COMPARE_FORMAT = "planc.compare/1"
COMPARE_FILES = ("compare.json", "compare.md", "compare_metric.png", "compare_sparsity.png")


# ---- the sweep ---------------------------------------------------------------------
@dataclass(frozen=True)
class Axis:
    key: str                  # as written (alias or dotted path)
    values: Tuple[Any, ...]

    @property
    def path(self) -> str:
        return ALIASES.get(self.key, self.key)


def _split_values(text: str) -> List[str]:
    """Split on commas outside brackets: `[8, 8],[16, 16]` is two values."""
    out, depth, cur = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return [v.strip() for v in out]


def _scalar(text: str) -> Any:
    """A sweep value read as the plan file would read it (PlanLoader: `5e-3` is a float)."""
    try:
        return yaml.load(text, Loader=PlanLoader)
    except yaml.YAMLError:
        return text


def parse_axis(spec: str) -> Axis:
    """`key=v1,v2` → Axis. Raises PlanError for a malformed spec."""
    key, sep, rest = spec.partition("=")
    key = key.strip()
    if not sep or not key or not rest.strip() or not re.fullmatch(r"[A-Za-z_][\w.]*", key):
        raise PlanError([Problem(f"expected a sweep as key=v1,v2,..., got {spec!r}", file="--sweep")])
    values = _split_values(rest)
    if any(v == "" for v in values):
        raise PlanError([Problem(f"empty value in sweep {spec!r}", file="--sweep")])
    parsed = []
    for v in values:
        if key == "block":
            m = re.fullmatch(r"(\d+)(?:x(\d+))?", v)
            parsed.append([int(m.group(1)), int(m.group(2) or m.group(1))] if m else _scalar(v))
        elif key == "schedule":
            parsed.append(v)
        else:
            parsed.append(_scalar(v))
    return Axis(key, tuple(parsed))


def fmt_value(v: Any) -> str:
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) for x in v):
        return f"{v[0]}x{v[1]}"
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v, separators=(",", ":"))
    return str(v)


def _set_path(data: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    cur = data
    for p in parts[:-1]:
        if not isinstance(cur.get(p), dict):
            cur[p] = {}
        cur = cur[p]
    cur[parts[-1]] = copy.deepcopy(value)


def _apply(data: dict, key: str, value: Any) -> None:
    """Apply one sweep value to a plan's dict form (in place); schedule variants are
    applied later, on the resolved plan."""
    if key == "schedule":
        return
    if key == "method":
        if value == "dense":                             # support masks, all alive: a plain dense model;
            value = DENSE_BASELINE                       # the one dense phase is set on the resolved plan
        old = data.get("method") or {}
        method = {"name": value}
        if isinstance(value, str) and value in METHODS:
            method.update({k: v for k, v in old.items() if k in METHODS[value].keys})
        data["method"] = method
        sched = data.get("schedule")
        if isinstance(sched, dict) and "preset" in sched and value in METHODS \
                and sched["preset"] not in METHODS[value].presets:
            sched.pop("preset")
            if not sched:
                data.pop("schedule")
        return
    if key in ("sparsity", "block"):
        for rule in (data.get("targets") or {}).get("rules") or []:
            if isinstance(rule, dict) and not rule.get("skip"):
                rule.pop(key, None)
    _set_path(data, ALIASES.get(key, key), value)


def _merge_phases(phases: Sequence[dict]) -> List[dict]:
    out: List[dict] = []
    for p in phases:
        if out and out[-1]["phase"] == p["phase"] and p["phase"] in ("dense", "sparse", "finetune"):
            out[-1]["steps"] += p["steps"]
        else:
            out.append(dict(p))
    return out


def _schedule_variant(plan, variant: str):
    """The resolved plan with its schedule replaced, as plan data (dict)."""
    data = plan_to_data(plan)
    if variant == "dense":
        data["schedule"] = {"phases": [{"phase": "dense", "steps": plan.train.steps}]}
    elif variant == "no-sparsify":
        phases = [{"phase": "sparse", "steps": p.steps} if p.kind == "sparsify" else phase_data(p)
                  for p in plan.schedule.phases]
        data["schedule"] = {"phases": _merge_phases(phases)}
    return data


@dataclass
class Job:
    plan_file: str
    plan_name: str
    values: Dict[str, Any]            # axis key -> value (seed included when swept)
    seed: int
    label: str
    run_dir: str
    plan_yaml: str                    # the resolved plan (planc.plan.dump_plan)


def _label(plan_name: str, values: Dict[str, Any]) -> str:
    parts = [f"{k}={fmt_value(v)}" for k, v in values.items()]
    return plan_name + ("/" + ",".join(parts) if parts else "")


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=,+-]+", "_", label.replace("/", "__"))


def build_plan(plan_file: str, values: Dict[str, Any], *, steps: Optional[int] = None):
    """The plan file with the sweep's values applied, validated again (positioned
    PlanError naming the sweep value). Returns the resolved Plan."""
    data, pos, problems, origin = read(plan_file)
    if data is None or problems:
        raise PlanError(problems)
    problems = check(data, pos, [])
    if problems:
        raise PlanError(problems)
    data = copy.deepcopy(data)
    for key, value in values.items():
        _apply(data, key, value)
        problems = check(data, pos, [])
        if problems:
            raise PlanError([dataclasses.replace(p, message=f"sweep {key}={fmt_value(value)}: {p.message}")
                             for p in problems])
    plan = resolve(data, origin=origin, positions=pos)
    if steps is not None:
        plan = scale_schedule(plan, steps)
    variant = values.get("schedule", "preset")
    if values.get("method") == "dense":
        variant = "dense"
    if variant not in SCHEDULE_VARIANTS:
        raise PlanError([Problem(f"expected a schedule variant in {', '.join(SCHEDULE_VARIANTS)}, got {variant!r}",
                                 path="schedule", file=plan_file)])
    if variant != "preset":
        sdata = _schedule_variant(plan, variant)
        try:
            plan = load_plan(sdata, file=f"{plan_file} (schedule={variant})")
        except PlanError as err:
            raise PlanError([dataclasses.replace(p, message=f"sweep schedule={variant}: {p.message}")
                             for p in err.problems]) from None
    return plan


def expand(plan_files: Sequence[str], axes: Sequence[Axis], *, seeds: Optional[int], out: str,
           steps: Optional[int] = None) -> List[Job]:
    """Every run of the comparison, validated (all before any runs)."""
    keys = [a.key for a in axes]
    if len(set(keys)) != len(keys):
        raise PlanError([Problem(f"a sweep key is given twice: {keys}", file="--sweep")])
    if seeds is not None and ("seed" in keys or "train.seed" in keys):
        raise PlanError([Problem("use either --seeds or a seed sweep, not both", file="--sweep")])
    seed_list = list(range(seeds)) if seeds is not None else [None]
    jobs: List[Job] = []
    problems: List[Problem] = []
    for plan_file in plan_files:
        for combo in itertools.product(*[a.values for a in axes]):
            values = dict(zip(keys, combo))
            for seed in seed_list:
                vals = dict(values)
                if seed is not None:
                    vals["seed"] = seed
                try:
                    plan = build_plan(plan_file, vals, steps=steps)
                except PlanError as err:
                    problems.extend(p for p in err.problems if p not in problems)
                    continue
                label = _label(plan.name, vals)
                jobs.append(Job(plan_file, plan.name, vals, plan.train.seed, label,
                                os.path.join(out, "runs", _slug(label)), dump_plan(plan)))
    if problems:
        raise PlanError(problems)
    folders: Dict[str, str] = {}
    for j in jobs:                  # a folder name is the label with unsafe characters replaced
        if j.run_dir in folders:
            same = "plans with the same name?" if folders[j.run_dir] == j.label else \
                f"{folders[j.run_dir]} and {j.label} differ only in characters a folder name replaces"
            raise PlanError([Problem(f"two runs would share the folder {j.run_dir} ({same})", file=j.plan_file)])
        folders[j.run_dir] = j.label
    return jobs


# ---- running -----------------------------------------------------------------------
def _import_callable(spec: str) -> Callable:
    module, sep, attr = spec.partition(":")
    if not sep:
        raise PlanError([Problem(f"expected 'module:callable', got {spec!r}", file="--eval")])
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as err:
        raise PlanError([Problem(f"cannot import {spec!r}: {err}", file="--eval")]) from None
    return obj


def _evaluate(spec: str, model, plan, run_dir: Path) -> Dict[str, float]:
    """The --eval callable's numbers for a finished run. Its failure is one line naming the
    callable and the run, which stays finished: the same command reuses it, not retrains it."""
    evaluate = _import_callable(spec)
    where, kept = f"--eval {spec} on {run_dir}", "the finished run is kept and the same command reuses it"
    try:
        values = evaluate(model, plan)
    except Exception as err:
        raise PlancError(f"{where}: {type(err).__name__}: {' '.join(str(err).split())}; {kept}") from None
    try:
        return {str(k): float(v) for k, v in values.items()}
    except (AttributeError, TypeError, ValueError):
        raise PlancError(f"{where}: expected a mapping of names to numbers, got {type(values).__name__}; "
                         f"{kept}") from None


def measure_speedup(model, plan, tokens: int = 512, repeats: int = 10) -> Optional[dict]:
    """Baked versus lowered (planc.lower, CPU path, its cost model decides which layers),
    same inputs, minimum over `repeats` in ms. None when the model does not trace
    symbolically; speedup None when planc.lower lowered nothing."""
    try:
        gm = fx.symbolic_trace(model.eval())
    except Exception:
        return None
    shapes = plan.model.example_inputs
    if not shapes or len(shapes) != 1 or plan.model.input_dtype not in (None, "float32"):
        return None
    shape = list(shapes[0])
    shape[0] = tokens
    x = torch.randn(*shape)
    lowered = lower(gm, backend="cpu", min_speedup=1.0, tokens=tokens)
    done = [r["layer"] for r in lower_report(lowered) if r["action"] == "lowered"]
    with torch.no_grad():
        tb = median_ms(lambda: gm(x), repeats, lambda: None)
        tl = median_ms(lambda: lowered(x), repeats, lambda: None)
    return {"speedup": tb / tl if done else None, "baked_ms": tb, "lowered_ms": tl, "tokens": tokens,
            "lowered_layers": done}


def run_job(job: dict, *, threads: int = 0, force: bool = False, eval_spec: Optional[str] = None,
            bench: bool = False) -> dict:
    """Train one run (or reuse its folder when it holds a finished run of the same plan)
    and return its summary row. A module-level function, so worker processes can run it."""
    if threads:
        torch.set_num_threads(threads)
    run_dir = Path(job["run_dir"])
    plan = load_plan(job["plan_yaml"], file=f"{job['label']}")
    reused = False
    if not force and (run_dir / REPORT).is_file() and (run_dir / "plan.yaml").is_file():
        try:
            reused = plan_fingerprint(load_plan(str(run_dir / "plan.yaml"))) == plan_fingerprint(plan)
        except PlanError:
            reused = False
    resumed_at = None
    if not reused:
        for f in ("compare_extra.json", REPORT):
            if (run_dir / f).exists():
                (run_dir / f).unlink()
        resumed_at = None if force else _resumable(run_dir, plan)
        # compare owns its run folders: whatever else is there, the run starts afresh
        train(plan, str(run_dir), resume=resumed_at is not None, overwrite=resumed_at is None, progress=False,
              log=lambda s: None)
        try:
            write_report(run_dir)
        except Exception as err:       # a plot never loses a run
            print(f"planc compare: warning: {run_dir}/report.md not written: {type(err).__name__}: {err}",
                  file=sys.stderr)
    report = json.loads((run_dir / REPORT).read_text())
    extra_path = run_dir / "compare_extra.json"
    extra = json.loads(extra_path.read_text()) if extra_path.is_file() else {}
    if (eval_spec and "eval" not in extra) or (bench and "bench" not in extra):
        model = load(str(run_dir), trust_factory=True)     # the plan compare was given and has just run
        if eval_spec and "eval" not in extra:
            extra["eval"] = _evaluate(eval_spec, model, plan, run_dir)
        if bench and "bench" not in extra:
            extra["bench"] = measure_speedup(model, plan)
        extra_path.write_text(json.dumps(extra, indent=1) + "\n")
    return summarize(job, report, extra, reused=reused, resumed_at=resumed_at)


def _resumable(run_dir: Path, plan) -> Optional[int]:
    """The step at which the unfinished run of exactly `plan` in `run_dir` checkpointed
    (an interrupted comparison), or None: nothing of this plan to continue there."""
    try:
        output = prepare_output(str(run_dir), plan, resume=True, overwrite=False)
    except RunFolderError:       # another plan's run or checkpoint, a damaged checkpoint, ...
        return None
    return int(output.state.get("step", 0)) if output.action == "resume" else None


def summarize(job: dict, report: dict, extra: Optional[dict] = None, reused: bool = False,
              resumed_at: Optional[int] = None) -> dict:
    extra = extra or {}
    final = (report.get("metrics") or {}).get("final") or {}
    metric_name = "accuracy" if "accuracy" in final else "loss"
    layers = report.get("layers") or []
    att = [l["attention_std"] for l in layers if isinstance(l.get("attention_std"), (int, float))]
    targets = [l["target_sparsity"] for l in layers]
    bench = extra.get("bench") or {}
    # what the run folder serves, as `planc apply` timed it at the run's end (on
    # lower.example_inputs): its lowered model's speedup, 1.0 when it kept the model dense
    lowering = report.get("lowering")
    served = None if not lowering else (lowering.get("speedup") if lowering.get("lowered_layers") else 1.0)
    return {
        "label": job["label"], "plan": job["plan_name"], "plan_file": job["plan_file"],
        "values": job["values"], "seed": job["seed"], "run_dir": job["run_dir"],
        "method": (report.get("method") or {}).get("name"),
        "metric_name": metric_name, "metric": final.get(metric_name), "loss": final.get("loss"),
        "mean_sparsity": report.get("mean_sparsity"),
        "target_sparsity": sum(targets) / len(targets) if targets else None,
        "wall_s": (report.get("timings") or {}).get("total_s"),
        "train_s": (report.get("timings") or {}).get("train_s"),
        "steps": report.get("steps"),
        "attention_std": sum(att) / len(att) if att else None,
        "attention_std_layers": {l["layer"]: l["attention_std"] for l in layers if "attention_std" in l} or None,
        "speedup": bench.get("speedup"),
        "served_speedup": served,
        "eval": extra.get("eval") or {},
        "reused": reused,
        "resumed_at": resumed_at,
    }


def run_jobs(jobs: Sequence[Job], *, jobs_n: int = 1, threads: int = 0, force: bool = False,
             eval_spec: Optional[str] = None, bench: bool = False,
             log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> List[dict]:
    rows: List[Optional[dict]] = [None] * len(jobs)
    payload = [dataclasses.asdict(j) for j in jobs]
    kw = dict(threads=threads, force=force, eval_spec=eval_spec, bench=bench)

    def done(i: int, row: dict) -> None:
        rows[i] = row
        m = row["metric"]
        log(f"[{sum(r is not None for r in rows)}/{len(jobs)}] {row['label']}: {row['metric_name']} "
            f"{m:.4g}, sparsity {row['mean_sparsity']:.3f}, {row['wall_s']:.1f} s"
            + (" (reused)" if row["reused"] else "")
            + (f" (resumed at step {row['resumed_at']})" if row.get("resumed_at") is not None else ""))

    if jobs_n <= 1:
        for i, job in enumerate(payload):
            done(i, run_job(job, **kw))
    else:
        with ProcessPoolExecutor(max_workers=jobs_n, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(run_job, job, **kw): i for i, job in enumerate(payload)}
            for fut in as_completed(futures):
                done(futures[fut], fut.result())
    return [r for r in rows if r is not None]


# ---- the table ---------------------------------------------------------------------
def _stats(xs: Sequence[Optional[float]]) -> Optional[dict]:
    xs = [float(x) for x in xs if isinstance(x, (int, float)) and not math.isnan(float(x))]
    if not xs:
        return None
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs),
            "values": xs}


def group(rows: Sequence[dict]) -> List[dict]:
    """One entry per plan × sweep combination (seeds pooled), in run order."""
    groups: Dict[Tuple, dict] = {}
    for r in rows:
        vals = {k: v for k, v in r["values"].items() if k not in ("seed", "train.seed")}
        key = (r["plan"], json.dumps(vals, sort_keys=True, default=str))
        g = groups.setdefault(key, {"plan": r["plan"], "values": vals, "method": r["method"],
                                    "metric_name": r["metric_name"], "runs": []})
        g["runs"].append(r)
    out = []
    for g in groups.values():
        runs = g.pop("runs")
        g["seeds"] = [r["seed"] for r in runs]
        for k in ("metric", "loss", "mean_sparsity", "wall_s", "attention_std", "speedup", "served_speedup"):
            g[k] = _stats([r.get(k) for r in runs])      # .get: rows of a compare.json written before a column
        names = sorted({k for r in runs for k in r["eval"]})
        g["eval"] = {k: _stats([r["eval"].get(k) for r in runs]) for k in names}
        g["run_dirs"] = [r["run_dir"] for r in runs]
        g["seeds_alike"] = seeds_alike(runs)
        out.append(g)
    return out


def seeds_alike(runs: Sequence[dict]) -> bool:
    """Whether several seeds of one combination ended bitwise alike (the same final metric
    and loss): then train.seed changed nothing in the plan (a pretrained model without
    dropout whose data factory draws its order from its own `seed`, say) and the ± of
    the table is no spread at all."""
    ends = {(r["metric"], r["loss"]) for r in runs}
    return len({r["seed"] for r in runs}) > 1 and len(ends) == 1 and None not in next(iter(ends))


def seeds_alike_note(g: dict) -> str:
    return (f"{_label(g['plan'], g['values'])}: its {len(g['seeds'])} seeds ended bitwise alike: train.seed "
            "changes nothing in this plan (no random initialisation, dropout or data order follows it); "
            "vary what does, e.g. --sweep train.data.kwargs.seed=0,1,2 for a data factory with its own seed")


def _pm(s: Optional[dict], spec: str = ".2f") -> str:
    if not s:
        return "–"
    if s["n"] == 1:
        return format(s["mean"], spec)
    return f"{format(s['mean'], spec)} ± {format(s['std'], spec)}"


def to_markdown(groups: Sequence[dict], title: str = "Comparison", command: Optional[str] = None) -> str:
    keys: List[str] = []
    for g in groups:
        keys += [k for k in g["values"] if k not in keys]
    plans = sorted({g["plan"] for g in groups})
    metric_names = sorted({g["metric_name"] for g in groups})
    eval_names: List[str] = []
    for g in groups:
        eval_names += [k for k in g["eval"] if k not in eval_names]
    only_loss = metric_names == ["loss"]          # the metric is the loss: one column, not two
    mname = "val. loss" if only_loss else "/".join(metric_names)
    head = (["plan"] if len(plans) > 1 else []) + keys + ["seeds", mname] + ([] if only_loss else ["val. loss"]) \
        + ["sparsity", "wall s"] + eval_names + ["std(A)", "lowered speedup"]
    served = any(g.get("served_speedup") for g in groups)
    head += ["served speedup"] if served else []
    lines = [f"# {title}", ""]
    if command:
        lines += ["```", command, "```", ""]
    if len(plans) == 1:
        lines += [f"Plan: `{plans[0]}`. Mean ± sample std over seeds.", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        spec = ".2f" if g["metric_name"] == "accuracy" else ".4g"
        cells = ([g["plan"]] if len(plans) > 1 else []) + [fmt_value(g["values"].get(k, "")) for k in keys]
        cells += [str(len(g["seeds"])), _pm(g["metric"], spec)] + ([] if only_loss else [_pm(g["loss"], ".3f")])
        cells += [_pm(g["mean_sparsity"], ".3f"), _pm(g["wall_s"], ".1f")]
        cells += [_pm(g["eval"].get(k), ".4f") for k in eval_names]
        cells += [_pm(g["attention_std"], ".3f"), _pm(g["speedup"], ".2f")]
        cells += [_pm(g.get("served_speedup"), ".2f")] if served else []
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    alike = [g for g in groups if g.get("seeds_alike")]
    lines += [f"Warning: {seeds_alike_note(g)}." for g in alike] + ([""] if alike else [])
    if served:
        lines += ["served speedup: the run folder's model against its baked one, as `planc apply` timed it at "
                  "the run's end on `lower.example_inputs` (1.00: it kept the model dense; with --jobs > 1, timed "
                  "beside the other runs); lowered speedup: `--bench`'s own measurement on 512 rows.", ""]
    return "\n".join(lines)


def _save_png(fig, path: Path) -> None:
    """As every planc write: atomic, and never through a link planted at `path`."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    atomic_write_bytes(str(path), buf.getvalue())


def plot(groups: Sequence[dict], out: Path) -> List[str]:
    """compare_metric.png (a bar per combination) and, when sparsity is swept,
    compare_sparsity.png (metric against sparsity, a line per other combination)."""
    import matplotlib   # lazy: the optional [report] extra; the tables need no plot

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    written = []
    if not groups:
        return written
    mname = groups[0]["metric_name"]
    labels = [_label(g["plan"], g["values"]).split("/", 1)[-1] if len({x["plan"] for x in groups}) == 1
              else _label(g["plan"], g["values"]) for g in groups]
    means = [g["metric"]["mean"] if g["metric"] else float("nan") for g in groups]
    stds = [g["metric"]["std"] if g["metric"] else 0.0 for g in groups]
    fig, ax = plt.subplots(figsize=(7, max(2.2, 0.28 * len(groups) + 1.0)))
    y = list(range(len(groups)))
    ax.barh(y, means, xerr=stds, color="C0", capsize=2)
    ax.set_yticks(y)
    ax.set_yticklabels(labels, fontsize=6 if len(groups) > 20 else 8)
    ax.invert_yaxis()
    finite = [m for m in means if not math.isnan(m)]
    if finite and mname == "accuracy":
        lo = min(m - s for m, s in zip(means, stds) if not math.isnan(m))
        ax.set_xlim(max(0.0, lo - 3), min(100.0, max(finite) + 2))
    ax.set_xlabel(f"{mname} (mean ± std over seeds)")
    fig.tight_layout()
    _save_png(fig, out / "compare_metric.png")
    plt.close(fig)
    written.append("compare_metric.png")

    skey = next((k for k in ("sparsity", "targets.defaults.sparsity") if any(k in g["values"] for g in groups)), None)
    if skey:
        lines: Dict[str, List[Tuple[float, float, float]]] = {}
        for g in groups:
            rest = {k: v for k, v in g["values"].items() if k != skey}
            name = _label(g["plan"], rest)
            if g["metric"]:
                lines.setdefault(name, []).append((float(g["values"][skey]), g["metric"]["mean"], g["metric"]["std"]))
        fig, ax = plt.subplots(figsize=(6.5, 3.6))
        for name, pts in lines.items():
            pts.sort()
            xs, ms, ss = zip(*pts)
            ax.errorbar(xs, ms, yerr=ss, marker="o", ms=3, capsize=2, label=name.split("/", 1)[-1])
        ax.set_xlabel("block sparsity (target)")
        ax.set_ylabel(mname)
        ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        _save_png(fig, out / "compare_sparsity.png")
        plt.close(fig)
        written.append("compare_sparsity.png")
    return written


def write_tables(rows: Sequence[dict], out, *, title: str = "Comparison", command: Optional[str] = None,
                 plots: bool = True) -> dict:
    make_folder(str(out))
    out = Path(out)
    groups = group(rows)
    result = {"format": COMPARE_FORMAT, "command": command, "groups": groups, "runs": list(rows)}
    # the record first: it is what makes the other files planc's to replace (refuse_foreign_outputs)
    atomic_write_text(str(out / "compare.json"), json.dumps(result, indent=1, default=str) + "\n")
    images: List[str] = []
    if plots:
        try:
            images = plot(groups, out)
        except Exception as err:
            print(f"planc compare: warning: plots not written: {type(err).__name__}: {err}", file=sys.stderr)
    md = to_markdown(groups, title=title, command=command)
    if images:
        md += "\n" + "\n".join(f"![{Path(i).stem}]({i})" for i in images) + "\n"
    atomic_write_text(str(out / "compare.md"), md)
    return result


def finished(job: Job) -> bool:
    """Whether the job's folder holds a finished run of exactly its plan."""
    run_dir = Path(job.run_dir)
    if not (run_dir / "report.json").is_file() or not (run_dir / "plan.yaml").is_file():
        return False
    try:
        return plan_fingerprint(load_plan(str(run_dir / "plan.yaml"))) == plan_fingerprint(load_plan(job.plan_yaml))
    except PlanError:
        return False


def compare(plan_files: Sequence[str], sweeps: Sequence[str] = (), *, seeds: Optional[int] = None, out: str,
            steps: Optional[int] = None, jobs: int = 1, threads: int = 0, force: bool = False,
            eval_spec: Optional[str] = None, bench: bool = False, title: Optional[str] = None,
            command: Optional[str] = None, no_run: bool = False,
            log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> dict:
    """The whole comparison: expand and validate every run, run them, write the tables.
    `no_run`: tabulate only the runs already finished in `out` (the others are logged
    as missing), e.g. after an interrupted comparison."""
    axes = [parse_axis(s) for s in sweeps]
    if eval_spec:
        _import_callable(eval_spec)                       # fail before any training
    all_jobs = expand(plan_files, axes, seeds=seeds, out=out, steps=steps)
    make_folder(out)                                      # before any training: a bad --out costs nothing
    refuse_foreign_outputs(out, COMPARE_FILES, "compare.json", lambda d: d.get("format") == COMPARE_FORMAT,
                           "planc compare")
    if no_run:
        missing = [j for j in all_jobs if not finished(j)]
        for j in missing:
            log(f"missing (not run): {j.label}")
        all_jobs = [j for j in all_jobs if j not in missing]
        force = False
    t0 = time.perf_counter()
    rows = run_jobs(all_jobs, jobs_n=jobs, threads=threads, force=force, eval_spec=eval_spec, bench=bench, log=log)
    result = write_tables(rows, out, title=title or "Comparison", command=command)
    for g in result["groups"]:
        if g["seeds_alike"]:
            log(f"planc compare: warning: {seeds_alike_note(g)}")
    result["elapsed_s"] = time.perf_counter() - t0
    return result
