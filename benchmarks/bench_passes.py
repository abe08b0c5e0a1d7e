"""Trace + select + insert_masks on BERT-base (12 layers, random init): the time the
passes add beyond torch.export's own cost. Not a test.

    python benchmarks/bench_passes.py [--layers 12] [--seq 128] [--repeats 3]

Each repeat times, on the same model and inputs (the pieces of passes.trace, timed apart
so the numbers do not drown in the noise of a loaded machine):
  export   torch.export.export(strict=False), train mode, dynamic batch/sequence
  unlift   ExportedProgram.module() (torch's own; any export-based pipeline pays it)
  rewrite  plain GraphModule + train/eval rewrite (planc)
  select   passes.select
  insert   passes.insert_masks
  check    trace's equivalence check (4 forwards: model and trace, eval and train; compile(check=False) skips it)
and reports the medians; "beyond export" = unlift + rewrite + select + insert.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--check", action="store_true", help="also time trace's equivalence check")
    args = ap.parse_args()

    from transformers import BertConfig, BertModel

    from planc.passes import insert_masks, select
    from torch import fx

    from planc.passes.trace import _check, _copy_non_persistent, dynamic_shapes_for, _follow_mode
    from planc.plan.types import Match, Method, Plan, Rule, TargetSettings, Targets

    torch.manual_seed(0)
    model = BertModel(BertConfig(num_hidden_layers=args.layers)).eval()   # BERT-base: 768 hidden, 12 heads
    ids = torch.randint(0, 30522, (args.batch, args.seq))
    plan = Plan(targets=Targets(defaults=TargetSettings(block=(32, 32), sparsity=0.9, min_blocks=100),
                                rules=(Rule(match=Match(name="pooler.*"), skip=True),)),
                method=Method(name="sequential_attention_pp"))

    def export_only():
        model.train()
        try:
            return torch.export.export(model, (ids,), dynamic_shapes=dynamic_shapes_for(model, (ids,), {}), strict=False)
        finally:
            model.eval()

    export_only()                       # warm-up: first export pays one-time import/compile costs
    rows = []
    for _ in range(args.repeats):
        t0 = time.perf_counter(); ep = export_only(); t1 = time.perf_counter()
        em = ep.module(); t2 = time.perf_counter()
        gm = fx.GraphModule(em, em.graph, class_name="BertModel")
        _copy_non_persistent(model, gm)
        _follow_mode(gm); t3 = time.perf_counter()
        gm, _ = select(gm, plan); t4 = time.perf_counter()
        gm, changed = insert_masks(gm, plan); t5 = time.perf_counter()
        assert changed
        row = dict(export=t1 - t0, unlift=t2 - t1, rewrite=t3 - t2, select=t4 - t3, insert=t5 - t4)
        if args.check:
            t6 = time.perf_counter(); _check(model, gm, (ids,), {}, "export"); row["check"] = time.perf_counter() - t6
        rows.append(row)
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    beyond = med["unlift"] + med["rewrite"] + med["select"] + med["insert"]
    n_masks = sum(1 for n in gm.graph.nodes if n.op == "call_module" and str(n.target).startswith("planc_masks."))
    print(f"BERT-base config, {args.layers} layers, input ({args.batch}, {args.seq}), {len(list(gm.graph.nodes))} nodes, "
          f"{n_masks} masks; torch {torch.__version__}, {torch.get_num_threads()} threads; median of {args.repeats}")
    for k, v in med.items():
        print(f"  {k:8s} {v * 1000:8.1f} ms")
    print(f"  beyond export (unlift + rewrite + select + insert): {beyond * 1000:.1f} ms "
          f"(without torch's unlift: {(beyond - med['unlift']) * 1000:.1f} ms)")


if __name__ == "__main__":
    main()
