"""Baked versus lowered MiniLM from a run folder of experiment 2b (docs/results.md): the
run's baked weights are traced at (2, 32), lowered with planc.lower (CPU path; every
layer the cost model would lower is also timed first) at B·S tokens, and both models are
timed interleaved on random (B, S) token ids with 2 threads. Not a test.

    python benchmarks/minilm_lowered.py runs/exp2-2k/runs/minilm-distill-2k__sparsity=0.9 64 128
"""
from __future__ import annotations

import collections
import sys

import torch

import planc
from planc.timing import interleaved as timeit_interleaved
from planc.examples.minilm import model
from planc.passes import trace
from planc.passes.lower import report
from planc.runfolder import state_dict


def main(run: str, batch: int, seq: int) -> None:
    torch.set_num_threads(2)
    dense = model().eval()
    dense.load_state_dict(state_dict(run))
    ids = torch.randint(1000, 20000, (batch, seq), generator=torch.Generator().manual_seed(0))
    baked = trace(dense, ids[:2, :32], check=False).eval()
    lowered = planc.lower(baked, backend="cpu", min_speedup=1.0, tokens=batch * seq, example_inputs=(ids,))
    rows = report(lowered)
    with torch.inference_mode():
        ref, out = baked(ids), lowered(ids)
        err = float((out - ref).abs().max() / ref.abs().max())
        t = timeit_interleaved({"baked": lambda: baked(ids), "lowered": lambda: lowered(ids)}, 7)
    done = sum(r["action"] == "lowered" for r in rows)
    print(f"{run}: inputs ({batch}, {seq}) = {batch * seq} tokens, lowered {done}/{len(rows)} layers, "
          f"rel err {err:.1e}, baked {t['baked']:.1f} ms, lowered {t['lowered']:.1f} ms, "
          f"x{t['baked'] / t['lowered']:.2f}")
    print(dict(collections.Counter((r["action"], tuple(r["shape"])) for r in rows)))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
