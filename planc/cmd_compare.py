"""`planc compare PLAN... [--sweep key=v1,v2 ...] [--seeds N] --out DIR`: run every plan
× sweep combination × seed with the built-in trainer, then write one comparison table
(DIR/compare.md, DIR/compare.json: mean ± std over seeds of the metric and validation
loss, achieved sparsity, wall time, std(A), lowered speedup with --bench, and the speedup
of the model each run folder serves, as its own lowering timed it) and plots.

Sweep keys: method, sparsity, block, c, score, preset, schedule (preset | no-sparsify |
dense), seed, or any dotted path of the plan (train.optimizer.lr). Every run's folder is
DIR/runs/<label>/ with its report.md; a folder that already holds the same finished plan
is reused (--force reruns it), and an unfinished run of the same plan that checkpointed
(train.checkpoint_every) continues from its checkpoint, so an interrupted comparison
loses at most the steps since each run's last checkpoint. All combinations are validated before the first run; a
bad value is a positioned plan error (exit status 2)."""
from __future__ import annotations

import argparse
import shlex
import sys

from planc.errors import PlanError, Problem
from planc.safeio import folder_argument

HELP = "run a family of plans (a sweep × seeds) and write one comparison table"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plans", metavar="PLAN", nargs="+", help="plan files (YAML)")
    parser.add_argument("--sweep", metavar="KEY=V1,V2", action="append", default=[],
                        help="a sweep axis; repeat for a grid (the product of all axes)")
    parser.add_argument("--seeds", metavar="N", type=int, default=None,
                        help="run seeds 0..N-1 (train.seed) of every combination")
    parser.add_argument("--out", metavar="DIR", type=folder_argument, required=True, help="the comparison folder")
    parser.add_argument("--steps", metavar="N", type=int, default=None,
                        help="override train.steps (presets re-expanded, explicit phases scaled)")
    parser.add_argument("--jobs", metavar="N", type=int, default=1, help="runs in parallel (processes)")
    parser.add_argument("--threads", metavar="N", type=int, default=0,
                        help="torch threads per run (default: torch's own; use 1 with --jobs > 1)")
    parser.add_argument("--force", action="store_true", help="rerun runs whose folders are complete")
    parser.add_argument("--eval", metavar="MODULE:CALLABLE", default=None,
                        help="extra evaluation: called with (baked model, plan), returns {name: number}; "
                             "when it fails, the finished runs are kept and the same command reuses them")
    parser.add_argument("--bench", action="store_true",
                        help="measure each run's lowered (block-sparse CPU) speedup over its baked model")
    parser.add_argument("--title", default=None, help="the table's title")
    parser.add_argument("--dry-run", action="store_true", help="validate and list the runs, run nothing")
    parser.add_argument("--no-run", action="store_true",
                        help="write the table from the runs already finished in DIR (an interrupted "
                             "comparison); list the missing ones")


def run(args: argparse.Namespace) -> int:
    # lazy: every command module is imported to build `planc --help`; torch loads only for a command that runs
    from planc.compare import compare, expand, parse_axis

    if args.seeds is not None and args.seeds < 1:
        raise PlanError([Problem(f"expected a positive number of seeds, got {args.seeds}", file="--seeds")])
    if args.jobs < 1:
        raise PlanError([Problem(f"expected a positive number of jobs, got {args.jobs}", file="--jobs")])
    if args.dry_run:
        jobs = expand(args.plans, [parse_axis(s) for s in args.sweep], seeds=args.seeds, out=args.out,
                      steps=args.steps)
        for j in jobs:
            print(f"{j.label}\t{j.run_dir}")
        print(f"{len(jobs)} runs", file=sys.stderr)
        return 0
    command = "planc compare " + " ".join(shlex.quote(a) for a in sys.argv[2:]) if sys.argv[1:2] == ["compare"] \
        else None
    result = compare(args.plans, args.sweep, seeds=args.seeds, out=args.out, steps=args.steps, jobs=args.jobs,
                     threads=args.threads, force=args.force, eval_spec=args.eval, bench=args.bench,
                     title=args.title, command=command, no_run=args.no_run)
    print(f"{args.out}/compare.md: {len(result['groups'])} rows from {len(result['runs'])} runs "
          f"in {result['elapsed_s']:.0f} s")
    return 0
