"""load_plan: sources, defaults, resolution, and the problems it reports."""
import textwrap
from pathlib import Path

import pytest

import planc
from planc.errors import PlanError
from planc.plan import dump_plan, load_plan
from planc.plan import load as load_module
from planc.plan.types import Phase, Plan

MINIMAL = "version: 1\nmethod: {name: acdc}\ntrain: {steps: 2000}\n"


def problems(source, **kw):
    with pytest.raises(PlanError) as info:
        load_plan(source, **kw)
    return info.value.problems


# ---- sources -------------------------------------------------------------------------

def test_minimal_plan_fills_defaults():
    plan = load_plan(MINIMAL)
    assert plan.version == 1 and plan.name == "plan"
    assert plan.method.name == "acdc"
    assert plan.targets.defaults.block == (16, 16) and plan.targets.defaults.sparsity == 0.9
    assert plan.schedule.preset == "paper" and plan.schedule.total_steps == 2000 == plan.train.steps
    assert plan.model.factory is None and plan.output is None


def test_sources_agree(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(MINIMAL)
    from_path = load_plan(path)
    assert from_path.name == "mine" and from_path.source == str(path)
    assert load_plan(str(path)) == from_path
    as_text = load_plan(MINIMAL)
    assert load_plan(MINIMAL.encode()) == as_text
    as_dict = load_plan({"version": 1, "method": {"name": "acdc"}, "train": {"steps": 2000}})
    assert as_dict == as_text and as_dict.schedule == from_path.schedule
    assert load_plan(as_dict) is as_dict
    assert planc.load_plan(MINIMAL) == as_text


def test_dict_with_tuples_validates_and_has_no_positions():
    plan = load_plan({"version": 1, "method": {"name": "acdc"}, "targets": {"defaults": {"block": (8, 8)}}})
    assert plan.targets.defaults.block == (8, 8)
    (p,) = problems({"version": 1, "method": {"name": "acdc"}, "targets": {"defaults": {"block": [8]}}})
    assert (p.line, p.col, p.path) == (0, 0, "targets.defaults.block")
    assert str(p) == "<plan>: targets.defaults.block: expected two positive integers, got [8]"


def test_missing_file_is_a_plan_error(tmp_path):
    (p,) = problems(tmp_path / "nope.yaml")
    assert "cannot read plan" in p.message and p.file.endswith("nope.yaml")


def test_file_label_is_used_in_messages():
    (p,) = problems("version: 1\nmethod: {name: nope}\n", file="x.yaml")
    assert str(p).startswith("x.yaml:2:16: method.name: expected one of")


# ---- what is reported ---------------------------------------------------------------------

def test_every_problem_at_once_in_file_order():
    text = textwrap.dedent("""\
        version: 1
        method: {name: acdc}
        targets:
          rules:
            - match: {position: middle}
            - match: {type: Linear}
              block: [16]
        train: {steps: x, seed: -1}
        lower: {backend: tpu}
        """)
    got = [(p.line, p.col, p.path) for p in problems(text)]
    assert got == [(5, 25, "targets.rules[0].match.position"), (7, 14, "targets.rules[1].block"),
                   (8, 16, "train.steps"), (8, 25, "train.seed"), (9, 18, "lower.backend")]


def test_unknown_keys_get_suggestions_or_the_list():
    (p,) = problems("version: 1\nmethod: {name: acdc}\ntrain: {stpes: 10}\n")
    assert p.message == "unknown key 'stpes', did you mean 'steps'?"
    (p,) = problems("version: 1\nmethod: {name: acdc}\nzzz: 1\n")
    assert "expected one of: version, name, model" in p.message


def test_keys_of_other_methods_are_rejected():
    (p,) = problems("version: 1\nmethod: {name: magnitude, alpha: 2}\n")
    assert p.path == "method.alpha" and "does not apply to method magnitude (its keys: variant, update_every)" in p.message


def test_misspelt_method_key_is_reported_once():
    (p,) = problems("version: 1\nmethod: {name: sequential_attention_pp, scor: magnitude}\n")
    assert p.message == "unknown key 'scor', did you mean 'score'?"


def test_yaml_1_2_floats_are_numbers():
    plan = load_plan(MINIMAL + "lower: {min_speedup: 1e0}\n")
    assert plan.lower.min_speedup == 1.0
    plan = load_plan("version: 1\nmethod: {name: acdc}\ntrain: {optimizer: {lr: 1e-4}}\n")
    assert plan.train.optimizer.lr == 1e-4


TRACED = "version: 1\nmodel: {factory: planc.examples.digits:mlp, example_inputs: [[32, 64]]}\nmethod: {name: acdc}\n"


def test_lower_example_inputs_resolve_round_trip_and_default_to_the_tracing_example():
    plan = load_plan(TRACED + "lower: {example_inputs: [[512, 64]]}\n")
    assert plan.lower.example_inputs == ((512, 64),) and plan.model.example_inputs == ((32, 64),)
    assert load_plan(dump_plan(plan)) == plan
    assert load_plan(TRACED).lower.example_inputs == ()
    assert "example_inputs" not in dump_plan(load_plan(TRACED)).split("lower:")[1]


@pytest.mark.parametrize("shapes,message", [
    ("[[8, 64], [8]]", "2 input shape(s) for a model traced with 1 (model.example_inputs): give one shape per model input"),
    ("[[0, 64]]", "expected a list of input shapes, each a list of positive integers, got [[0, 64]]"),
])
def test_lower_example_inputs_mistakes_are_placed(shapes, message):
    (p,) = problems(TRACED + f"lower: {{backend: cpu, example_inputs: {shapes}}}\n")
    assert (p.line, p.col, p.path, p.message) == (4, 39, "lower.example_inputs", message)


def test_anchors_and_merge_keys_are_fine():
    text = textwrap.dedent("""\
        version: 1
        method: {name: acdc}
        targets:
          defaults: &d {block: [8, 8], sparsity: 0.8}
          rules:
            - {match: {name: "a.*"}, <<: *d}
        """)
    rule = load_plan(text).targets.rules[0]
    assert rule.block == (8, 8) and rule.sparsity == 0.8


def test_alias_bomb_is_refused_quickly():
    lines = ["version: 1", "method: {name: acdc}", "a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i-1}'] * 10)}]" for i in range(1, 9)]
    (p,) = problems("\n".join(lines) + "\n")
    assert "alias bomb" in p.message and p.line > 0


def test_non_string_keys_and_bool_values():
    got = problems("version: 1\nmethod: {name: acdc}\n1: x\ntargets: {rules: [{match: {}, skip: maybe}]}\n")
    assert [(p.line, p.col) for p in got] == [(3, 1), (4, 37)]
    assert "expected a string key" in got[0].message and "expected true or false" in got[1].message


# ---- semantics ----------------------------------------------------------------------------

def test_explicit_phases_resolve_with_method_defaults():
    text = textwrap.dedent("""\
        version: 1
        method: {name: sequential_attention_pp, c: 8, update_every: 5}
        schedule:
          phases:
            - {phase: dense, steps: 10}
            - {phase: sparsify, steps: 20}
            - {phase: sparsify, steps: 5, curve: cubic, initial: 0.5, every: 2}
            - {phase: finetune, steps: 15}
        """)
    plan = load_plan(text)
    assert plan.train.steps == 50 and plan.schedule.preset is None     # steps default to the phases
    assert plan.schedule.phases == (
        Phase("dense", 0, 10), Phase("sparsify", 10, 20, curve="exponential", c=8.0, every=5),
        Phase("sparsify", 30, 5, curve="cubic", c=None, initial=0.5, every=2), Phase("finetune", 35, 15))


def test_phases_shorter_than_training_are_rejected():
    (p,) = problems("version: 1\nmethod: {name: acdc}\nschedule: {phases: [{phase: dense, steps: 5}]}\n"
                    "train: {steps: 6}\n")
    assert "shorter than train.steps = 6" in p.message and (p.line, p.col) == (3, 20)


def test_cubic_sparsify_takes_no_c():
    (p,) = problems("version: 1\nmethod: {name: magnitude}\nschedule:\n  phases:\n"
                    "    - {phase: sparsify, steps: 5, curve: cubic, c: 3}\n")
    assert (p.line, p.col, p.path) == (5, 49, "schedule.phases[0].c")


def test_magnitude_variants_and_pretrained_zero_steps():
    plan = load_plan("version: 1\nmethod: {name: magnitude, variant: pretrained}\ntrain: {steps: 0}\n")
    assert plan.schedule.phases == (Phase("finetune", 0, 0),) and plan.schedule.preset == "pretrained"
    plan = load_plan("version: 1\nmethod: {name: magnitude}\nschedule: {preset: gradual}\n")
    assert plan.method.variant == "gradual"
    assert [p.kind for p in plan.schedule.phases] == ["dense", "sparsify", "finetune"]
    assert plan.schedule.phases[1].curve == "cubic" and plan.schedule.phases[1].c is None
    (p,) = problems("version: 1\nmethod: {name: magnitude, variant: gradual}\nschedule: {preset: oneshot}\n")
    assert p.path == "method.variant" and "contradicts" in p.message


def test_zero_steps_with_a_multi_phase_preset_is_too_short():
    (p,) = problems("version: 1\nmethod: {name: powerprop}\ntrain: {steps: 0}\n")
    assert p.path == "train.steps" and "at least 7 steps" in p.message


def test_preset_typo_gets_a_suggestion():
    (p,) = problems("version: 1\nmethod: {name: sequential_attention_pp}\nschedule: {preset: papr}\n")
    assert "did you mean 'paper'?" in p.message and "its presets: paper, criteo, simple" in p.message


def test_factory_needs_example_inputs_and_kwargs_need_a_factory():
    got = problems("version: 1\nmethod: {name: acdc}\nmodel:\n  factory: m:f\n")
    assert [(p.path, p.line) for p in got] == [("model", 4)]
    got = problems("version: 1\nmethod: {name: acdc}\nmodel:\n  kwargs: {a: 1}\n")
    assert [(p.path, p.line, p.col) for p in got] == [("model.kwargs", 4, 3)]


def test_optimizer_keys_follow_its_name():
    got = problems("version: 1\nmethod: {name: acdc}\ntrain:\n  optimizer: {name: adam, momentum: 0.9}\n"
                   "  warmup_steps: 5000\n")
    assert [p.path for p in got] == ["train.optimizer.momentum", "train.warmup_steps"]


def test_preset_with_matching_phases_is_a_lock():
    plan = load_plan("version: 1\nmethod: {name: magnitude}\nschedule:\n  preset: oneshot\n  phases:\n"
                     "    - {phase: dense, steps: 85}\n    - {phase: finetune, steps: 15}\n")
    assert plan.schedule.preset == "oneshot" and plan.train.steps == 100


def test_dump_round_trip_of_a_rich_plan():
    text = textwrap.dedent("""\
        version: 1
        name: rich
        model: {factory: "a.b:c", kwargs: {sizes: [1, 2], nested: {k: v}}, example_inputs: [[2, 3, 8, 8]]}
        targets:
          defaults: {block: [4, 8], sparsity: 0.5, min_blocks: 0}
          rules:
            - {match: {type: Conv2d, position: first}, skip: true}
            - {match: {name: "x.*"}, block: [2, 2], sparsity: 0.25, min_blocks: 3}
          budget: per_layer
        method: {name: sequential_attention_pp, score: magnitude, clip: [0, 3], logits_lr: 0.01,
                 logits_weight_decay: 0}
        schedule: {preset: criteo}
        train:
          data: {factory: "d:e"}
          steps: 470
          optimizer: {name: adamw, lr: 3.0e-4, betas: [0.8, 0.9], weight_decay: 0.01}
          lr_schedule: linear
          warmup_steps: 10
          loss: mse
        lower: {backend: cpu, dtype: bfloat16, min_speedup: 1.2}
        output: runs/rich
        """)
    plan = load_plan(text)
    assert load_plan(dump_plan(plan)) == plan


def test_the_reserved_global_budget_is_refused_at_its_line():
    with pytest.raises(PlanError) as info:
        load_plan("version: 1\nmodel: {example_inputs: [[2, 8]]}\ntargets:\n  budget: global\n"
                  "method: {name: acdc}\nschedule: {preset: paper}\n", file="g.yaml")
    assert str(info.value).startswith("g.yaml:4:11: targets.budget: budget 'global' is not implemented; use per_layer")


# ---- the docstring example ---------------------------------------------------------

def _docstring_example():
    doc = load_module.__doc__
    passing = textwrap.dedent(doc.split("PASS:\n")[1].split("FAIL:")[0])
    failing = doc.split("FAIL:\n")[1]
    plan_lines = [line[4:] for line in failing.splitlines() if line.startswith("    ") and not line.startswith("    =>")]
    expected = [line.split("=> ", 1)[1] for line in failing.splitlines() if line.startswith("    =>")]
    return passing, "\n".join(plan_lines) + "\n", expected


def test_docstring_pass_and_fail_examples_hold():
    passing, failing, expected = _docstring_example()
    assert isinstance(load_plan(passing), Plan)
    assert [str(p) for p in problems(failing)] == expected and len(expected) == 4
