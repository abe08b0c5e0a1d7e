"""Bad models: each gives one planc error (a PlancError subclass, one line), and through
the CLI an exit status of 2 (the plan does not fit the model) or 1 (the model cannot be
traced or built) with one `planc: ...` line and no traceback.

The models live in a helper module written into tmp_path and put on sys.path (in-process)
or PYTHONPATH (the subprocess), so plans can name them as `model.factory`."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import planc
from planc.cli import main
from planc.errors import PlancError, SelectError, TraceError

MODULE = "planc_test_badmodels"
SOURCE = textwrap.dedent('''
    import torch
    from torch import nn


    class NoLayer(nn.Module):            # nothing that applies a weight
        def forward(self, x):
            return torch.relu(x) * 2


    class Untraceable(nn.Module):        # data-dependent Python control flow
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(64, 64)

        def forward(self, x):
            if float(x.sum()) > 0:
                return self.fc(x)
            return -self.fc(x)


    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            return self.head(self.layers(x))


    def nolayer():
        return NoLayer()


    def untraceable():
        return Untraceable()


    def mlp():
        return MLP()


    def boom():
        raise RuntimeError("factory exploded")


    def gpt2(use_cache=False):           # tiny, random init; transformers' default keeps a KV cache
        import transformers

        cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2, n_positions=32)
        if not use_cache:
            cfg.use_cache = False
        return transformers.GPT2LMHeadModel(cfg)
''')


def plan_text(factory: str, inputs=(4, 64), rules: str = "", min_blocks: int = 1) -> str:
    return textwrap.dedent(f'''\
        version: 1
        name: bad-model
        model: {{factory: "{MODULE}:{factory}", example_inputs: [[{inputs[0]}, {inputs[1]}]]}}
        targets:
          defaults: {{block: [8, 8], sparsity: 0.5, min_blocks: {min_blocks}}}
        {rules}
        method: {{name: magnitude}}
        schedule: {{phases: [{{phase: dense, steps: 2}}, {{phase: finetune, steps: 2}}]}}
        train: {{steps: 4, data: {{factory: "planc.examples.digits:loaders"}}}}
        ''')


NO_MATCH_RULE = '  rules: [{match: {name: "nothere.*"}, sparsity: 0.9}]'


@pytest.fixture
def models(tmp_path, monkeypatch):
    (tmp_path / f"{MODULE}.py").write_text(SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(MODULE, None)
    import importlib

    mod = importlib.import_module(MODULE)
    yield mod
    sys.modules.pop(MODULE, None)


def write(tmp_path, name: str, text: str) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    return str(path)


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text.strip(), text
    assert "Traceback" not in text
    return text


def cli(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("planc")]
    assert "Traceback" not in captured.err + captured.out
    return code, lines


# ---- planc.compile ------------------------------------------------------------------------
def test_untraceable_model_is_one_trace_error(models):
    plan = planc.load_plan(plan_text("untraceable"))
    with pytest.raises(TraceError) as info:
        planc.compile(models.untraceable(), plan)
    msg = one_line(info.value)
    assert "Untraceable" in msg and "trace" in msg


def test_wrong_example_shape_is_one_trace_error(models):
    plan = planc.load_plan(plan_text("mlp", inputs=(4, 10)))       # the model wants 64 features
    with pytest.raises(TraceError) as info:
        planc.compile(models.mlp(), plan)
    msg = one_line(info.value)
    assert "MLP" in msg and "10" in msg


def test_wrong_example_shape_given_in_python_is_one_trace_error(models):
    plan = planc.load_plan(plan_text("mlp"))
    with pytest.raises(PlancError) as info:
        planc.compile(models.mlp(), plan, torch.randn(3, 7))
    one_line(info.value)


def test_rule_that_matches_nothing_is_one_select_error(models):
    plan = planc.load_plan(plan_text("mlp", rules=NO_MATCH_RULE))
    with pytest.raises(SelectError) as info:
        planc.compile(models.mlp(), plan)
    msg = one_line(info.value)
    assert "rules[0]" in msg and "matches no layer" in msg and "layers.0" in msg   # names what there is


@pytest.mark.parametrize("factory,min_blocks,why", [
    ("nolayer", 1, "applies no weight"),
    ("mlp", 10 ** 6, "all 3 layers stay dense (layers.0: 64 blocks < min_blocks 1000000"),
], ids=["no-weight-layer", "all-skipped"])
def test_model_with_no_matching_layer_is_one_select_error(models, factory, min_blocks, why):
    plan = planc.load_plan(plan_text(factory, min_blocks=min_blocks))
    with pytest.raises(SelectError) as info:
        planc.compile(getattr(models, factory)(), plan)
    msg = one_line(info.value)
    assert "no layer to prune" in msg and why in msg, msg


# ---- the CLI: `planc explain` (builds the model from the plan's factory) ---------------------
def test_cli_untraceable_exit_1_one_line(models, tmp_path, capsys):
    code, lines = cli(["explain", write(tmp_path, "u", plan_text("untraceable"))], capsys)
    assert code == 1 and len(lines) == 1 and "could not trace Untraceable" in lines[0]


def test_cli_wrong_shape_exit_1_one_line(models, tmp_path, capsys):
    code, lines = cli(["explain", write(tmp_path, "s", plan_text("mlp", inputs=(4, 10)))], capsys)
    assert code == 1 and len(lines) == 1 and "could not trace MLP" in lines[0]


def test_cli_rule_matches_nothing_exit_2_one_line(models, tmp_path, capsys):
    code, lines = cli(["explain", write(tmp_path, "r", plan_text("mlp", rules=NO_MATCH_RULE))], capsys)
    assert code == 2 and len(lines) == 1 and "matches no layer" in lines[0]


def test_cli_factory_that_raises_exit_1_one_line(models, tmp_path, capsys):
    code, lines = cli(["explain", write(tmp_path, "b", plan_text("boom"))], capsys)
    assert code == 1 and len(lines) == 1 and "factory exploded" in lines[0]


def test_cli_factory_that_does_not_exist_exit_2_one_line(models, tmp_path, capsys):
    path = write(tmp_path, "m", plan_text("no_such_factory"))
    code = main(["explain", path])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and err == [f"{path}:3:18: model.factory: cannot import '{MODULE}:no_such_factory': "
                                 f"module '{MODULE}' has no attribute 'no_such_factory'"]


@pytest.mark.parametrize("factory,inputs,code,says", [
    ("boom", (4, 64), 1, f"model.factory: '{MODULE}:boom' raised RuntimeError: factory exploded"),
    ("no_such_factory", (4, 64), 2, "model.factory: cannot import"),
    ("nolayer", (4, 64), 2, "no layer to prune"),
    ("mlp", (4, 10), 1, "could not trace MLP"),
], ids=["raises", "missing", "no-layer", "wrong-shape"])
def test_cli_apply_and_explain_report_a_bad_model_alike(models, tmp_path, capsys, factory, inputs, code, says):
    path = write(tmp_path, factory, plan_text(factory, inputs=inputs))
    seen = []
    for argv in (["explain", path], ["apply", path, "--out", str(tmp_path / "run")]):
        got = main(argv)
        captured = capsys.readouterr()
        errors = [ln for ln in captured.err.splitlines() if ln.strip()]
        assert "Traceback" not in captured.err + captured.out
        assert got == code and len(errors) == 1 and says in errors[0], (argv, got, errors)
        seen.append(errors[0])
    assert seen[0] == seen[1]


# ---- a real subprocess: what a user sees on the terminal -------------------------------------
def _subprocess_explain(tmp_path, text):
    (tmp_path / f"{MODULE}.py").write_text(SOURCE)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-m", "planc.cli", "explain", write(tmp_path, "p", text)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_subprocess_rule_matches_nothing_prints_one_line(tmp_path):
    proc = _subprocess_explain(tmp_path, plan_text("mlp", rules=NO_MATCH_RULE))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert [ln for ln in proc.stderr.splitlines() if ln.strip()] == \
        [ln for ln in proc.stderr.splitlines() if ln.startswith("planc:")]


@pytest.mark.parametrize("factory,inputs", [("mlp", (4, 10)), ("untraceable", (4, 64))],
                         ids=["wrong-shape", "untraceable"])
def test_subprocess_trace_failure_prints_one_line(tmp_path, factory, inputs):
    # torch.export logs a traceback (wrong shape) or prints the partial graph (untraceable)
    # to stderr before it raises; planc holds that output, so only its own line shows.
    proc = _subprocess_explain(tmp_path, plan_text(factory, inputs=inputs))
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len([ln for ln in proc.stderr.splitlines() if ln.strip()]) == 1, proc.stderr[-2000:]


# ---- decoder LLMs through the CLI -------------------------------------------------------------
def gpt2_plan(tmp_path, use_cache: bool) -> str:
    text = plan_text("gpt2", inputs=(2, 8)).replace(
        "example_inputs: [[2, 8]]", f"example_inputs: [[2, 8]], input_dtype: int64, kwargs: {{use_cache: {str(use_cache).lower()}}}")
    return write(tmp_path, f"gpt2-{use_cache}", text)


def test_cli_gpt2_with_its_kv_cache_is_one_line_saying_what_to_set(models, tmp_path, capsys):
    pytest.importorskip("transformers")
    path = gpt2_plan(tmp_path, use_cache=True)
    for argv in (["explain", path], ["apply", path, "--out", str(tmp_path / "run")]):
        code, lines = cli(argv, capsys)
        assert code == 1 and len(lines) == 1, (argv, lines)
        assert lines[0].endswith("model output holds a KV cache (DynamicCache); "
                                 "build the model with use_cache=False (config.use_cache = False)"), lines[0]


def test_cli_explain_gpt2_lists_conv1d_layers_and_both_uses_of_the_tied_head(models, tmp_path, capsys):
    pytest.importorskip("transformers")
    assert main(["explain", gpt2_plan(tmp_path, use_cache=False)]) == 0
    out = capsys.readouterr().out
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("transformer.h.0.") or ln.startswith("lm_head")}
    assert set(rows) == {"transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
                         "transformer.h.0.mlp.c_proj", "lm_head"}
    assert all(rows[n].split()[1] == "linear^T" for n in rows if n != "lm_head")
    assert rows["transformer.h.0.attn.c_attn"].split()[2:5] == ["32x96", "8x8", "12x4"]   # stored (in, out); grid (out, in)
    assert "weight tied to the input embedding transformer.wte" in rows["lm_head"]
    also = [ln.split() for ln in out.splitlines() if ln.strip().startswith("also ")]
    assert [a[:3] for a in also] == [["also", "transformer.wte", "embedding"]]
    assert "transposed (Conv1D-style) linear" in out
