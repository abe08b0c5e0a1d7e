"""The Triton kernels' table on a CUDA device (issue #15's GPU check): one 4096×4096
weight, 8192 tokens, bf16, blocks 16/32/64 × 70/80/90/95 % block sparsity, against
cuBLAS (F.linear) and torch.sparse BSR, forward and backward (dX + dW on the support).
Timed with planc.timing's rule (interleaved medians, CUDA synchronised); every cell also
checks the kernel against a float64 reference.

    python3 benchmarks/gpu_table.py OUTDIR [REPEATS]

Writes OUTDIR/gpu_table.md and OUTDIR/gpu_table.json; prints the table. Run by
benchmarks/gpu_check.sh.
"""
import json
import os
import sys
import time

import torch

from planc import bench

SHAPE, TOKENS = (4096, 4096), 8192
BLOCKS, SPARSITIES = (16, 32, 64), (0.7, 0.8, 0.9, 0.95)


def main(argv):
    if not torch.cuda.is_available():
        print("gpu_table: no CUDA device here; run it on the device machine (benchmarks/gpu_check.sh)")
        return 2
    out = argv[0] if argv else "."
    repeats = int(argv[1]) if len(argv) > 1 else 20
    os.makedirs(out, exist_ok=True)
    cells, t0 = [], time.perf_counter()
    for block in BLOCKS:
        for s in SPARSITIES:
            cell = bench.bench_cell(SHAPE, TOKENS, block, s, dtype="bf16", backend="triton", repeats=repeats)
            cells.append(cell)
            print(bench._row(cell), flush=True)
    result = dict(device=bench.device_name("triton"), torch=torch.__version__, backend="triton", full=False,
                  cells=cells, models=[], elapsed_s=round(time.perf_counter() - t0, 1))
    command = f"python3 benchmarks/gpu_table.py {out} {repeats}"
    with open(os.path.join(out, "gpu_table.md"), "w") as f:
        f.write(bench.to_markdown(result, command))
    with open(os.path.join(out, "gpu_table.json"), "w") as f:
        f.write(bench.to_json(result))
    print(bench.to_markdown(result, command))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
