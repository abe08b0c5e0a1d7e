"""The run folder `planc apply` writes, and `load` that rebuilds its baked model.

    plan.yaml           the resolved plan (planc.plan.dump when available, else the source)
    model.safetensors   the baked model's state dict: pruned blocks exactly zero
    masks.safetensors   per masked layer `<layer>.alive` (bool grid) and `<layer>.logits`;
                        metadata: each layer's block, weight shape, mode and parameter name
    report.json         per-layer target vs achieved sparsity, metrics, timings, and the
                        sha256 of the two safetensors files
    events.jsonl        the runtime's event log, one JSON object a line

Nothing here uses pickle: `load` re-creates the model from the plan's factory, loads the
weights from safetensors, checks names, shapes, hashes and that every pruned block is
zero, and raises RunFolderError for anything missing or tampered with.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
from typing import Any, Dict, List, Optional

import torch

from planc.blocks import BlockView
from planc.checkpoint import atomic_write_text, load_tensors, save_tensors, sha256_file
from planc.errors import PlancError, RunFolderError

PLAN = "plan.yaml"
MODEL = "model.safetensors"
MASKS = "masks.safetensors"
REPORT = "report.json"
EVENTS = "events.jsonl"
FILES = (PLAN, MODEL, MASKS, REPORT, EVENTS)
REPORT_FORMAT = "planc.report/1"


def _plan_text(plan) -> str:
    """The resolved plan as YAML that loads back to an equal Plan (planc.plan.dump)."""
    from planc.plan import dump_plan

    return dump_plan(plan)


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
        "method": dataclasses.asdict(plan.method),
        "steps": runtime.t,
        "phases": [dataclasses.asdict(p) for p in plan.schedule.phases],
        "layers": runtime.layer_report(),
        "mean_sparsity": runtime.mean_sparsity(),
        "metrics": {"final": dict(final), "history": list(history)},
        "timings": dict(timings),
        "model": None if model is None else {"factory": model.path, "kwargs": model.kwargs_dict()},
        "environment": {"torch": torch.__version__, "python": platform.python_version()},
    }


def write(out: str, plan, pruned, baked, report: dict, events: List[dict]) -> None:
    """Write a complete run folder (each file atomically; the report last, with hashes)."""
    os.makedirs(out, exist_ok=True)
    atomic_write_text(os.path.join(out, PLAN), _plan_text(plan))
    state = baked.state_dict()
    save_tensors(os.path.join(out, MODEL), state, {"format": "planc.model/1"})
    tensors, layers = {}, {}
    for name, mask in pruned.masks.items():
        tensors[f"{name}.alive"] = mask.alive
        if mask.logits is not None:
            tensors[f"{name}.logits"] = mask.logits.detach()
        layers[name] = {"block": list(mask.view.block), "weight_shape": list(mask.view.weight_shape),
                        "transposed": mask.view.transposed, "mode": mask.mode,
                        "param": param_key(pruned, name, state.keys())}
    save_tensors(os.path.join(out, MASKS), tensors, {"format": "planc.masks/1", "layers": layers})
    atomic_write_text(os.path.join(out, EVENTS), "".join(json.dumps(e, sort_keys=True) + "\n" for e in events))
    report = dict(report, files={f: sha256_file(os.path.join(out, f)) for f in (MODEL, MASKS)})
    atomic_write_text(os.path.join(out, REPORT), json.dumps(report, indent=2, sort_keys=False) + "\n")


@dataclasses.dataclass
class Run:
    """A run folder read back: the baked model (eval mode), its plan, report and masks."""

    model: torch.nn.Module
    plan: Any
    report: dict
    masks: Dict[str, torch.Tensor]      # layer -> alive grid
    events: List[dict]


def _read_plan(run_dir: str):
    path = os.path.join(run_dir, PLAN)
    try:
        from planc import load_plan
        return load_plan(path)
    except PlancError as err:
        raise RunFolderError(f"{path}: not a valid plan ({str(err).splitlines()[0]})") from None


def read(run_dir: str, model: Optional[torch.nn.Module] = None) -> Run:
    """Read a run folder; `model` replaces the plan's factory (for plans without one)."""
    from planc.train import call_factory

    if not os.path.isdir(run_dir):
        raise RunFolderError(f"{run_dir}: no such run folder")
    for f in FILES:
        if not os.path.isfile(os.path.join(run_dir, f)):
            raise RunFolderError(f"{os.path.join(run_dir, f)}: missing")
    try:
        with open(os.path.join(run_dir, REPORT), encoding="utf-8") as fh:
            report = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise RunFolderError(f"{os.path.join(run_dir, REPORT)}: unreadable ({err})") from None
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        raise RunFolderError(f"{os.path.join(run_dir, REPORT)}: expected format {REPORT_FORMAT!r}")
    for f, digest in (report.get("files") or {}).items():
        if f not in (MODEL, MASKS):
            continue
        if sha256_file(os.path.join(run_dir, f)) != digest:
            raise RunFolderError(f"{os.path.join(run_dir, f)}: sha256 differs from report.json (tampered or corrupt)")
    if set((report.get("files") or {})) != {MODEL, MASKS}:
        raise RunFolderError(f"{os.path.join(run_dir, REPORT)}: expected hashes of {MODEL} and {MASKS}")

    plan = _read_plan(run_dir)
    if model is None:
        spec = plan.model.factory
        if spec is None:
            raise RunFolderError(f"{run_dir}: the plan has no model.factory; pass the model to rebuild")
        torch.manual_seed(0)   # the values are overwritten; seeding keeps construction quiet and repeatable
        model = call_factory(plan, "model.factory")

    weights, _ = load_tensors(os.path.join(run_dir, MODEL))
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise RunFolderError(f"{os.path.join(run_dir, MODEL)}: names differ from the model's: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, v in expected.items():
        if tuple(weights[k].shape) != tuple(v.shape) or weights[k].dtype != v.dtype:
            raise RunFolderError(f"{os.path.join(run_dir, MODEL)}: {k}: expected {v.dtype} {tuple(v.shape)}, "
                                 f"got {weights[k].dtype} {tuple(weights[k].shape)}")
    model.load_state_dict(weights, strict=True)

    mask_tensors, meta = load_tensors(os.path.join(run_dir, MASKS))
    layers = (meta or {}).get("layers")
    if not isinstance(layers, dict):
        raise RunFolderError(f"{os.path.join(run_dir, MASKS)}: no layer metadata")
    alive: Dict[str, torch.Tensor] = {}
    for name, info in layers.items():
        grid = mask_tensors.get(f"{name}.alive")
        view = BlockView(tuple(info["weight_shape"]), tuple(info["block"]), bool(info.get("transposed", False)))
        if grid is None or tuple(grid.shape) != view.grid or grid.dtype != torch.bool:
            raise RunFolderError(f"{os.path.join(run_dir, MASKS)}: {name}.alive: expected a bool grid {view.grid}")
        key = info.get("param")
        if key is not None:
            w = weights.get(key)
            if w is None or tuple(w.shape) != view.weight_shape:
                raise RunFolderError(f"{os.path.join(run_dir, MASKS)}: {name}: no weight {key!r} of shape "
                                     f"{view.weight_shape} in the model")
            if bool(view.expand(~grid).logical_and(w != 0).any()):
                raise RunFolderError(f"{os.path.join(run_dir, MODEL)}: {key}: pruned blocks are not zero")
        alive[name] = grid
    events = []
    with open(os.path.join(run_dir, EVENTS), encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if line.strip():
                try:
                    events.append(json.loads(line))
                except json.JSONDecodeError:
                    raise RunFolderError(f"{os.path.join(run_dir, EVENTS)}:{i}: not JSON") from None
    model.eval()
    return Run(model=model, plan=plan, report=report, masks=alive, events=events)


def load(run_dir: str, model: Optional[torch.nn.Module] = None) -> torch.nn.Module:
    """The baked model of a run folder (eval mode), rebuilt without pickle."""
    return read(run_dir, model).model
