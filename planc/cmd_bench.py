"""`planc bench [--full] [--backend cpu|triton] [--dtype fp32,...] [--out DIR]`: the
block-sparse kernels and a lowered model against dense PyTorch and torch.sparse BSR.

Prints a table and writes bench.md and bench.json to DIR (default: the current folder),
replacing only a bench.md and bench.json that planc bench wrote there.
The quick default sweep takes a few minutes on 2 CPU cores; --full sweeps more shapes,
blocks and sparsities. Exit status (planc.cli): 0 done, 2 bad arguments, 1 anything else."""
from __future__ import annotations

import argparse
import os
import sys

from planc.safeio import atomic_write_text, folder_argument, make_folder, refuse_foreign_outputs

BENCH_FILES = ("bench.md", "bench.json")
HELP = "benchmark the block-sparse kernels and a lowered model against dense"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full", action="store_true", help="the full sweep (slow on CPU)")
    parser.add_argument("--backend", choices=("auto", "cpu", "triton"), default="auto",
                        help="kernels to measure (auto: triton with CUDA, else cpu)")
    parser.add_argument("--dtype", default=None,
                        help="comma-separated dtypes among fp32,fp16,bf16 (default: fp32 on CPU, bf16 on GPU)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (the minimum is kept)")
    parser.add_argument("--out", metavar="DIR", type=folder_argument, default=".", help="folder for bench.md and bench.json")


def run(args: argparse.Namespace) -> int:
    # lazy: every command module is imported to build `planc --help`; torch loads only for a command that runs
    import torch

    from planc import bench

    backend = args.backend
    if backend == "auto":
        backend = "triton" if torch.cuda.is_available() else "cpu"
    if backend == "triton" and not torch.cuda.is_available():
        print("planc bench: --backend triton needs a CUDA device", file=sys.stderr)
        return 2
    dtypes = (args.dtype or ("bf16" if backend == "triton" else "fp32")).split(",")
    bad = [d for d in dtypes if d not in bench.DTYPES]
    if bad or args.repeats < 1:
        print(f"planc bench: expected dtypes among {sorted(bench.DTYPES)} and --repeats >= 1, got {args.dtype!r}, "
              f"{args.repeats}", file=sys.stderr)
        return 2
    # before the minutes of timing: a bad --out, or a bench.md the user wrote, must not cost them
    make_folder(args.out)
    refuse_foreign_outputs(args.out, BENCH_FILES, "bench.json", bench.is_bench_record, "planc bench")
    print(bench.HEADER)
    result = bench.sweep(full=args.full, backend=backend, dtypes=dtypes, repeats=args.repeats,
                         progress=lambda line: print(line, flush=True))
    command = "planc bench " + " ".join(sys.argv[2:]) if len(sys.argv) > 2 else "planc bench"
    atomic_write_text(os.path.join(args.out, "bench.json"), bench.to_json(result))    # the record first
    atomic_write_text(os.path.join(args.out, "bench.md"), bench.to_markdown(result, command))
    print(f"wrote {os.path.join(args.out, 'bench.md')} and bench.json")
    return 0
