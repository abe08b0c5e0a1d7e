"""`write_report(run_dir)`: a run folder's `report.md` with PNG plots, read only from
what the run wrote (report.json, events.jsonl, masks.safetensors), so it can be
regenerated at any time (`python -m planc.report RUN_DIR`).

Plots (matplotlib, Agg backend; small PNGs next to report.md):

    sparsity.png    block sparsity versus step per layer (and the mean), over bands
                    coloured by phase kind (dense, sparsify, sparse, finetune)
    curves.png      training / validation loss and the metric versus step
    density.png     per-layer achieved density (1 - block sparsity) against the target
    blocks.png      block maps (alive blocks) of up to four layers
    steptime.png    the mean training step time of each phase (report.json's
                    timings.phase_step_ms), coloured by phase kind
    attention.png   SequentialAttention++ only: the attention A = n*softmax(L) over the
                    alive blocks at each sparsify edge (when events.jsonl records it:
                    the runtime's `attention` field of sparsify phase events), its
                    spread std(A) per edge, and the final A from masks.safetensors
"""
from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from planc.plan.registry import METHODS
from planc.safeio import atomic_write_bytes, atomic_write_text
from planc.checkpoint import load_tensors
import torch

REPORT_MD = "report.md"
PLOTS = ("sparsity", "curves", "steptime", "density", "blocks", "attention")      # each written as <name>.png
PHASE_COLORS = {"dense": "#d9d9d9", "sparsify": "#fdb863", "sparse": "#92c5de", "finetune": "#a6dba0"}
DPI = 80
MAX_LINES = 8          # layers drawn individually in the sparsity plot; more: mean and a few


def _save(fig, path: Path) -> None:
    """A figure as PNG, written atomically and never through a link planted in the folder."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    atomic_write_bytes(str(path), buf.getvalue())


# ---- reading -------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_events(path: Path) -> List[dict]:
    events = []
    if path.is_file():
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if line:
                    events.append(json.loads(line))
    return events


def read_masks(path: Path) -> Tuple[Dict[str, "object"], Dict[str, "object"], dict]:
    """(alive grids, logits grids, layer metadata) from masks.safetensors, or empties."""
    if not path.is_file():
        return {}, {}, {}

    tensors, meta = load_tensors(str(path))
    layers = (meta or {}).get("layers") or {}
    alive = {k[: -len(".alive")]: v for k, v in tensors.items() if k.endswith(".alive")}
    logits = {k[: -len(".logits")]: v for k, v in tensors.items() if k.endswith(".logits")}
    return alive, logits, layers


def sparsity_series(events: Sequence[dict]) -> Tuple[List[int], Dict[str, List[float]]]:
    """Steps and, per layer, the block sparsity after each event that reports it (a
    step function: the value holds until the next event)."""
    steps: List[int] = []
    series: Dict[str, List[float]] = {}
    for ev in events:
        sp = ev.get("sparsity")
        if not isinstance(sp, dict) or "step" not in ev:
            continue
        steps.append(int(ev["step"]))
        for name in sp:
            series.setdefault(name, [float("nan")] * (len(steps) - 1))
        for name, values in series.items():
            values.append(float(sp.get(name, values[-1] if values else float("nan"))))
    return steps, series


def attention_edges(events: Sequence[dict]) -> List[dict]:
    """The sparsify phase events that carry an attention summary, in order."""
    return [ev for ev in events if ev.get("event") == "phase" and ev.get("kind") == "sparsify"
            and isinstance(ev.get("attention"), dict) and ev["attention"]]


def _pick_layers(names: Sequence[str], k: int = 4) -> List[str]:
    names = list(names)
    if len(names) <= k:
        return names
    idx = sorted({round(i * (len(names) - 1) / (k - 1)) for i in range(k)})
    return [names[i] for i in idx]


# ---- plots ---------------------------------------------------------------------------
def _plt():
    import matplotlib   # lazy: the optional [report] extra; without it a run still writes its folder

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _phase_bands(ax, phases: Sequence[dict]) -> None:
    seen = set()
    for p in phases:
        start, steps, kind = int(p.get("start", 0)), int(p.get("steps", 0)), p.get("kind", "?")
        if steps <= 0:
            continue
        label = kind if kind not in seen else None
        seen.add(kind)
        ax.axvspan(start, start + steps, color=PHASE_COLORS.get(kind, "#eeeeee"), alpha=0.45, lw=0, label=label)


def plot_sparsity(path: Path, report: dict, events: Sequence[dict]) -> bool:
    steps, series = sparsity_series(events)
    if not steps:
        return False
    plt = _plt()
    total = int(report.get("steps") or (steps[-1] + 1))
    fig, ax = plt.subplots(figsize=(8, 3.2))
    _phase_bands(ax, report.get("phases") or [])
    names = list(series)
    xs = steps + [total]
    shown = names if len(names) <= MAX_LINES else _pick_layers(names, 4)
    for name in shown:
        ys = series[name] + [series[name][-1]]
        ax.step(xs, ys, where="post", lw=1.2, label=name)
    if len(names) > 1:
        mean = [sum(series[n][i] for n in names) / len(names) for i in range(len(steps))]
        ax.step(xs, mean + [mean[-1]], where="post", lw=2.0, color="black", ls="--", label="mean (unweighted)")
    ax.set_xlim(0, total)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("block sparsity")
    ax.set_title(f"{report.get('plan', '')}: sparsity by step")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def plot_curves(path: Path, report: dict) -> bool:
    history = (report.get("metrics") or {}).get("history") or []
    if not history:
        return False
    plt = _plt()
    steps = [h["step"] for h in history]
    metric = "accuracy" if any("accuracy" in h for h in history) else None
    fig, axes = plt.subplots(1, 2 if metric else 1, figsize=(8 if metric else 5, 3.0), squeeze=False)
    ax = axes[0][0]
    _phase_bands(ax, report.get("phases") or [])
    for key, label in (("train_loss", "train loss (last batch)"), ("loss", "validation loss")):
        pts = [(h["step"], h[key]) for h in history if isinstance(h.get(key), (int, float))]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    if metric:
        ax = axes[0][1]
        _phase_bands(ax, report.get("phases") or [])
        pts = [(h["step"], h[metric]) for h in history if metric in h]
        ax.plot(*zip(*pts), marker="o", ms=3, color="C2")
        ax.set_xlabel("step")
        ax.set_ylabel(f"validation {metric}")
    fig.suptitle(f"{report.get('plan', '')}: loss and metric", fontsize=10)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return bool(steps)


def phase_step_times(report: dict) -> List[Tuple[int, str, float]]:
    """(phase index, kind, mean step ms) of every phase that ran a timed step."""
    times = (report.get("timings") or {}).get("phase_step_ms") or []
    phases = report.get("phases") or []
    return [(i, p.get("kind", "?"), ms) for i, (p, ms) in enumerate(zip(phases, times)) if ms is not None]


def plot_steptime(path: Path, report: dict) -> bool:
    rows = phase_step_times(report)
    if not rows:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 2.8))
    ax.bar([str(i) for i, _, _ in rows], [ms for _, _, ms in rows],
           color=[PHASE_COLORS.get(kind, "#cccccc") for _, kind, _ in rows], edgecolor="black", lw=0.5)
    ax.set_xlabel("phase")
    ax.set_ylabel("mean step (ms)")
    ax.set_title(f"{report.get('plan', '')}: training step time by phase")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def plot_density(path: Path, report: dict) -> bool:
    layers = report.get("layers") or []
    if not layers:
        return False
    plt = _plt()
    names = [l["layer"] for l in layers]
    got = [1.0 - float(l["achieved_sparsity"]) for l in layers]
    want = [1.0 - float(l["target_sparsity"]) for l in layers]
    h = max(2.2, 0.22 * len(names) + 1.0)
    fig, ax = plt.subplots(figsize=(6.5, h))
    y = list(range(len(names)))
    ax.barh(y, got, color="C0", label="achieved")
    ax.scatter(want, y, color="C3", marker="|", s=120, label="target", zorder=3)
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=7 if len(names) > 12 else 8)
    ax.invert_yaxis()
    ax.set_xlabel("block density (fraction of blocks kept)")
    ax.set_xlim(0, max(max(got + want) * 1.15, 0.05))
    ax.legend(fontsize=7, loc="lower right")
    ax.set_title("per-layer density")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def plot_blocks(path: Path, alive: Dict[str, "object"], names: Sequence[str]) -> bool:
    names = [n for n in names if n in alive]
    if not names:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(names), figsize=(2.8 * len(names), 3.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        grid = alive[name].to(dtype=__import__("torch").float32).numpy()
        ax.imshow(grid, cmap="Greys", vmin=0, vmax=1, interpolation="nearest", aspect="auto")
        kept = int(grid.sum())
        ax.set_title(f"{name}\n{kept}/{grid.size} blocks kept", fontsize=8)
        ax.set_xlabel("block column (input)", fontsize=7)
        ax.set_ylabel("block row (output)", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.suptitle("block maps (black: kept)", fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def _final_attention(logits) -> "object":
    flat = logits.float().flatten()
    return (flat.numel() * torch.softmax(flat, dim=0))


def plot_attention(path: Path, edges: Sequence[dict], logits: Dict[str, "object"],
                   alive: Dict[str, "object"], names: Sequence[str]) -> bool:
    names = [n for n in names if n in logits or any(n in e["attention"] for e in edges)]
    if not names:
        return False
    plt = _plt()
    cols = 2 if edges else 1
    fig, axes = plt.subplots(1, cols + 1, figsize=(4.0 * (cols + 1), 3.0), squeeze=False)
    axes = axes[0]
    k = 0
    if edges:
        ax = axes[k]; k += 1
        for name in names:
            pts = [(e["step"], e["attention"][name]["std"]) for e in edges if name in e["attention"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=name)
        ax.set_xlabel("step of the sparsify edge")
        ax.set_ylabel("std(A) over alive blocks")
        ax.set_title("attention spread at each sparsify edge", fontsize=9)
        ax.legend(fontsize=6)
        ax = axes[k]; k += 1
        name = names[0]
        cmap = plt.get_cmap("viridis")
        mine = [e for e in edges if name in e["attention"]]
        for i, e in enumerate(mine):
            s = e["attention"][name]
            hist, lo, hi = s["hist"], s["min"], s["max"]
            width = (hi - lo) / max(len(hist), 1) or 1e-6
            centers = [lo + width * (j + 0.5) for j in range(len(hist))]
            total = float(sum(hist)) or 1.0
            ax.plot(centers, [c / total for c in hist], color=cmap(i / max(len(mine) - 1, 1)),
                    lw=1.2, label=f"step {e['step']}")
        ax.set_xlabel("A")
        ax.set_ylabel("fraction of blocks")
        ax.set_title(f"{name}: A at each sparsify edge", fontsize=9)
        ax.legend(fontsize=6, ncol=2)
    ax = axes[k]
    for name in names:
        if name not in logits:
            continue
        a = _final_attention(logits[name])
        keep = alive[name].flatten() if name in alive else None
        values = a[keep] if keep is not None else a
        if values.numel():
            ax.hist(values.numpy(), bins=30, histtype="step", lw=1.2, label=name)
    ax.set_xlabel("A (alive blocks)")
    ax.set_ylabel("blocks")
    ax.set_title("final attention", fontsize=9)
    ax.legend(fontsize=6)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


# ---- markdown ------------------------------------------------------------------------
def _fmt(v, spec: str = ".4g") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return format(v, spec)
    return str(v)


def _markdown(report: dict, images: Dict[str, str], edges: Sequence[dict]) -> str:
    m = report.get("method") or {}
    final = (report.get("metrics") or {}).get("final") or {}
    t = report.get("timings") or {}
    lines = [f"# Run report: {report.get('plan', '?')}", ""]
    method = m.get("name", "?")
    extra = [f"{k} {m.get(k)}" for k in (METHODS[method].shown if method in METHODS else ())]
    lines += [f"- method: `{method}`" + (f" ({', '.join(extra)})" if extra else ""),
              f"- steps: {report.get('steps')}, phases: {len(report.get('phases') or [])}",
              f"- mean block sparsity: {_fmt(report.get('mean_sparsity'), '.4f')}",
              "- final evaluation: " + (", ".join(f"{k} {_fmt(v)}" for k, v in final.items()) or "–"),
              f"- time: train {_fmt(t.get('train_s'), '.1f')} s, eval {_fmt(t.get('eval_s'), '.1f')} s, "
              f"total {_fmt(t.get('total_s'), '.1f')} s ({_fmt(t.get('steps_per_s'), '.1f')} steps/s)",
              ""]
    timed = phase_step_times(report)
    if timed:
        lines += ["## Step time by phase", "", "| phase | kind | mean step ms |", "|---|---|---|"]
        lines += [f"| {i} | {kind} | {ms:.2f} |" for i, kind, ms in timed] + [""]
    layers = report.get("layers") or []
    if layers:
        att = any("attention_std" in l for l in layers)
        head = "| layer | block | blocks | alive | target sparsity | achieved | weight sparsity |"
        sep = "|---|---|---|---|---|---|---|"
        if att:
            head += " std(A) | A range |"
            sep += "---|---|"
        lines += ["## Layers", "", head, sep]
        for l in layers:
            row = (f"| {l['layer']} | {'×'.join(str(b) for b in l.get('block', []))} | {l.get('blocks')} | "
                   f"{l.get('alive_blocks')} | {_fmt(l.get('target_sparsity'), '.4f')} | "
                   f"{_fmt(l.get('achieved_sparsity'), '.4f')} | {_fmt(l.get('weight_sparsity'), '.4f')} |")
            if att:
                rng = l.get("attention_range")
                row += (f" {_fmt(l.get('attention_std'), '.3f')} | "
                        f"{'–' if not rng else f'{rng[0]:.3f}–{rng[1]:.3f}'} |")
            lines.append(row)
        lines.append("")
    captions = {
        "sparsity": "Block sparsity by step; bands are the phases (grey dense, orange sparsify, blue sparse, "
                    "green finetune).",
        "curves": "Training and validation loss, and the validation metric, at each evaluation.",
        "steptime": "Mean training step time of each phase (bars coloured by phase kind as above).",
        "density": "Achieved block density per layer (bar) against the target (red tick).",
        "blocks": "Which blocks survived (black) in a few layers.",
        "attention": "SequentialAttention++'s attention A = n·softmax(L): its spread at each sparsify edge "
                     "and its final distribution over the alive blocks.",
    }
    if images:
        lines += ["## Plots", ""]
        for key in PLOTS:
            if key in images:
                lines += [f"![{key}]({images[key]})", "", captions[key], ""]
    if edges:
        names = list(edges[0]["attention"])
        lines += ["## Attention at the sparsify edges", "",
                  "| step | " + " | ".join(f"std(A) {n}" for n in names) + " |",
                  "|---|" + "---|" * len(names)]
        for e in edges:
            lines.append(f"| {e['step']} | " + " | ".join(
                _fmt((e["attention"].get(n) or {}).get("std"), ".4f") for n in names) + " |")
        lines.append("")
    return "\n".join(lines)


def write_report(run_dir, *, plots: bool = True) -> Path:
    """Write `report.md` (and its PNGs) into the run folder; return its path. Reads
    report.json (required), events.jsonl and masks.safetensors (optional)."""
    run = Path(run_dir)
    report = _read_json(run / "report.json")
    events = read_events(run / "events.jsonl")
    alive, logits, _ = read_masks(run / "masks.safetensors")
    edges = attention_edges(events)
    layer_names = [l["layer"] for l in report.get("layers") or []] or list(alive)
    images: Dict[str, str] = {}
    if plots:
        jobs = [
            ("sparsity", lambda p: plot_sparsity(p, report, events)),
            ("curves", lambda p: plot_curves(p, report)),
            ("steptime", lambda p: plot_steptime(p, report)),
            ("density", lambda p: plot_density(p, report)),
            ("blocks", lambda p: plot_blocks(p, alive, _pick_layers(layer_names, 4))),
        ]
        if logits or edges:
            jobs.append(("attention", lambda p: plot_attention(p, edges, logits, alive, _pick_layers(layer_names, 4))))
        for key, draw in jobs:
            if draw(run / f"{key}.png"):
                images[key] = f"{key}.png"
    path = run / REPORT_MD
    atomic_write_text(str(path), _markdown(report, images, edges) + "\n")
    return path


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        print("usage: python -m planc.report RUN_DIR...", file=sys.stderr)
        return 2
    for d in argv:
        print(write_report(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
