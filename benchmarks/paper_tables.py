"""Tables of experiments 4 and 5 (docs/results.md) beside the paper's own numbers, from
the `compare.json` files that `planc compare` writes: mean ± sample sd over seeds, the
per-seed values, and the paired SA++ − ACDC differences (same seed, same block and
sparsity) with their spread.

    python benchmarks/paper_tables.py table1 runs/table1-fashion runs/table1-fashion-dense
    python benchmarks/paper_tables.py table2 runs/table2-movielens runs/table2-movielens-dense

The paper's numbers are Yasuda et al. 2024 (arXiv 2402.17902), Table 1 (ResNet50 on
ImageNet, validation accuracy %, dense 76.90; "—": diverged) and Table 2 (Criteo,
validation log loss, average of three runs, dense 0.4489).
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

METHODS = ("sequential_attention_pp", "acdc", "powerprop", "magnitude")
SHORT = {"sequential_attention_pp": "SA++", "acdc": "ACDC", "powerprop": "PowerProp", "magnitude": "Magnitude",
         "dense": "dense"}
# Table 1: (block, sparsity) -> {method: accuracy %}
PAPER_T1 = {
    ("8x8", 0.7): {"acdc": 74.11, "sequential_attention_pp": 74.14},
    ("8x8", 0.8): {"acdc": 72.47, "sequential_attention_pp": 72.90},
    ("8x8", 0.9): {"acdc": 67.74, "sequential_attention_pp": 69.56},
    ("8x8", 0.95): {"acdc": None, "sequential_attention_pp": None},
    ("16x16", 0.7): {"acdc": 74.08, "sequential_attention_pp": 74.40},
    ("16x16", 0.8): {"acdc": 72.56, "sequential_attention_pp": 73.50},
    ("16x16", 0.9): {"acdc": 68.61, "sequential_attention_pp": 69.92},
    ("16x16", 0.95): {"acdc": 61.42, "sequential_attention_pp": 64.27},
}
# Table 2: (block, sparsity) -> {method: log loss}; the paper's 97% column is not run here
_T2 = {0.9: ((0.4523, 0.4693, 0.4923), (0.4521, 0.4572, 0.4920), (0.4517, 0.4580, 0.4829), (0.4515, 0.4535, 0.4596)),
       0.95: ((0.4586, 0.4892, 0.4998), (0.4547, 0.4768, 0.4946), (0.4547, 0.4754, 0.4961), (0.4540, 0.4595, 0.4715)),
       0.97: ((0.4656, 0.5004, 0.5079), (0.4587, 0.5061, 0.5093), (0.4606, 0.4936, 0.5056), (0.4570, 0.4708, 0.4865)),
       0.98: ((0.4717, 0.5145, 0.5447), (0.4622, 0.5158, 0.5379), (0.4692, 0.4929, 0.5184), (0.4601, 0.4904, 0.5162)),
       0.99: ((0.4881, 0.5376, 0.5482), (0.5017, 0.5295, 0.5425), (0.5050, 0.5153, 0.5427), (0.4803, 0.5068, 0.5253))}
PAPER_T2 = {(f"{b}x{b}", s): dict(zip(("magnitude", "powerprop", "acdc", "sequential_attention_pp"),
                                     (rows[m][i] for m in range(4))))
            for s, rows in _T2.items() for i, b in enumerate((5, 10, 20))}


def _fmt_block(v) -> str:
    return f"{v[0]}x{v[1]}" if isinstance(v, (list, tuple)) else str(v)


def load(folder: str) -> Dict[Tuple[str, str, float], dict]:
    """(method, block, sparsity) -> the group of compare.json (its per-seed values)."""
    data = json.loads((Path(folder) / "compare.json").read_text())
    out = {}
    for g in data["groups"]:
        v = g["values"]
        out[(v.get("method", g["method"]), _fmt_block(v.get("block", "-")), float(v.get("sparsity", 0.0)))] = g
    return out


def _ms(values: List[float], spec: str) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return format(values[0], spec)
    return f"{format(statistics.mean(values), spec)} ± {format(statistics.stdev(values), spec.lstrip('+'))}"


def _values(group: Optional[dict], key: str) -> List[float]:
    return [] if group is None or group.get(key) is None else list(group[key]["values"])


def main_table(groups, cells, key: str, spec: str, paper=None) -> List[str]:
    head = "| method | " + " | ".join(f"{b} {s:.0%}" for b, s in cells) + " |"
    lines = [head, "|---" * (len(cells) + 1) + "|"]
    for m in METHODS:
        row = [_ms(_values(groups.get((m, b, s)), key), spec) for b, s in cells]
        lines.append(f"| {SHORT[m]} (here) | " + " | ".join(row) + " |")
    if paper:
        for m in METHODS:
            if any(m in paper.get(c, {}) for c in cells):
                vals = [paper.get(c, {}).get(m) for c in cells]
                lines.append(f"| {SHORT[m]} (paper) | " + " | ".join("—" if v is None else format(v, spec)
                                                                     for v in vals) + " |")
    return lines


def per_seed(groups, cells, key: str, spec: str) -> List[str]:
    lines = ["| block | sparsity | " + " | ".join(f"{SHORT[m]} (seeds 0, 1, 2)" for m in METHODS) + " |",
             "|---|---" + "|---" * len(METHODS) + "|"]
    for b, s in cells:
        vals = [" ".join(format(v, spec) for v in _values(groups.get((m, b, s)), key)) for m in METHODS]
        lines.append(f"| {b} | {s:.0%} | " + " | ".join(vals) + " |")
    return lines


def paired(groups, cells, key: str, spec: str, paper=None) -> List[str]:
    """SA++ − ACDC per seed (runs of the same seed share the data order and the
    initial weights), mean ± sd over seeds, and how many seeds SA++ wins."""
    better = (lambda d: d > 0) if key == "metric" else (lambda d: d < 0)
    lines = ["| block | sparsity | SA++ − ACDC per seed | mean ± sd | SA++ better | paper |", "|---|---|---|---|---|---|"]
    for b, s in cells:
        a = _values(groups.get(("sequential_attention_pp", b, s)), key)
        c = _values(groups.get(("acdc", b, s)), key)
        d = [x - y for x, y in zip(a, c)]
        p = (paper or {}).get((b, s), {})
        pd = (p["sequential_attention_pp"] - p["acdc"]) if p.get("acdc") is not None and p.get(
            "sequential_attention_pp") is not None else None
        lines.append(f"| {b} | {s:.0%} | {' '.join(format(x, '+' + spec) for x in d)} | {_ms(d, '+' + spec)} | "
                     f"{sum(better(x) for x in d)}/{len(d)} | {'—' if pd is None else format(pd, '+' + spec)} |")
    return lines


def report(kind: str, folder: str, dense: Optional[str] = None) -> str:
    groups = load(folder)
    key, spec = ("metric", ".2f") if kind == "table1" else ("loss", ".4f")
    paper = PAPER_T1 if kind == "table1" else PAPER_T2
    cells = sorted({(b, s) for (_, b, s) in groups}, key=lambda c: (int(c[0].split("x")[0]), c[1]))
    out = ["### " + ("accuracy %" if key == "metric" else "validation log loss") + ", mean ± sd over seeds", ""]
    out += main_table(groups, cells, key, spec, paper) + [""]
    if dense:
        d = [g for (m, _, _), g in load(dense).items() if m == "dense"]
        vals = _values(d[0], key) if d else []
        out += [f"dense (here): {_ms(vals, spec)} (per seed {' '.join(format(v, spec) for v in vals)})", ""]
    out += ["### SA++ − ACDC, paired by seed", ""] + paired(groups, cells, key, spec, paper) + [""]
    out += ["### per seed", ""] + per_seed(groups, cells, key, spec)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4) or sys.argv[1] not in ("table1", "table2"):
        sys.exit("usage: python benchmarks/paper_tables.py table1|table2 COMPARE_DIR [DENSE_COMPARE_DIR]")
    print(report(*sys.argv[1:]))
