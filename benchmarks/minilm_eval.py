"""Evaluate MiniLM run folders (plans/minilm-70.yaml, minilm-90.yaml and their
ablations) the way docs/results.md reports them: the model `planc.load(RUN)` returns
(the lowered program when the run kept one, else the baked one) against the dense
model's sentence embeddings on the run plan's evaluation windows (for the shipped plans:
all 4,229 windows of CPython's documentation topics, a source never trained on;
planc.examples.minilm_text.evaluate): mean cosine, its 5th percentile,
nearest-neighbour agreement.

    python benchmarks/minilm_eval.py runs/minilm-70 [runs/minilm-90 ...]

One JSON line per run folder. No timing here.
"""
import json
import os
import sys

import torch

import planc
from planc.examples.minilm_text import evaluate


def main(argv):
    torch.set_num_threads(int(os.environ.get("PLANC_EVAL_THREADS", "1")))
    for run in argv:
        plan = planc.load_plan(os.path.join(run, "plan.yaml"))
        report = json.load(open(os.path.join(run, "report.json")))
        model = planc.load(run)
        lowering = report.get("lowering") or {}
        row = {"run": run, "method": plan.method.name, "sparsity": report["mean_sparsity"],
               "steps": plan.train.steps, "train_s": round(report["timings"]["train_s"], 1),
               "lowered_layers": lowering.get("lowered_layers"),
               "lowered": lowering.get("kept_dense") or lowering.get("speedup"), **evaluate(model, plan)}
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
