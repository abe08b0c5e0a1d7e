"""The CPU block-sparse linear map against dense F.linear and torch.sparse BSR, one
shape over block sizes and sparsities: the table of docs/benchmarks.md (CPU). Not a test.

    python benchmarks/bench_cpu_linear.py [--shape 4096x4096] [--tokens 512]
        [--blocks 16,32,64] [--sparsities 0.8,0.9,0.95] [--repeats 15]
        [--strategy native|cols|rows|mkl|dense] [--no-backward]

Each cell is planc.bench.bench_cell: the same random weight (random block support at the
exact block sparsity) and inputs for all candidates, timed interleaved, medians of
`--repeats`. The 1-minute load average is printed per cell and before/after the run:
on a shared 2-core machine only cells taken at load ≲ 1.2 are worth quoting.
"""
from __future__ import annotations

import argparse

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="4096x4096", help="weight out×in")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--blocks", default="16,32,64")
    ap.add_argument("--sparsities", default="0.8,0.9,0.95")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "fp16", "bf16"))
    ap.add_argument("--strategy", default=None, help="force a CPU strategy (default: kernels/cost.py chooses)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads for every candidate")
    ap.add_argument("--no-backward", action="store_true")
    args = ap.parse_args()

    from planc import bench

    torch.set_num_threads(args.threads)
    R, C = (int(v) for v in args.shape.split("x"))
    print(f"device: {bench.device_name('cpu')}; torch {torch.__version__}; load before: {bench.load_average():.2f}")
    print(bench.HEADER)
    print("|" + "---|" * (bench.HEADER.count("|") - 1))
    for block in (int(b) for b in args.blocks.split(",")):
        for s in (float(v) for v in args.sparsities.split(",")):
            cell = bench.bench_cell((R, C), args.tokens, block, s, dtype=args.dtype, repeats=args.repeats,
                                    backward=not args.no_backward, strategy=args.strategy)
            print(bench._row(cell), flush=True)
    print(f"load after: {bench.load_average():.2f}")


if __name__ == "__main__":
    main()
