"""`planc apply PLAN [--out DIR] [--resume | --overwrite] [--steps N] [--threads N]`: the whole pipeline with the
built-in trainer (planc.train), ending in a run folder (planc.runfolder).

Data parallel: `torchrun --nproc_per_node N -m planc.cli apply PLAN` runs the same plan
on N CPU processes (gloo); each trains on its slice of every batch and rank 0 writes the
run folder. With `train.distributed: fsdp` in the plan the ranks shard the model with FSDP2
instead of replicating it (docs/robustness.md).

Exit status (planc.cli): 0 done, 2 a bad plan or arguments, 1 anything else."""
from __future__ import annotations

import argparse
import os
import sys

from planc.plan.load import load_plan
from planc.plan.presets import scale_schedule
from planc.safeio import folder_argument


HELP = "train with the plan's schedule and write a run folder"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", metavar="PLAN", help="the plan file (YAML)")
    parser.add_argument("--out", metavar="DIR", type=folder_argument, default=None,
                        help="the run folder (default: the plan's `output`, else runs/<name>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the unfinished run of this plan in DIR (a finished one: nothing to do)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace planc's files in DIR whatever run they hold (without it, a folder holding "
                             "another run or other files is refused)")
    parser.add_argument("--steps", metavar="N", type=int, default=None,
                        help="override train.steps; the phases are scaled proportionally")
    parser.add_argument("--threads", metavar="N", type=_threads, default="auto",
                        help="torch threads for training (default: auto, one thread for a model whose weights "
                             "are all small, else torch's default); report.json records it")
    parser.add_argument("--progress", choices=("auto", "on", "off"), default="auto",
                        help="the progress bar (default: only when stderr is a terminal)")


def _threads(text: str):
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a number of threads >= 1 or auto, got {text!r}")
    return n


def run(args: argparse.Namespace) -> int:
    # lazy: every command module is imported to build `planc --help`; torch loads only for a command that runs
    from planc.report import write_report
    from planc.train import train

    # planc errors propagate: planc.cli.main prints them and picks the exit status
    plan = load_plan(args.plan)
    if args.steps is not None:
        plan = scale_schedule(plan, args.steps)
    out = args.out or plan.output or os.path.join("runs", plan.name)
    result = train(plan, out, resume=args.resume, overwrite=args.overwrite, threads=args.threads,
                   progress={"auto": None, "on": True, "off": False}[args.progress])
    if not result.main:                    # under torchrun, rank 0 reports for everyone
        return 0
    if result.already_finished:
        print(f"{out}: already finished ({result.report.get('steps')} steps); nothing to do")
        return 0
    try:                                   # plots must never lose a finished run
        write_report(out)
    except Exception as err:
        print(f"planc: warning: report.md not written: {type(err).__name__}: {' '.join(str(err).split())}",
              file=sys.stderr)
    final = result.report["metrics"]["final"]
    shown = ", ".join(f"{k} {v:.4g}" for k, v in final.items())
    print(f"{out}: {result.report['steps']} steps, sparsity {result.report['mean_sparsity']:.3f}, {shown}")
    lowering = result.report.get("lowering")
    if lowering:
        n, total = lowering["lowered_layers"], len(lowering["layers"])
        if "kept_dense" in lowering:
            timed = f" ({lowering['kept_dense']}, on inputs {lowering['inputs']})"
        elif "speedup" in lowering:
            timed = f", {lowering['speedup']:.2f}x the baked model's speed on inputs {lowering['inputs']}"
        else:
            timed = " (no layer was predicted and measured faster than dense; reasons in report.json)"
        print(f"{out}: lowered {n}/{total} layers, backend {lowering['backend']}{timed}")
    return 0
