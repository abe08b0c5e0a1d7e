"""Distillation (planc.distill, train.distill): the teacher's hidden states are read at
the right nodes and enter the loss with their weight, dropout can be turned off, and a
run with distillation resumes bitwise."""
from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F

import planc
from planc import distill
from planc.errors import PlanError
from planc.integrations import prune_loop
from planc.plan import dump_plan
from planc.plan.types import Distill
from planc.runfolder import CHECKPOINT
from planc.train import train

TAPS = ["layers.1", "layers.4"]          # the two ReLUs of digits.mlp(depth=2, dropout>0)


def plan_data(frontend="export", steps=30, **train_kw):
    return {
        "version": 1,
        "name": "distill-tiny",
        "model": {"factory": "planc.examples.digits:mlp", "kwargs": {"hidden": 32, "dropout": 0.3},
                  "example_inputs": [[8, 64]], "frontend": frontend},
        "targets": {"defaults": {"block": [8, 8], "sparsity": 0.75, "min_blocks": 16},
                    "rules": [{"match": {"position": "last"}, "skip": True}]},
        "method": {"name": "sequential_attention_pp"},
        "schedule": {"phases": [{"phase": "dense", "steps": 5}, {"phase": "sparsify", "steps": 10},
                                {"phase": "finetune", "steps": steps - 15}]},
        "train": {"data": {"factory": "planc.examples.digits:loaders", "kwargs": {"batch_size": 32, "train_size": 320}},
                  "steps": steps, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                  "eval_every": 1, "loss": "cross_entropy", **train_kw},
    }


def distill_section(**kw):
    return {"teacher": "self", "output": 1.0, "output_loss": "kl", "hidden": 1.0, "modules": TAPS, **kw}


def _hooked(model, names):
    seen = {}
    for name in names:
        model.get_submodule(name).register_forward_hook(lambda m, i, o, name=name: seen.__setitem__(name, o))
    return seen


@pytest.mark.parametrize("frontend", ["export", "symbolic"])
def test_the_loss_is_the_documented_sum_with_hidden_states_read_where_the_modules_return(frontend):
    torch.manual_seed(0)
    plan = planc.load_plan(plan_data(frontend))
    model = planc.examples_model = __import__("planc.examples.digits", fromlist=["mlp"]).mlp(hidden=32, dropout=0.3)
    teacher_ref = copy.deepcopy(model).eval()
    pruned = planc.compile(model, plan)
    d = distill.Distiller(pruned.module, distill.self_teacher(pruned.module),
                          Distill(output=0.5, output_loss="kl", temperature=2.0, hidden=3.0, modules=tuple(TAPS)),
                          "cross_entropy")
    assert d.taps == tuple(TAPS)
    with torch.no_grad():                            # the student moves away from its teacher
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    student_ref = copy.deepcopy(model).eval()
    pruned.module.eval()
    x = torch.randn(16, 64)
    loss = d.loss(x)
    hs, ht = _hooked(student_ref, TAPS), _hooked(teacher_ref, TAPS)
    out, ref = student_ref(x), teacher_ref(x)
    kl = F.kl_div(F.log_softmax(out / 2, -1), F.log_softmax(ref / 2, -1), log_target=True, reduction="batchmean") * 4
    rel = torch.stack([(hs[k] - ht[k]).pow(2).sum() / ht[k].pow(2).sum() for k in TAPS]).mean()
    expected = 0.5 * kl + 3.0 * rel
    assert rel > 1e-3 and kl > 1e-6                   # both terms matter in this check
    assert torch.allclose(loss, expected, rtol=1e-4, atol=1e-7), (float(loss), float(expected))
    loss.backward()                                  # the hidden term reaches the weights
    assert all(p.grad is not None for n, p in pruned.module.named_parameters() if n.endswith("weight"))


def test_a_dense_self_teacher_gives_zero_loss_only_without_dropout():
    """At the first step the student is its teacher: with train.dropout false the loss is
    ~0; with dropout on (the default) it is not."""
    off = train(planc.load_plan(plan_data(steps=16, dropout=False, distill=distill_section())), None,
                progress=False, stop_after=1)
    on = train(planc.load_plan(plan_data(steps=16, distill=distill_section())), None, progress=False, stop_after=1)
    assert abs(off.history[0]["train_loss"]) < 1e-5
    assert on.history[0]["train_loss"] > 1e-3
    assert off.history[0]["distill_hidden"] < 1e-9 < on.history[0]["distill_hidden"]


def test_distillation_trains_and_resumes_bitwise(tmp_path):
    data = plan_data(steps=24, dropout=False, checkpoint_every=7, distill=distill_section(task=0.5))
    plan = planc.load_plan(data)
    ref, part = str(tmp_path / "ref"), str(tmp_path / "part")
    done = train(plan, ref, progress=False)
    assert done.history[-1]["train_loss"] > 0 and done.report["mean_sparsity"] == pytest.approx(0.75, abs=0.01)
    first = train(plan, part, progress=False, stop_after=10)
    assert not first.finished and os.path.isfile(os.path.join(part, CHECKPOINT))
    assert train(plan, part, resume=True, progress=False).finished
    a, b = planc.runfolder.state_dict(ref), planc.runfolder.state_dict(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_plain_loop_helper_takes_the_distillers_loss():
    torch.manual_seed(0)
    plan = planc.load_plan(plan_data(steps=20, distill=distill_section()))
    pruned = planc.compile(__import__("planc.examples.digits", fromlist=["mlp"]).mlp(hidden=32, dropout=0.3), plan)
    d = distill.from_plan(plan, pruned)
    opt = torch.optim.SGD(pruned.param_groups(lr=0.05), lr=0.05)
    data = [(torch.randn(16, 64), torch.zeros(16, dtype=torch.long)) for _ in range(4)]
    losses = prune_loop(pruned, opt, data, d.loss_fn)
    assert len(losses) == 20 and all(torch.isfinite(torch.tensor(losses)))
    assert pruned.pruning_runtime().mean_sparsity() == pytest.approx(0.75, abs=0.01)


def test_distill_section_round_trips_and_its_mistakes_are_placed():
    plan = planc.load_plan(plan_data(distill=distill_section(temperature=2.0)))
    assert plan.train.distill.modules == tuple(TAPS) and plan.train.distill.teacher is None
    assert planc.load_plan(dump_plan(plan)) == plan
    factory = planc.load_plan(plan_data(distill=distill_section(teacher={"factory": "planc.examples.digits:mlp"})))
    assert factory.train.distill.teacher.path == "planc.examples.digits:mlp"
    assert planc.load_plan(dump_plan(factory)) == factory
    cases = [
        ({"hidden": 1.0, "modules": None}, "hidden-state loss needs modules"),
        ({"temperature": 2.0, "output_loss": "cosine"}, "temperature applies to output_loss kl only"),
        ({"teacher": {"factory": "os:system"}}, "refused 'os:system'"),
        ({"teacher": "mine"}, "expected 'self'"),
        ({"hiden": 1.0}, "did you mean 'hidden'"),
    ]
    for change, message in cases:
        section = {k: v for k, v in {**distill_section(), **change}.items() if v is not None}
        text = dump_plan(planc.load_plan(plan_data())).replace("  seed: 0\n", "  seed: 0\n  distill: " +
                                                                    repr(section).replace("'", '"') + "\n")
        with pytest.raises(PlanError, match=message) as err:
            planc.load_plan(text)
        assert ":" in str(err.value).splitlines()[0]                 # placed at a line and column


def test_a_pattern_that_matches_nothing_names_the_modules_there_are():
    plan = planc.load_plan(plan_data(distill=distill_section(modules=["encoder.*"])))
    pruned = planc.compile(__import__("planc.examples.digits", fromlist=["mlp"]).mlp(hidden=32, dropout=0.3), plan)
    with pytest.raises(planc.errors.PlancError, match=r"'encoder\.\*' matches no module .*layers"):
        distill.from_plan(plan, pruned)


def test_a_view_keeps_the_graphs_plain_tensor_constants():
    """A traced graph can read a tensor stored as a plain attribute (no parameter, no
    buffer); the tapped view must carry it over."""
    import torch.fx as fx

    class WithConstant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.inner(x) * 2

    gm = fx.symbolic_trace(WithConstant())
    gm.scale = torch.tensor(3.0)
    with gm.graph.inserting_before(list(gm.graph.nodes)[-1]), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)      # fx warns of a plain attribute: the case under test
        const = gm.graph.get_attr("scale")
        out = list(gm.graph.nodes)[-1].args[0]
        scaled = gm.graph.call_function(torch.mul, (out, const))
    list(gm.graph.nodes)[-1].args = (scaled,)
    gm.recompile()
    view, recorder, names = distill.tap(gm, ["inner"])
    x = torch.randn(2, 4)
    assert names == ("inner",) and torch.equal(view(x), gm(x))
    assert torch.equal(recorder.values["inner"], gm.inner(x))


def test_the_historys_distillation_terms_are_means_since_the_last_evaluation(tmp_path):
    """distill_* in the history average every step since the previous evaluation (one
    batch is a noisy statistic), and a resumed run records exactly the same means."""
    data = plan_data(steps=24, dropout=False, checkpoint_every=5, distill=distill_section())
    data["train"]["eval_every"] = 8
    plan = planc.load_plan(data)
    seen = []
    original = distill.Distiller.loss

    def spy(self, *a, **k):
        loss = original(self, *a, **k)
        seen.append((self.parts.output, self.parts.hidden))
        return loss

    distill.Distiller.loss = spy
    try:
        whole = train(plan, str(tmp_path / "whole"), progress=False)
    finally:
        distill.Distiller.loss = original
    assert len(seen) == 24 and [h["step"] for h in whole.history] == [8, 16, 24]
    for i, entry in enumerate(whole.history):
        chunk = seen[8 * i:8 * (i + 1)]
        assert entry["distill_output"] == pytest.approx(sum(o for o, _ in chunk) / 8, rel=1e-12)
        assert entry["distill_hidden"] == pytest.approx(sum(h for _, h in chunk) / 8, rel=1e-12)
        assert entry["distill_hidden"] != chunk[-1][1]                 # not the last batch's value
    part = str(tmp_path / "part")
    assert not train(plan, part, progress=False, stop_after=13).finished     # checkpoint at 10, mid-interval
    resumed = train(plan, part, resume=True, progress=False)
    assert resumed.history == whole.history


@pytest.mark.parametrize("output_loss", ["cosine", "kl", "mse"])
def test_a_student_equal_to_its_teacher_gets_no_gradient_not_rounding_noise(output_loss):
    """Where the student computes exactly its teacher's output, its loss and gradient are
    exactly zero. Rounding noise instead (1 − cos(x, x) is not 0 in floating point) is
    what Adam divides by its own size: a dense phase with a self teacher then moved every
    weight by the full learning rate and left the teacher (MiniLM, ACDC's first dense
    phase: cosine 0.82 after 1,000 steps of "nothing to learn")."""
    torch.manual_seed(0)
    plan = planc.load_plan(plan_data(dropout=False))
    pruned = planc.compile(__import__("planc.examples.digits", fromlist=["mlp"]).mlp(hidden=32, dropout=0.3), plan)
    d = distill.Distiller(pruned.module, distill.self_teacher(pruned.module),
                          Distill(output=1.0, output_loss=output_loss, hidden=1.0, modules=tuple(TAPS)), "cross_entropy")
    for module in (pruned.module, d.student):
        module.train()
        distill.set_dropout(module, False)
    loss = d.loss(torch.randn(64, 64) * 3)
    loss.backward()
    grads = [p.grad for p in pruned.module.parameters() if p.grad is not None]
    assert grads and float(loss.detach()) == 0.0
    assert all(torch.count_nonzero(g) == 0 for g in grads), max(float(g.abs().max()) for g in grads)


def test_a_dense_phase_under_adam_with_a_self_teacher_keeps_the_dense_model():
    """Every phase keeps the model's function except for what it prunes: ten dense steps
    of Adam towards the model's own outputs leave the student equal to its teacher."""
    data = plan_data(steps=20, dropout=False, distill=distill_section(output_loss="cosine"))
    data["method"] = {"name": "acdc"}
    data["schedule"] = {"phases": [{"phase": "dense", "steps": 10}, {"phase": "finetune", "steps": 10}]}
    data["train"]["optimizer"] = {"name": "adam", "lr": 0.01}
    result = train(planc.load_plan(data), None, progress=False, stop_after=10)
    assert [e["step"] for e in result.history] == list(range(1, 11))
    assert all(e["distill_output"] == 0.0 and e["distill_hidden"] == 0.0 for e in result.history), \
        [(e["distill_output"], e["distill_hidden"]) for e in result.history]


@pytest.mark.parametrize("kind", ["cosine", "kl"])
def test_rows_equal_to_the_teachers_add_nothing_and_the_others_keep_their_mean_over_all_rows(kind):
    torch.manual_seed(0)
    ref = torch.randn(8, 5, 16)
    out = ref.clone()
    out[:3] += 0.3 * torch.randn(3, 5, 16)
    out.requires_grad_(True)
    loss = distill.output_loss(kind, out, ref, temperature=2.0)
    loss.backward()
    if kind == "cosine":
        per_row = 1.0 - F.cosine_similarity(out[:3].detach().flatten(1), ref[:3].flatten(1), dim=-1)
        expected = per_row.sum() / 8
    else:
        expected = F.kl_div(F.log_softmax(out[:3].detach() / 2, -1), F.log_softmax(ref[:3] / 2, -1),
                            log_target=True, reduction="sum") / 8 * 4
    assert float(expected) > 1e-3
    assert torch.allclose(loss.detach(), expected, rtol=1e-5)
    assert torch.count_nonzero(out.grad[3:]) == 0 and torch.count_nonzero(out.grad[:3]) > 0
