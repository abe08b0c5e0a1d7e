"""What `train.precision: bfloat16` and `train.optimizer.fused` save in a distillation
step of the shipped MiniLM plan (plans/minilm-70.yaml: the compiled all-MiniLM-L6-v2
with its 36 masked encoder Linear layers, its self-teacher and hidden-state taps).

Each candidate is a whole step — the teacher's and the student's forward, the loss, the
backward, AdamW's step — on the same batch of random token ids (batch 16 × 32 tokens, the
plan's), timed interleaved in one process (planc.timing: medians). Each candidate has
its own optimizer over the same parameters. `--threads` torch threads (default 2).
Not a test; figures in docs/runtime.md, "Mixed precision".

    python benchmarks/train_precision.py [--plan plans/minilm-70.yaml] [--repeats 15]
"""
from __future__ import annotations

import argparse
import contextlib

import torch

import planc
from planc import distill, precision
from planc.plan.factory import call_factory
from planc.timing import cpu_model, interleaved


def flash_bfloat16():
    """bfloat16 autocast with torch's default attention kernel (flash on the CPU)."""
    return torch.autocast("cpu", dtype=torch.bfloat16)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", default="plans/minilm-70.yaml")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    plan = planc.load_plan(args.plan)
    pruned = planc.compile(call_factory(plan, "model.factory"), plan)
    d = distill.from_plan(plan, pruned)
    pruned.module.train()
    distill.set_dropout(pruned.module, False)
    data = plan.train.data.kwargs_dict()
    batch, seq = data["batch_size"], data["seq"]
    x = torch.randint(1000, 20000, (batch, seq))
    params = [p for p in pruned.module.parameters() if p.requires_grad]
    lr = plan.train.optimizer.lr

    def candidate(cast, fused: bool):
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=fused or None)

        def step():
            d.loss(x, cast=cast).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    bf16 = precision.autocast("bfloat16", pruned.module)
    fns = {
        "float32, AdamW": candidate(contextlib.nullcontext, False),
        "float32, fused AdamW": candidate(contextlib.nullcontext, True),
        "bfloat16 (flash attention), fused AdamW": candidate(flash_bfloat16, True),
        "bfloat16 (planc: math attention), fused AdamW": candidate(bf16, True),
    }
    ms = interleaved(fns, args.repeats)
    base = ms["float32, AdamW"]
    print(f"{cpu_model()}, torch {torch.__version__}, {args.threads} threads, {args.plan}, "
          f"batch {batch} x {seq} tokens, median of {args.repeats}")
    for name, t in ms.items():
        print(f"  {name:48s} {t:7.1f} ms  {base / t:4.2f}x")


if __name__ == "__main__":
    main()
