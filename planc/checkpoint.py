"""Pickle-free files for nested state: tensors in safetensors, everything else as JSON in
the same file's metadata, written atomically (temp file + fsync + rename).

`encode` turns a nested structure of dicts (any JSON-scalar keys, e.g. the optimizer's
integer parameter ids), lists, tuples, scalars and tensors into JSON plus a flat dict of
tensors; `decode` inverts it exactly (floats round-trip through repr). One file, one
rename: a reader never sees a checkpoint whose tensors and metadata disagree.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, List, Tuple

import torch

from planc.errors import RunFolderError
from planc.safeio import atomic_write_bytes, atomic_write_text, fsync_dir  # noqa: F401  (atomic_write_*: re-exported)
from safetensors.torch import save
from safetensors import safe_open
import glob

META_KEY = "planc"


def encode(obj: Any, tensors: Dict[str, torch.Tensor], prefix: str = "t") -> Any:
    if isinstance(obj, torch.Tensor):
        name = f"{prefix}"
        if name in tensors:
            raise ValueError(f"duplicate tensor name {name!r}")
        tensors[name] = obj.detach().cpu().contiguous().clone()
        return {"$t": name}
    if isinstance(obj, dict):
        return {"$d": [[encode(k, tensors, f"{prefix}.k{i}"), encode(v, tensors, f"{prefix}.{i}")]
                       for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, tuple):
        return {"$tuple": [encode(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{prefix}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} without pickle")


def decode(obj: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "$t" in obj:
            return tensors[obj["$t"]]
        if "$d" in obj:
            return {decode(k, tensors): decode(v, tensors) for k, v in obj["$d"]}
        if "$tuple" in obj:
            return tuple(decode(v, tensors) for v in obj["$tuple"])
        raise ValueError(f"unexpected object in encoded state: {sorted(obj)}")
    return obj


def save_tensors(path: str, tensors: Dict[str, torch.Tensor], meta: Any = None) -> None:
    """Atomically write `tensors` (safetensors) with `meta` as JSON in the metadata."""
    clean = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    metadata = {META_KEY: json.dumps(meta, sort_keys=True)} if meta is not None else None
    atomic_write_bytes(path, save(clean, metadata=metadata))


def load_tensors(path: str) -> Tuple[Dict[str, torch.Tensor], Any]:
    """(tensors, meta) from save_tensors; RunFolderError if missing or unreadable."""
    if not os.path.isfile(path):
        raise RunFolderError(f"{path}: missing")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise RunFolderError(f"{path}: not a readable safetensors file ({err})") from None
    raw = metadata.get(META_KEY)
    try:
        meta = json.loads(raw) if raw is not None else None
    except (json.JSONDecodeError, RecursionError) as err:   # RecursionError: crafted deep nesting
        raise RunFolderError(f"{path}: corrupt metadata ({type(err).__name__})") from None
    return tensors, meta


def tensors_digest(tensors: Dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of `tensors` (safetensors itself has no
    checksum: a flipped byte in tensor data would load silently)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.flatten().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


STATE_FORMAT = "planc.state/2"


def state_digest(encoded: Any, tensors: Dict[str, torch.Tensor]) -> str:
    """sha256 over the encoded JSON state (step, phase, optimizer settings, data position,
    RNG, ...) and the tensors: a flipped bit anywhere in what load_state returns is seen."""
    text = json.dumps(encoded, sort_keys=True, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(f"{text}\0{tensors_digest(tensors)}".encode()).hexdigest()


def save_state(path: str, state: Any) -> None:
    tensors: Dict[str, torch.Tensor] = {}
    meta = encode(state, tensors)
    save_tensors(path, tensors, {"format": STATE_FORMAT, "state": meta, "sha256": state_digest(meta, tensors)})


def load_state(path: str) -> Any:
    tensors, meta = load_tensors(path)
    if not isinstance(meta, dict) or "state" not in meta:
        raise RunFolderError(f"{path}: not a planc state file")
    if meta.get("format") != STATE_FORMAT:
        raise RunFolderError(f"{path}: expected state format {STATE_FORMAT!r}, got {meta.get('format')!r} "
                             "(written by another planc version, or corrupt)")
    try:
        digest = state_digest(meta["state"], tensors)
    except (TypeError, ValueError, RecursionError) as err:
        raise RunFolderError(f"{path}: corrupt state ({type(err).__name__})") from None
    if meta.get("sha256") != digest:
        raise RunFolderError(f"{path}: corrupt (its sha256 over state and tensors differs from the one recorded when written)")
    try:
        return decode(meta["state"], tensors)
    except (KeyError, ValueError, TypeError, RecursionError) as err:
        raise RunFolderError(f"{path}: corrupt state ({type(err).__name__}: {err})") from None


# ---- checkpoints that survive a crash at any instant and a damaged latest file ------------
def previous_path(path: str) -> str:
    """Where the checkpoint before `path`'s current one is kept: `x.safetensors` -> `x.prev.safetensors`."""
    root, ext = os.path.splitext(path)
    return f"{root}.prev{ext}"


def checkpoint_paths(path: str) -> List[str]:
    """The checkpoint files that exist, newest first."""
    return [p for p in (path, previous_path(path)) if os.path.isfile(p)]


def save_state_keep_previous(path: str, state: Any) -> None:
    """save_state, keeping the checkpoint it replaces as previous_path(path). The new file is
    complete and fsynced (as a temporary file) before any rename, and `path` names a complete
    checkpoint at every instant: the old one is hard-linked to the previous name (not renamed
    away), then the new one is renamed over `path`. Where hard links are refused, the old one
    is renamed, and for that one instant only the previous name holds a checkpoint."""
    tmp = f"{path}.new"
    save_state(tmp, state)                       # temp + fsync + rename to `tmp`
    if os.path.isfile(path):
        previous = previous_path(path)
        link = f"{previous}.link"
        try:
            if os.path.lexists(link):
                os.remove(link)
            os.link(path, link)
            os.replace(link, previous)
        except OSError:
            os.replace(path, previous)
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def load_state_or_previous(path: str, log=None) -> Tuple[Any, str]:
    """(state, the file it came from): `path`, or, when that is missing, truncated or
    corrupt, the previous checkpoint (named in `log`). RunFolderError naming every file
    tried when none is good."""
    failures: List[str] = []
    for candidate in (path, previous_path(path)):
        if not os.path.isfile(candidate):
            continue
        try:
            state = load_state(candidate)
        except RunFolderError as err:
            failures.append(" ".join(str(err).split()))
            if log is not None:
                log(f"planc: warning: {failures[-1]}; trying the previous checkpoint")
            continue
        if failures and log is not None:
            log(f"planc: using the previous checkpoint {candidate}")
        return state, candidate
    if not failures:
        raise RunFolderError(f"{path}: missing")
    raise RunFolderError(f"no usable checkpoint: {'; '.join(failures)}")


def remove_checkpoints(path: str) -> None:
    """The checkpoints, and temporary files a killed writer may have left."""
    leftovers = (glob.glob(glob.escape(path) + ".tmp-*") + glob.glob(glob.escape(path) + ".new*")
                 + glob.glob(glob.escape(previous_path(path)) + ".link"))
    for p in [path, previous_path(path)] + leftovers:
        if os.path.isfile(p):
            os.remove(p)


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
