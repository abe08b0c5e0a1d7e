"""How planc times things: one module, one rule, used by the lower pass (per-layer
checks), `planc apply` (the whole-model check), `planc compare --bench` and `planc bench`.

The rule: candidates are timed **interleaved** — within every repetition each callable
runs once, in turn — after two warm-up calls each, and each time is the **median** of
the repetitions. Load that changes during a measurement then affects every candidate
alike, and one slow outlier does not move the result. Speed claims are ratios of such
medians measured in one process (docs/benchmarks.md).

Why not torch.utils.benchmark (issue 15 asked for it): its Timer measures one statement
at a time (blocked_autorange runs a candidate for a stretch, then the next), so on a
shared 2-core machine a load change between the stretches lands on one candidate only,
the error interleaving exists to avoid (not measured side by side here). What it adds —
setting the thread count for the measurement — the callers here do themselves
(`torch.set_num_threads` before timing, recorded with the results).
"""
from __future__ import annotations

import platform
import statistics
import time
from typing import Callable, Dict


def interleaved(fns: Dict[str, Callable[[], object]], repeats: int,
                sync: Callable[[], None] = lambda: None) -> Dict[str, float]:
    """Median milliseconds of each callable, timed in turn within every repetition.
    `sync` waits for queued device work (torch.cuda.synchronize on a GPU)."""
    for fn in fns.values():
        fn(); fn()
    sync()
    times: Dict[str, list] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(ts) * 1e3 for name, ts in times.items()}


def median_ms(fn: Callable[[], object], repeats: int, sync: Callable[[], None] = lambda: None) -> float:
    """Median milliseconds of one callable (after two warm-up calls)."""
    return interleaved({"fn": fn}, repeats, sync)["fn"]


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; the platform's processor string elsewhere):
    speed and even float results depend on it, so every report says which it was."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
