"""planc.integrations: the Hugging Face Trainer callback (a tiny BertModel built from a
config, no download) and the plain-loop helpers."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import planc
from planc.errors import RuntimeStateError
from planc.integrations import prune_loop, pruning, schedule_steps

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PLAN = """
version: 1
name: tiny-bert
model: {example_inputs: [[4, 8]], input_dtype: int64}
targets:
  defaults: {block: [8, 8], sparsity: 0.5, min_blocks: 4}
  rules: [{match: {position: last}, skip: true}]
method: {name: sequential_attention_pp}
schedule: {phases: [{phase: dense, steps: 2}, {phase: sparsify, steps: 2}, {phase: finetune, steps: 2}]}
"""


class TinyBertClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers import BertConfig, BertModel

        torch.manual_seed(0)
        cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32)
        self.bert = BertModel(cfg, add_pooling_layer=False)
        self.head = nn.Linear(32, 2)

    def forward(self, input_ids):
        return self.head(self.bert(input_ids=input_ids).last_hidden_state[:, 0])


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n=32):
        g = torch.Generator().manual_seed(1)
        self.x = torch.randint(0, 100, (n, 8), generator=g)
        self.y = (self.x[:, 0] > 50).long()

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i]}


@pytest.fixture(scope="module")
def compiled_bert():
    return lambda: planc.compile(TinyBertClassifier(), planc.load_plan(PLAN))


def test_trainer_callback_runs_the_schedule(compiled_bert, tmp_path):
    from transformers import Trainer, TrainingArguments

    from planc.integrations.hf import STATE_FILE, PlancCallback

    pruned = compiled_bert()
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=6, per_device_train_batch_size=4,
                             learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="steps", save_steps=3,
                             logging_steps=100, remove_unused_columns=False, disable_tqdm=True, seed=0)
    trainer = Trainer(model=pruned.module, args=args, train_dataset=Tokens(),
                      compute_loss_func=lambda out, labels, num_items_in_batch=None: F.cross_entropy(out, labels),
                      callbacks=[PlancCallback(pruned)])
    trainer.train()
    rt = pruned.runtime
    assert rt.t == 6 and rt.phase.kind == "finetune"
    assert rt.optimizer is not None and isinstance(rt.optimizer, torch.optim.Optimizer)
    kinds = [e["kind"] for e in rt.events if e.get("event") == "phase"]
    assert kinds == ["dense", "sparsify", "finetune"]
    for name, mask in pruned.masks.items():        # every masked layer at its target, pruned weights exactly zero
        assert int((~mask.alive).sum()) == rt.target_blocks(name) > 0
        w = pruned.weight(name).detach()
        assert bool((w[mask.view.expand(~mask.alive)] == 0).all())
    assert os.path.isfile(tmp_path / "hf" / "checkpoint-3" / STATE_FILE)
    baked = pruned.bake().eval()
    x = torch.randint(0, 100, (3, 8))
    torch.testing.assert_close(baked(x), pruned.module.eval()(x))

    # the Trainer resumes from checkpoint-3: the callback loads the runtime's state saved there
    again = compiled_bert()
    trainer = Trainer(model=again.module, args=args, train_dataset=Tokens(),
                      compute_loss_func=lambda out, labels, num_items_in_batch=None: F.cross_entropy(out, labels),
                      callbacks=[PlancCallback(again)])
    trainer.train(resume_from_checkpoint=str(tmp_path / "hf" / "checkpoint-3"))
    assert again.runtime.t == 6 and again.runtime.phase.kind == "finetune"
    assert [e["kind"] for e in again.runtime.events if e.get("event") == "phase"] == kinds
    for name, mask in again.masks.items():
        assert int((~mask.alive).sum()) == again.runtime.target_blocks(name)


def test_prune_loop_runs_to_the_end_of_the_schedule(compiled_bert):
    pruned = compiled_bert()
    opt = torch.optim.AdamW(pruned.param_groups(lr=1e-3))
    data = torch.utils.data.DataLoader(Tokens(), batch_size=4)
    seen = []
    losses = prune_loop(pruned, opt, data, lambda m, b: F.cross_entropy(m(b["input_ids"]), b["labels"]),
                        on_step=lambda t, loss: seen.append(t))
    assert len(losses) == schedule_steps(pruned) == 6 and seen == [1, 2, 3, 4, 5, 6]
    assert all(int((~m.alive).sum()) == pruned.runtime.target_blocks(n) for n, m in pruned.masks.items())


def test_pruning_context_manager_reports_an_unfinished_schedule(compiled_bert):
    pruned = compiled_bert()
    opt = torch.optim.SGD(pruned.param_groups(lr=0.01))
    with pytest.raises(RuntimeStateError, match="stopped at step 1 of the schedule's 6"):
        with pruning(pruned, opt, require_complete=True) as p:
            F.cross_entropy(p.module(torch.randint(0, 100, (4, 8))), torch.zeros(4, dtype=torch.long)).backward()
            opt.step()
            p.step()


def test_trainer_distils_through_the_distillers_module(compiled_bert, tmp_path):
    """A Trainer given Distiller.as_module() trains the student by the distillation loss
    (hidden states of both BERT layers included) while PlancCallback runs the schedule."""
    from transformers import Trainer, TrainingArguments

    from planc import distill
    from planc.integrations.hf import PlancCallback
    from planc.plan.types import Distill

    pruned = compiled_bert()
    d = distill.Distiller(pruned.module, distill.self_teacher(pruned.module),
                          Distill(output=1.0, output_loss="kl", hidden=1.0, modules=("bert.encoder.layer.*",)),
                          "cross_entropy")
    assert d.taps == ("bert.encoder.layer.0", "bert.encoder.layer.1")
    before = {k: v.clone() for k, v in pruned.module.state_dict().items()}
    args = TrainingArguments(output_dir=str(tmp_path / "hf"), max_steps=6, per_device_train_batch_size=4,
                             learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="no",
                             logging_steps=100, remove_unused_columns=False, disable_tqdm=True, seed=0)
    trainer = Trainer(model=d.as_module(), args=args, train_dataset=Tokens(), callbacks=[PlancCallback(pruned)])
    trainer.train()
    assert pruned.runtime.t == 6 and d.parts.hidden > 0          # pruning moved the student off its teacher
    after = pruned.module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith("weight"))
    teacher_weights = [p for p in d.teacher.parameters()]
    assert teacher_weights and not any(p.requires_grad for p in teacher_weights)
