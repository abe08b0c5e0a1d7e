"""What a training step costs in a sparse phase, with and without the block-sparse kernels
(planc.runtime.sparse_phases), against the same model without planc.

The model of issue 16: an MLP 64→2048→2048→10 with 32×32 blocks at 90% on the two hidden
layers (the head is skipped), SGD with momentum, cross-entropy. Each candidate is a full
step (forward, backward, optimizer step, `pruned.step()`), timed interleaved in one
process (planc.timing: medians). Then a whole SequentialAttention++ schedule (dense,
sparsify, finetune) against the same number of plain steps, alternated run by run.
fp32, `--threads` torch threads (default 2). Not a test; figures in docs/benchmarks.md.

    python benchmarks/sparse_phase_step.py [--batches 64 512] [--repeats 21] [--run-steps 200]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import planc
from planc.timing import cpu_model, interleaved

PLAN = """
version: 1
model: {{example_inputs: [[64, 64]]}}
targets: {{defaults: {{block: [32, 32], sparsity: 0.9, min_blocks: 1}}, rules: [{{match: {{position: last}}, skip: true}}]}}
method: {{name: sequential_attention_pp}}
schedule:
  sparse_kernels: {kernels}
  phases: {phases}
train: {{steps: {steps}}}
"""


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 2048), nn.ReLU(), nn.Linear(2048, 2048), nn.ReLU(), nn.Linear(2048, 10))


def compiled(kernels, phases: str, steps: int):
    pruned = planc.compile(mlp(), PLAN.format(kernels=kernels, phases=phases, steps=steps), torch.randn(64, 64))
    opt = torch.optim.SGD(pruned.param_groups(lr=1e-3, momentum=0.9))
    pruned.attach(opt)
    return pruned, opt


def step_fn(model, opt, x, y, after=lambda: None):
    def step():
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        after()
    return step


def sparse_phase(batches, repeats: int) -> None:
    phases = "[{phase: sparse, steps: 1000000}]"
    plain = mlp()
    plain_opt = torch.optim.SGD(plain.parameters(), lr=1e-3, momentum=0.9)
    off, off_opt = compiled("false", phases, 1000000)
    on, on_opt = compiled("true", phases, 1000000)
    auto, auto_opt = compiled("auto", phases, 1000000)
    for batch in batches:
        x, y = torch.randn(batch, 64), torch.randint(0, 10, (batch,))
        t = interleaved({"plain": step_fn(plain, plain_opt, x, y),
                         "dense kernels off": step_fn(off.module, off_opt, x, y, off.step),
                         "kernels on": step_fn(on.module, on_opt, x, y, on.step),
                         "auto": step_fn(auto.module, auto_opt, x, y, auto.step)}, repeats)
        cells = ", ".join(f"{k} {v:.2f} ms ({t['plain'] / v:.2f}x plain)" for k, v in t.items())
        print(f"sparse phase at 90%, batch {batch}: {cells}; auto chose {auto.runtime.kernels.decisions()}")
        auto.runtime.kernels.forget()                    # time again at the next batch size


def whole_run(batch: int, steps: int, rounds: int) -> None:
    dense, sparsify = steps // 10, (4 * steps) // 10
    phases = (f"[{{phase: dense, steps: {dense}}}, {{phase: sparsify, steps: {sparsify}, every: {max(1, sparsify // 10)}}}, "
              f"{{phase: finetune, steps: {steps - dense - sparsify}}}]")
    x, y = torch.randn(batch, 64), torch.randint(0, 10, (batch,))

    def plain_run():
        model = mlp()
        step = step_fn(model, torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9), x, y)
        for _ in range(steps):
            step()

    compile_s = []

    def planc_run(kernels):
        def run():
            t0 = time.perf_counter()
            pruned, opt = compiled(kernels, phases, steps)       # trace, select, insert masks
            compile_s.append(time.perf_counter() - t0)
            step = step_fn(pruned.module, opt, x, y, pruned.step)
            for _ in range(steps):
                step()
        return run

    runs = {"plain": plain_run, "SA++ kernels off": planc_run("false"), "SA++ auto": planc_run("auto")}
    times = {k: [] for k in runs}
    for _ in range(rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    cells = ", ".join(f"{k} {v:.2f} s ({v / med['plain']:.2f}x plain)" for k, v in med.items())
    cells += f"; planc's times include compiling the model, {statistics.median(compile_s):.2f} s"
    print(f"whole run, {steps} steps (dense {dense}, sparsify {sparsify}, finetune {steps - dense - sparsify}), "
          f"batch {batch}: {cells}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--run-steps", type=int, default=200, help="0: skip the whole-run comparison")
    ap.add_argument("--run-batch", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{cpu_model()}, torch {torch.__version__}, {args.threads} threads, fp32")
    sparse_phase(args.batches, args.repeats)
    if args.run_steps:
        whole_run(args.run_batch, args.run_steps, args.rounds)


if __name__ == "__main__":
    main()
