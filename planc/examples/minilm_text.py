"""Distillation data for the pretrained all-MiniLM-L6-v2 (planc.examples.minilm) on real
English text that ships offline with CPython: the documentation topics of
`pydoc_data.topics` (79 topics, about 465,000 characters: the language reference's
pages on statements, operators, data model, ...).

Each topic is tokenized with the model's own tokenizer and cut into windows of exactly
`seq` tokens ([CLS] + seq-2 word pieces + [SEP], no padding, so the model needs no
attention mask). Targets are the dense model's sentence embeddings of the same windows
(mean pooling + L2 normalisation), so training with `train.loss: mse` distils the pruned
model towards the dense one: for unit vectors, mse = 2·(1 − cos)/384, i.e. the mean
cosine is 1 − 192·mse.

The split is by topic (whole topics held out, chosen by `seed`), so validation windows
are text the model never trained on. `evaluate(model, plan)` (for `planc compare
--eval planc.examples.minilm_text:evaluate`) returns the mean cosine to the dense
embeddings and nearest-neighbour agreement on the validation windows.

The windows and the dense embeddings are computed once and cached (safetensors) under
$PLANC_CACHE or ~/.cache/planc.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, Tuple

import torch
from torch.utils.data import DataLoader, TensorDataset

HIDDEN = 384


def _cache_dir() -> Path:
    return Path(os.environ.get("PLANC_CACHE") or Path.home() / ".cache" / "planc")


def _topics() -> Dict[str, str]:
    from pydoc_data.topics import topics

    return dict(sorted(topics.items()))


def windows(seq: int = 32) -> Tuple[torch.Tensor, torch.Tensor, list]:
    """(ids (N, seq) int64, topic index (N,) int64, topic names)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from planc.examples.minilm import model_dir

    tok = AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)
    body = seq - 2
    rows, owner = [], []
    names = list(_topics())
    for i, (name, text) in enumerate(_topics().items()):
        pieces = tok(" ".join(text.split()), add_special_tokens=False)["input_ids"]
        for s in range(0, len(pieces) - body + 1, body):
            rows.append([tok.cls_token_id] + pieces[s:s + body] + [tok.sep_token_id])
            owner.append(i)
    return torch.tensor(rows, dtype=torch.int64), torch.tensor(owner, dtype=torch.int64), names


@torch.no_grad()
def dense_embeddings(ids: torch.Tensor, batch: int = 128) -> torch.Tensor:
    from planc.examples.minilm import model

    teacher = model().eval()
    return torch.cat([teacher(ids[i:i + batch]) for i in range(0, len(ids), batch)])


def dataset(seq: int = 32) -> Dict[str, torch.Tensor]:
    """{ids, topic, target} for every window (cached)."""
    from safetensors.torch import load_file, save_file

    text_hash = hashlib.sha256("\x00".join(f"{k}\x01{v}" for k, v in _topics().items()).encode()).hexdigest()[:12]
    path = _cache_dir() / f"minilm_text-{seq}-{text_hash}.safetensors"
    if path.is_file():
        return load_file(str(path))
    ids, topic, _ = windows(seq)
    data = {"ids": ids, "topic": topic, "target": dense_embeddings(ids).contiguous()}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(data, str(tmp))
    os.replace(tmp, path)
    return data


def split(data: Dict[str, torch.Tensor], val_fraction: float = 0.2, seed: int = 0):
    """Boolean masks (train, val) over windows: whole topics held out."""
    topics = int(data["topic"].max()) + 1
    perm = torch.randperm(topics, generator=torch.Generator().manual_seed(seed))
    held = perm[: max(1, int(round(topics * val_fraction)))]
    val = torch.isin(data["topic"], held)
    return ~val, val


def loaders(batch_size: int = 16, seq: int = 32, val_fraction: float = 0.2, seed: int = 0,
            max_train: int | None = None, max_val: int | None = None):
    """(train_loader, eval_loader) of (token ids, dense embedding) pairs."""
    data = dataset(seq)
    tr, va = split(data, val_fraction, seed)
    xt, yt = data["ids"][tr], data["target"][tr]
    xv, yv = data["ids"][va], data["target"][va]
    if max_train is not None:
        xt, yt = xt[:max_train], yt[:max_train]
    if max_val is not None:
        xv, yv = xv[:max_val], yv[:max_val]
    train = DataLoader(TensorDataset(xt, yt), batch_size=batch_size, shuffle=True, drop_last=True,
                       generator=torch.Generator().manual_seed(seed))
    evaluation = DataLoader(TensorDataset(xv, yv), batch_size=128)
    return train, evaluation


@torch.no_grad()
def evaluate(model, plan) -> Dict[str, float]:
    """On the plan's validation windows: mean and 5th-percentile cosine between the
    model's and the dense model's embeddings, and nearest-neighbour agreement (the
    fraction of windows whose nearest other window, by cosine, is the same under both)."""
    kwargs = plan.train.data.kwargs_dict() if plan.train.data is not None else {}
    _, ev = loaders(**kwargs)
    model.eval()
    outs, refs = [], []
    for x, y in ev:
        outs.append(torch.nn.functional.normalize(model(x).float(), dim=-1))
        refs.append(y.float())
    a, b = torch.cat(outs), torch.cat(refs)
    cos = (a * b).sum(-1)

    def nn(e):
        sim = e @ e.T
        sim.fill_diagonal_(-2.0)
        return sim.argmax(-1)

    return {"cosine": float(cos.mean()), "cosine_p05": float(cos.quantile(0.05)),
            "nn_agreement": float((nn(a) == nn(b)).float().mean())}
