"""Lower a finished run folder's baked model again, exactly as `planc apply` lowers at
the end of a run (planc.lowering.lower_for_run on planc.pruned.lowering_inputs_for), but
under another plan's `lower` section: what a changed `lower.example_inputs`, backend or
min_speedup would have kept, without training again. Prints the whole-model check and
the per-layer decisions; writes nothing. Timings are this machine's: run it alone.

    python benchmarks/relower.py runs/s14/minilm-90 plans/minilm-90.yaml
"""
from __future__ import annotations

import argparse
import collections

import torch

import planc
from planc.lowering import lower_for_run
from planc.pruned import lowering_inputs_for
from planc.timing import cpu_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="a run folder written by planc apply")
    ap.add_argument("plan", help="the plan whose lower section to apply (e.g. the run's own plan, edited)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    plan = planc.load_plan(args.plan)
    baked = planc.load(args.run, lowered=False)
    summary, _ = lower_for_run(baked, plan, lowering_inputs_for(plan))
    rows = summary["layers"]
    print(f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{args.run} under {args.plan}: inputs {summary['inputs']}, lowered {summary['lowered_layers']}/{len(rows)} "
          f"layers, rel err {summary['max_rel_error']:.1e}, baked {summary.get('baked_ms', float('nan')):.1f} ms, "
          f"lowered {summary.get('lowered_ms', float('nan')):.1f} ms, x{summary.get('speedup', float('nan')):.2f}"
          + (f" ({summary['kept_dense']})" if "kept_dense" in summary else ""))
    print(dict(collections.Counter((r["action"], tuple(r["shape"]) if r.get("shape") else None) for r in rows)))


if __name__ == "__main__":
    main()
