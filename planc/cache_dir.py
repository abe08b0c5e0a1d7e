"""Where planc keeps what it learns about this machine (layer timings, the native
kernel's build): `$XDG_CACHE_HOME/planc`, else `~/.cache/planc`. Imports nothing of planc,
so the kernels can use it."""
from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "planc"
