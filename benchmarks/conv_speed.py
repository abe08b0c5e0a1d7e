"""Issue 15's conv net, lowered: four 256-channel 3×3 convs (padding 1, ReLU after
each), 32×32 images, batch 32, every conv pruned by block magnitude with 32×32 blocks
(32 output channels × 32 input channels at one kernel tap), baked, then lowered with
`planc.lower(min_speedup=0)` (every conv on the kernels). Timed interleaved in one
process (planc.timing), eval mode, inference: the baked model (torch's dense conv), the
lowered model on the implicit GEMM (kernels/conv.py, what it runs now) and on im2col
(the patch matrix, what it ran before). Also one conv alone, and the time im2col's
patch matrix takes. fp32, `--threads` torch threads. Not a test; figures in
docs/benchmarks.md.

    python benchmarks/conv_speed.py [--sparsities 0.9 0.7] [--batch 32] [--threads 2] [--repeats 7]
"""
from __future__ import annotations

import argparse

import torch
from torch import nn

import planc
from planc.kernels.conv import BlockSparseConv2d, im2col
from planc.timing import cpu_model, interleaved

PLAN = """
version: 1
model: {{example_inputs: [[2, 256, 32, 32]]}}
targets: {{defaults: {{block: [32, 32], sparsity: {sparsity}, min_blocks: 1}}}}
method: {{name: magnitude, variant: pretrained}}
schedule: {{phases: [{{phase: finetune, steps: 1}}]}}
train: {{steps: 1}}
"""


def convnet(channels: int = 256, depth: int = 4) -> nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU()]
    return nn.Sequential(*layers)


def set_patches(model: nn.Module, mode: str) -> None:
    for m in model.modules():
        if isinstance(m, BlockSparseConv2d):
            m.patches = mode


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.7])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{cpu_model()}, torch {torch.__version__}, {args.threads} threads, fp32, batch {args.batch}, 256 channels, 32x32")
    x = torch.randn(args.batch, 256, 32, 32)
    for sparsity in args.sparsities:
        pruned = planc.compile(convnet(), planc.load_plan(PLAN.format(sparsity=sparsity)), torch.randn(2, 256, 32, 32))
        pruned.start()
        baked = pruned.bake().eval()
        lowered = planc.lower(baked, backend="cpu", min_speedup=0).eval()
        n_lowered = sum(isinstance(m, BlockSparseConv2d) for m in lowered.modules())
        implicit_model = lambda: lowered(x)                            # noqa: E731

        def im2col_model():
            set_patches(lowered, "im2col")
            try:
                return lowered(x)
            finally:
                set_patches(lowered, "auto")

        with torch.inference_mode():
            err = float((lowered(x) - baked(x)).abs().max() / baked(x).abs().max())
            t = interleaved({"baked": lambda: baked(x), "implicit": implicit_model, "im2col": im2col_model},
                            args.repeats)
            conv = next(m for m in lowered.modules() if isinstance(m, BlockSparseConv2d))
            dense_conv = nn.Conv2d(256, 256, 3, padding=1).eval()     # dense time does not depend on the values
            one = interleaved({"dense conv": lambda: dense_conv(x), "implicit conv": lambda: conv(x),
                               "im2col alone": lambda: im2col(x, 3, 1, 1)}, args.repeats)
        print(f"{sparsity:.0%}: {n_lowered} convs lowered, max rel err {err:.1e}; whole net: baked {t['baked']:.0f} ms, "
              f"implicit {t['implicit']:.0f} ms ({t['baked'] / t['implicit']:.2f}x), im2col {t['im2col']:.0f} ms "
              f"({t['baked'] / t['im2col']:.2f}x); one conv: dense {one['dense conv']:.0f} ms, implicit "
              f"{one['implicit conv']:.0f} ms ({one['dense conv'] / one['implicit conv']:.2f}x), the patch matrix "
              f"alone {one['im2col alone']:.0f} ms; ideal {1 / (1 - sparsity):.1f}x")


if __name__ == "__main__":
    main()
