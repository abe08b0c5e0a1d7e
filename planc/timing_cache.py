"""Per-machine memory of the lower pass's layer timings.

A layer's lowered-against-dense ratio depends on the CPU, the torch build, the thread
count, planc's kernels, the layer's shape, block, density, row count and dtype — not on
which model it is in. The lower pass times a layer once per such key on a machine and
reuses the ratio afterwards, so decisions are made on this machine's measurements (not
on cost-model constants fitted on another CPU), repeat from run to run, and cost nothing
the second time. The whole-model check (planc.lowering) is never cached: it is the model's own.

The file is `$PLANC_TIMING_CACHE`, else `$XDG_CACHE_HOME/planc/layer-timings.json`
(`~/.cache/...`). `PLANC_TIMING_CACHE=off` turns the cache off. The file is planc's own:
a damaged one is set aside as `<name>.bad` and started again; a link, a directory or an
oversized file at that path is left alone and the cache not used; writes are atomic,
and concurrent runs at worst each re-time a layer.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from datetime import date
from pathlib import Path
from typing import Callable, Mapping, Optional, Tuple

import torch

import planc.kernels
from planc.cache_dir import user_cache_dir
from planc.safeio import atomic_write_text
from planc.timing import cpu_model

ENV = "PLANC_TIMING_CACHE"
FORMAT = "planc.layer-timings/1"
_MAX_BYTES = 8 << 20          # a few thousand layers; a larger file is not ours to parse


def cache_path() -> Optional[Path]:
    """Where the cache lives, or None when it is turned off."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in ("off", "0", "false", "no"):
        return None
    if value:
        return Path(value).expanduser()
    return user_cache_dir() / "layer-timings.json"


def machine_key() -> dict:
    """What besides the layer decides a timing: CPU model, torch build, threads, and the
    kernels' own code (a digest of kernels/*.py and *.c: a changed kernel times afresh)."""
    return {"cpu": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "kernels": _kernels_digest()}


@functools.lru_cache(maxsize=1)
def _kernels_digest() -> str:
    digest = hashlib.sha256()
    root = Path(planc.kernels.__file__).parent
    for path in sorted([*root.glob("*.py"), *root.glob("*.c")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def ratio(layer: Mapping[str, object], measure: Callable[[], float]) -> Tuple[float, Optional[str]]:
    """The layer's dense/lowered time ratio: from the cache when this machine has timed
    the same key, else `measure()` (then stored). Returns (ratio, the date it was
    measured if it came from the cache, else None)."""
    path = cache_path()
    key = json.dumps({**machine_key(), **{k: _plain(v) for k, v in layer.items()}}, sort_keys=True)
    entries = _read(path) if path is not None else None
    hit = (entries or {}).get(key)
    if isinstance(hit, dict) and isinstance(hit.get("ratio"), (int, float)) and hit["ratio"] > 0:
        return float(hit["ratio"]), str(hit.get("date", ""))
    value = float(measure())
    entries = _read(path) if path is not None else None   # re-read: another run may have added entries
    if entries is not None:
        entries[key] = {"ratio": round(value, 4), "date": date.today().isoformat()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(str(path), json.dumps({"format": FORMAT, "entries": entries}, indent=0,
                                                    sort_keys=True))
        except OSError:
            pass                             # a read-only home: the timing still counts, it is just not kept
    return value, None


def _plain(value):
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return value


def _read(path: Path) -> Optional[dict]:
    """The entries; None when the path is not a file planc should read or replace (a
    link, a directory, something too large to be the cache)."""
    try:
        if path.is_symlink() or (path.exists() and not path.is_file()) or path.stat().st_size > _MAX_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, UnicodeDecodeError):
        _set_aside(path)
        return {}
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("entries"), dict):
        _set_aside(path)
        return {}
    return data["entries"]


def _set_aside(path: Path) -> None:
    try:
        os.replace(path, path.with_name(path.name + ".bad"))
    except OSError:
        pass
