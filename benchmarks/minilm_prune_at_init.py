"""Reference points for experiment 2 (docs/results.md): the pretrained MiniLM pruned at
step 0 with no training at all (method magnitude, variant/preset `pretrained`, block
norms of the pretrained weights), evaluated like the distilled runs (mean cosine to the
dense embeddings and nearest-neighbour agreement on the held-out pydoc windows).

    python benchmarks/minilm_prune_at_init.py 0.5 0.7 0.9

Uses the public API: planc.compile, pruned.pruning_runtime().start(), bake.
"""
import json
import sys

import torch

import planc
from planc.compare import build_plan
from planc.examples.minilm import model
from planc.examples.minilm_text import evaluate


def main(argv):
    torch.manual_seed(0)
    rows = []
    for s in [float(a) for a in argv] or [0.5, 0.7, 0.9]:
        plan = build_plan("plans/experiments/minilm-distill.yaml",
                          {"sparsity": s, "method": "magnitude", "method.variant": "pretrained",
                           "schedule.phases": [{"phase": "finetune", "steps": 200}]})
        pruned = planc.compile(model(), plan)
        runtime = pruned.pruning_runtime()
        runtime.start()                        # the finetune phase starts at step 0: prune now
        baked = pruned.bake().eval()
        row = {"sparsity": s, "mean_sparsity": runtime.mean_sparsity(), **evaluate(baked, plan)}
        rows.append(row)
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
