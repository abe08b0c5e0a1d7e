"""The run folder `planc apply` writes, and `load` that rebuilds its baked model.

    plan.yaml           the resolved plan (planc.plan.dump)
    model.safetensors   the baked model's state dict: pruned blocks exactly zero
    masks.safetensors   per masked layer `<layer>.alive` (bool grid) and `<layer>.logits`;
                        metadata: each layer's block, weight shape, mode and parameter name
    report.json         per-layer target vs achieved sparsity, metrics, timings, the plan's
                        fingerprint and the sha256 of every other file of the folder
    events.jsonl        the runtime's event log, one JSON object a line

Trust: nothing here uses pickle, and reading a folder runs none of its code. `read`
checks every file against report.json's hashes before it parses any of them, then
names, shapes and that every pruned block is zero; anything missing, malformed or
tampered with is a one-line RunFolderError. Rebuilding the model needs its
architecture: the caller passes it (`model=`) or asks explicitly for the plan's factory
to be imported and called (`trust_factory=True`).

Writing: `prepare_output` decides what a run may do with its output folder before
anything is written (never overwrite another plan's run, a finished run, or files planc
did not make, unless asked); report.json is written last, so a folder whose run failed
never loads as a finished one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from planc import artifact
from planc.artifact import ArtifactError
from planc.blocks import BlockView
from planc.checkpoint import checkpoint_paths, load_state_or_previous, load_tensors, remove_checkpoints, save_tensors, sha256_file
from planc.errors import OutputFolderError, PlancError, RunFolderError
from planc.plan import dump_plan, load_plan
from planc.plan.factory import call_factory
from planc.plan.types import Plan
from planc.report import PLOTS, REPORT_MD
from planc.safeio import MIB, FileRefused, atomic_write_text, make_folder, read_limited
from planc.pruned import example_inputs_for
from planc.timing import cpu_model

PLAN = "plan.yaml"
TENSORS = "tensors.safetensors"
MASKS = "masks.safetensors"
BAKED = "baked.json"
LOWERED = "lowered.json"
REPORT = "report.json"
EVENTS = "events.jsonl"
CHECKPOINT = "checkpoint.safetensors"
FILES = (PLAN, TENSORS, MASKS, BAKED, LOWERED, REPORT, EVENTS)
REQUIRED = (PLAN, TENSORS, MASKS, REPORT, EVENTS)   # the two programs are absent when export failed
OWN_FILES = FILES + (REPORT_MD,) + tuple(f"{p}.png" for p in PLOTS)   # what --overwrite replaces
REPORT_FORMAT = "planc.report/3"
MAX_JSON_BYTES = 256 * MIB                          # report.json, events.jsonl: bounded reads


def plan_fingerprint(plan: Plan) -> str:
    """sha256 of everything in a resolved plan that changes what a run computes (not where
    it was read from or written to, nor how often it checkpoints: a run with checkpoints is
    bitwise the run without, tests/test_train_apply.py). A plan without checkpoints keeps
    the fingerprint it always had."""
    bare = dataclasses.replace(plan, source=None, output=None,
                               train=dataclasses.replace(plan.train, checkpoint_every=0))
    return hashlib.sha256(repr(bare).encode()).hexdigest()


def param_key(pruned, name: str, keys) -> Optional[str]:
    """The state-dict key of masked layer `name`'s weight in the baked model."""
    for info in getattr(pruned, "targets", ()) or ():
        if getattr(info, "name", None) == name:
            key = getattr(info, "weight_target", None)
            if isinstance(key, str) and key in keys:
                return key
    key = f"{name}.weight"
    return key if key in keys else None


def make_report(plan, runtime, final: Dict[str, float], history: List[dict], timings: Dict[str, Any]) -> dict:
    model = plan.model.factory
    return {
        "format": REPORT_FORMAT,
        "plan": plan.name,
        "plan_fingerprint": plan_fingerprint(plan),
        "method": dataclasses.asdict(plan.method),
        "steps": runtime.t,
        "phases": [dataclasses.asdict(p) for p in plan.schedule.phases],
        "layers": runtime.layer_report(),
        "mean_sparsity": runtime.mean_sparsity(),
        "metrics": {"final": dict(final), "history": list(history)},
        "timings": dict(timings),
        "model": None if model is None else {"factory": model.path, "kwargs": model.kwargs_dict()},
        "environment": {"torch": torch.__version__, "python": platform.python_version(),
                        "cpu": cpu_model(), "threads": torch.get_num_threads()},
    }


def pruned_views(pruned, keys) -> Dict[str, BlockView]:
    """State-dict key of each masked layer's weight -> its block view."""
    views = {}
    for name, mask in pruned.masks.items():
        key = param_key(pruned, name, keys)
        if key is not None:
            views[key] = mask.view
    return views


def _programs(baked, lowered, inputs) -> Tuple[Dict[str, dict], Dict[str, torch.Tensor], dict]:
    """The baked and lowered models as programs (planc.artifact): their graphs, their
    tensors under "baked/…" and "lowered/…", and what the report says about them."""
    graphs: Dict[str, dict] = {}
    named: Dict[str, torch.Tensor] = {}
    try:
        for prefix, module in (("baked", baked), ("lowered", lowered if lowered is not None else baked)):
            data, tensors = artifact.to_data(artifact.program(module, inputs))
            graphs[prefix] = data
            named.update({f"{prefix}/{k}": v for k, v in tensors.items()})
    except ArtifactError as err:
        return {}, {}, {"saved": False, "reason": str(err)}
    return graphs, named, {"saved": True, "lowered": lowered is not None}


def write(out: str, plan, pruned, baked, report: dict, events: List[dict], *, lowered=None,
          inputs: Tuple = ()) -> None:
    """Write a complete run folder (each file atomically; the report last, with the hashes
    of all others). `lowered`: the lowered model to save as the folder's lowered program
    (None: the lowering was not kept; the lowered program is the baked one)."""
    make_folder(out)
    atomic_write_text(os.path.join(out, PLAN), dump_plan(plan))
    state = baked.state_dict()
    views = pruned_views(pruned, state.keys())
    graphs, named, program_info = _programs(baked, lowered, inputs)
    named.update({f"state/{k}": v for k, v in state.items()})
    all_views = {f"{prefix}/{k}": v for k, v in views.items() for prefix in ("state", "baked", "lowered")}
    stored, meta = artifact.pack(named, all_views)
    save_tensors(os.path.join(out, TENSORS), stored, meta)
    for prefix, fname in (("baked", BAKED), ("lowered", LOWERED)):
        path = os.path.join(out, fname)
        if prefix in graphs:
            atomic_write_text(path, json.dumps(graphs[prefix], separators=(",", ":")) + "\n")
        elif os.path.lexists(path):
            os.unlink(path)
    tensors, layers = {}, {}
    for name, mask in pruned.masks.items():
        tensors[f"{name}.alive"] = mask.alive
        if mask.logits is not None:
            tensors[f"{name}.logits"] = mask.logits.detach()
        layers[name] = dict(artifact.view_record(mask.view), mode=mask.mode,
                            param=param_key(pruned, name, state.keys()))
    save_tensors(os.path.join(out, MASKS), tensors, {"format": "planc.masks/1", "layers": layers})
    atomic_write_text(os.path.join(out, EVENTS), "".join(json.dumps(e, sort_keys=True) + "\n" for e in events))
    names = [f for f in FILES if f != REPORT and os.path.isfile(os.path.join(out, f))]
    program_info["bytes"] = {f: os.path.getsize(os.path.join(out, f)) for f in names}
    report = dict(report, program=program_info, files={f: sha256_file(os.path.join(out, f)) for f in names})
    atomic_write_text(os.path.join(out, REPORT), json.dumps(report, indent=2, sort_keys=False) + "\n")


def save(out: str, pruned, *, baked=None, lowered=None, example_inputs: Optional[Tuple] = None,
         overwrite: bool = False) -> str:
    """A run folder for a model you pruned (and lowered) in your own loop: the same files
    `planc apply` writes, its report without training metrics. `baked` defaults to
    `pruned.bake()`; `lowered` (planc.lower's result) becomes the folder's lowered
    program; `example_inputs` (default: the plan's shapes) are what the programs are
    exported with. A folder holding anything is refused unless `overwrite`."""
    output = prepare_output(out, pruned.plan, resume=False, overwrite=overwrite)
    if output.replace:
        clear_run(out)
    baked = pruned.bake().eval() if baked is None else baked
    inputs = tuple(example_inputs) if example_inputs is not None else example_inputs_for(pruned.plan.model)
    runtime = pruned.pruning_runtime()
    report = make_report(pruned.plan, runtime, {}, [], {})
    write(out, pruned.plan, pruned, baked, report, list(runtime.events), lowered=lowered, inputs=inputs)
    return out


# ---- the output folder of a run ---------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Output:
    """What a run does with its folder: "fresh" (start at step 0), "resume" (continue from
    `state`, read from `state_file`) or "finished" (a finished run of the same plan is
    there: nothing to do; `report` is its report)."""

    action: str
    replace: bool = False              # "fresh" over an earlier run: clear_run(out) first
    state: Any = None
    state_file: Optional[str] = None
    report: Optional[dict] = None


def _listing(out: str) -> List[str]:
    return sorted(os.listdir(out))


def _leftover(name: str) -> bool:
    """A file an unfinished run of planc leaves (its event log, temporary files)."""
    return name == EVENTS or name.startswith((CHECKPOINT, EVENTS + ".tmp-"))


def prepare_output(out: str, plan: Plan, *, resume: bool, overwrite: bool,
                   log: Callable[[str], None] = lambda s: None) -> Output:
    """Decide, before anything is written, what a run of `plan` may do with folder `out`
    (this reads the folder and changes nothing). OutputFolderError for a folder holding
    another plan's run, a finished or unfinished run it was not asked to continue, or
    files planc did not write. `overwrite`: the run replaces planc's own files there
    (`replace`: the caller runs clear_run first); other files are left alone."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise OutputFolderError(f"{out}: exists and is not a folder")
    names = _listing(out) if os.path.isdir(out) else []
    if not names:
        return Output("fresh")
    if overwrite:
        return Output("fresh", replace=True)
    mine = plan_fingerprint(plan)
    hint = "choose another --out, or --overwrite to replace planc's files there"
    if REPORT in names:
        report = _report_json(out)
        if report.get("plan_fingerprint") != mine:
            raise OutputFolderError(f"{out}: holds a run of a different plan ({report.get('plan')!r}); {hint}")
        if resume:
            return Output("finished", report=report)
        raise OutputFolderError(f"{out}: holds a finished run of this plan; --overwrite to train it again")
    ckpt = os.path.join(out, CHECKPOINT)
    if checkpoint_paths(ckpt):
        state, used = load_state_or_previous(ckpt, log=log)
        if not isinstance(state, dict) or state.get("plan") != mine:
            raise OutputFolderError(f"{used}: written by a different plan; {hint}")
        if not resume:
            raise OutputFolderError(f"{out}: holds an unfinished run of this plan (checkpoint at step "
                                    f"{state.get('step')}); --resume to continue it, or --overwrite to start over")
        return Output("resume", state=state, state_file=used)
    if all(_leftover(n) for n in names):
        if resume:
            log(f"planc: no checkpoint in {out}; starting from step 0")
            return Output("fresh")
        raise OutputFolderError(f"{out}: holds an unfinished run with no checkpoint; --resume or --overwrite "
                                "to start it again")
    raise OutputFolderError(f"{out}: not empty and not a planc run ({', '.join(names[:3])}"
                            f"{', ...' if len(names) > 3 else ''}); {hint}")


def clear_run(out: str) -> None:
    """Remove planc's own files from `out`, report.json first (so that from the first
    removal on, the folder no longer loads as a finished run). Links are removed, not followed."""
    for name in (REPORT,) + tuple(f for f in OWN_FILES if f != REPORT):
        path = os.path.join(out, name)
        if os.path.lexists(path) and not os.path.isdir(path):
            os.unlink(path)
    remove_checkpoints(os.path.join(out, CHECKPOINT))


@dataclasses.dataclass
class Run:
    """A run folder read back: the baked model (eval mode), its plan, report and masks."""

    model: torch.nn.Module
    plan: Any
    report: dict
    masks: Dict[str, torch.Tensor]      # layer -> alive grid
    events: List[dict]


def _json_file(path: str) -> Any:
    try:
        return json.loads(read_limited(path, MAX_JSON_BYTES).decode("utf-8"))
    except FileNotFoundError:
        raise RunFolderError(f"{path}: missing") from None
    except (OSError, FileRefused, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise RunFolderError(f"{path}: unreadable ({type(err).__name__}: {' '.join(str(err).split())[:120]})") from None


def _report_json(run_dir: str) -> dict:
    path = os.path.join(run_dir, REPORT)
    report = _json_file(path)
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        got = report.get("format") if isinstance(report, dict) else type(report).__name__
        raise RunFolderError(f"{path}: expected format {REPORT_FORMAT!r}, got {got!r}")
    return report


def _check_hashes(run_dir: str, report: dict) -> None:
    files = report.get("files")
    if (not isinstance(files, dict) or not set(REQUIRED) - {REPORT} <= set(files) or not set(files) <= set(FILES)
            or REPORT in files or (BAKED in files) != (LOWERED in files)):
        raise RunFolderError(f"{os.path.join(run_dir, REPORT)}: expected the sha256 of {', '.join(REQUIRED[:-2])}, "
                             f"{EVENTS} and the two programs if saved")
    for f in sorted(files):
        path = os.path.join(run_dir, f)
        if os.path.islink(path) or not os.path.isfile(path):
            raise RunFolderError(f"{path}: missing or not a regular file")
        if sha256_file(path) != files[f]:
            raise RunFolderError(f"{path}: sha256 differs from report.json (tampered or corrupt)")


def _read_plan(run_dir: str) -> Plan:
    path = os.path.join(run_dir, PLAN)
    try:
        return load_plan(path)
    except PlancError as err:
        raise RunFolderError(f"{path}: not a valid plan ({str(err).splitlines()[0]})") from None


def _events(run_dir: str) -> List[dict]:
    path = os.path.join(run_dir, EVENTS)
    try:
        text = read_limited(path, MAX_JSON_BYTES).decode("utf-8")
    except (OSError, FileRefused, UnicodeDecodeError) as err:
        raise RunFolderError(f"{path}: unreadable ({type(err).__name__})") from None
    events = []
    for i, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                event = json.loads(line)
            except (ValueError, RecursionError):
                raise RunFolderError(f"{path}:{i}: not JSON") from None
            if not isinstance(event, dict):
                raise RunFolderError(f"{path}:{i}: expected a JSON object")
            events.append(event)
    return events


class _Tensors:
    """tensors.safetensors read back: named tensors on demand (planc.artifact.unpack)."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, TENSORS)
        self.stored, self.meta = load_tensors(self.path)

    def get(self, names: List[str]) -> Dict[str, torch.Tensor]:
        try:
            return artifact.unpack(self.stored, self.meta, names)
        except ArtifactError as err:
            raise RunFolderError(f"{self.path}: {err}") from None

    def names(self, prefix: str) -> List[str]:
        entries = self.meta.get("entries") if isinstance(self.meta, dict) else None
        if not isinstance(entries, dict):
            raise RunFolderError(f"{self.path}: expected format {artifact.STORE_FORMAT!r}")
        return [k for k in entries if isinstance(k, str) and k.startswith(prefix)]


def _program(run_dir: str, tensors: _Tensors, which: str, report: dict) -> torch.nn.Module:
    fname = LOWERED if which == "lowered" else BAKED
    if fname not in (report.get("files") or {}):
        why = (report.get("program") or {}).get("reason", "not saved") if isinstance(report.get("program"), dict) else ""
        raise RunFolderError(f"{run_dir}: holds no program to rebuild the model from ({str(why)[:200]}); pass model= "
                             "(the architecture to load the weights into), or trust_factory=True to call the plan's factory")
    path = os.path.join(run_dir, fname)
    data = _json_file(path)
    nodes = data.get("nodes") if isinstance(data, dict) else None
    targets = [n.get("target") for n in nodes or [] if isinstance(n, dict) and n.get("op") == "get_attr"]
    try:
        targets = [artifact.check_path(t, "get_attr") for t in targets]
    except ArtifactError as err:
        raise RunFolderError(f"{path}: {err}") from None
    named = tensors.get([f"{which}/{t}" for t in targets])
    try:
        gm = artifact.from_data(data, {t: named[f"{which}/{t}"] for t in targets})
    except ArtifactError as err:
        raise RunFolderError(f"{path}: {err}") from None
    return artifact.run_anywhere(gm)


def _state_model(run_dir: str, plan: Plan, tensors: _Tensors, model: Optional[torch.nn.Module],
                 trust_factory: bool) -> torch.nn.Module:
    """The caller's model (or, when trusted, the plan factory's) with the baked weights."""
    if model is None:
        spec = plan.model.factory
        if spec is None or not trust_factory:
            raise RunFolderError(f"{run_dir}: pass model= (the architecture to load into)" if spec is None else
                                 f"{run_dir}: rebuilding the model means running the plan's factory {spec.path!r}; "
                                 "pass model= (the architecture), or trust_factory=True if you trust this folder's plan")
        torch.manual_seed(0)   # the values are overwritten; seeding keeps construction quiet and repeatable
        model = call_factory(plan, "model.factory")
    keys = tensors.names("state/")
    weights = {k[len("state/"):]: v for k, v in tensors.get(keys).items()}
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise RunFolderError(f"{tensors.path}: names differ from the model's: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
    for k, v in expected.items():
        if tuple(weights[k].shape) != tuple(v.shape) or weights[k].dtype != v.dtype:
            raise RunFolderError(f"{tensors.path}: {k}: expected {v.dtype} {tuple(v.shape)}, "
                                 f"got {weights[k].dtype} {tuple(weights[k].shape)}")
    model.load_state_dict(weights, strict=True)
    return model


def _positive_ints(value: Any, lengths: Tuple[int, ...]) -> Optional[Tuple[int, ...]]:
    ok = (isinstance(value, list) and len(value) in lengths
          and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value))
    return tuple(value) if ok else None


def _layer_view(path: str, name: str, info: Any) -> BlockView:
    """The block view a masks.safetensors layer record describes, checked field by field."""
    if not isinstance(info, dict):
        raise RunFolderError(f"{path}: layer {name!r}: expected a record, got {type(info).__name__}")
    shape, block = _positive_ints(info.get("weight_shape"), (2, 4)), _positive_ints(info.get("block"), (2,))
    if shape is None or block is None:
        raise RunFolderError(f"{path}: layer {name!r}: expected weight_shape as 2 or 4 positive integers and "
                             "block as 2")
    if info.get("param") is not None and not isinstance(info.get("param"), str):
        raise RunFolderError(f"{path}: layer {name!r}: expected param as a name")
    if not isinstance(info.get("transposed", False), bool):
        raise RunFolderError(f"{path}: layer {name!r}: expected transposed as true or false")
    return BlockView(shape, block, info.get("transposed", False))


def _check_masks(run_dir: str, tensors: _Tensors) -> Dict[str, torch.Tensor]:
    """The alive grids, after checking each against the stored weight: a block pruned in
    the mask is zero in the weight (the kept blocks' storage makes that true unless the
    files were edited)."""
    path = os.path.join(run_dir, MASKS)
    mask_tensors, meta = load_tensors(path)
    layers = meta.get("layers") if isinstance(meta, dict) else None
    if not isinstance(layers, dict):
        raise RunFolderError(f"{path}: no layer metadata")
    alive: Dict[str, torch.Tensor] = {}
    stored = set(tensors.names("state/"))
    for name, info in layers.items():
        view = _layer_view(path, name, info)
        grid = mask_tensors.get(f"{name}.alive")
        if grid is None or tuple(grid.shape) != view.grid or grid.dtype != torch.bool:
            raise RunFolderError(f"{path}: {name}.alive: expected a bool grid {view.grid}")
        key = info.get("param")
        if key is not None:
            w = tensors.get([f"state/{key}"])[f"state/{key}"] if f"state/{key}" in stored else None
            if w is None or tuple(w.shape) != view.weight_shape:
                raise RunFolderError(f"{path}: {name}: no weight {key!r} of shape {view.weight_shape} in the model")
            if bool(view.expand(~grid).logical_and(w != 0).any()):
                raise RunFolderError(f"{tensors.path}: {key}: pruned blocks are not zero")
        alive[name] = grid
    return alive


def read(run_dir: str, model: Optional[torch.nn.Module] = None, *, lowered: bool = True,
         trust_factory: bool = False) -> Run:
    """Read a run folder. The model is its lowered program (or, `lowered=False`, its baked
    program), rebuilt from data alone; with `model=` the baked weights are loaded into
    that module instead; `trust_factory=True` builds that module by calling the plan's
    factory (code the folder names: only when asked)."""
    if not os.path.isdir(run_dir):
        raise RunFolderError(f"{run_dir}: no such run folder")
    for f in REQUIRED:
        if not os.path.isfile(os.path.join(run_dir, f)):
            raise RunFolderError(f"{os.path.join(run_dir, f)}: missing")
    report = _report_json(run_dir)
    _check_hashes(run_dir, report)            # before any other file is parsed
    plan = _read_plan(run_dir)
    tensors = _Tensors(run_dir)
    alive = _check_masks(run_dir, tensors)
    if model is not None or trust_factory:
        module = _state_model(run_dir, plan, tensors, model, trust_factory)
    else:
        module = _program(run_dir, tensors, "lowered" if lowered else "baked", report)
    events = _events(run_dir)
    module.eval()
    return Run(model=module, plan=plan, report=report, masks=alive, events=events)


def state_dict(run_dir: str) -> Dict[str, torch.Tensor]:
    """The baked model's state dict stored in a run folder (pruned weights rebuilt dense
    from their kept blocks), after the same checks as `read`."""
    if not os.path.isdir(run_dir):
        raise RunFolderError(f"{run_dir}: no such run folder")
    _check_hashes(run_dir, _report_json(run_dir))
    tensors = _Tensors(run_dir)
    return {k[len("state/"):]: v for k, v in tensors.get(tensors.names("state/")).items()}


def load(run_dir: str, model: Optional[torch.nn.Module] = None, *, lowered: bool = True,
         trust_factory: bool = False) -> torch.nn.Module:
    """The model of a run folder (eval mode), rebuilt without pickle and without running
    code the folder names; see `read`."""
    return read(run_dir, model, lowered=lowered, trust_factory=trust_factory).model
