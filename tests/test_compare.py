"""planc compare: sweeps over plan fields, validated with positions; runs; the table."""
from __future__ import annotations

import json
import os
import statistics
from pathlib import Path

import pytest
import yaml

from planc.cli import main
from planc.compare import build_plan, compare, expand, group, parse_axis, summarize, to_markdown
from planc.errors import PlanError
from planc.plan.load import load_plan
from planc.train import train

TINY = {
    "version": 1, "name": "cmp-tiny",
    "model": {"factory": "planc.examples.digits:mlp", "kwargs": {"hidden": 32}, "example_inputs": [[16, 64]]},
    "targets": {"defaults": {"block": [8, 8], "sparsity": 0.5, "min_blocks": 16},
                "rules": [{"match": {"position": "last"}, "skip": True},
                          {"match": {"type": "Linear", "name": "layers.*"}, "sparsity": 0.75}]},
    "method": {"name": "sequential_attention_pp", "score": "attention", "c": 4},
    "schedule": {"preset": "simple"},
    "train": {"data": {"factory": "planc.examples.digits:loaders", "kwargs": {"batch_size": 16}},
              "steps": 20, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "eval_every": 0},
}


@pytest.fixture
def plan_file(tmp_path):
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY, sort_keys=False))
    return str(p)


def test_parse_axis():
    assert parse_axis("block=8x8,16").values == ([8, 8], [16, 16])
    assert parse_axis("targets.defaults.block=[8, 8],[4, 16]").values == ([8, 8], [4, 16])
    assert parse_axis("sparsity=0.9,0.95").values == (0.9, 0.95)
    assert parse_axis("method.score=attention,magnitude").path == "method.score"
    assert parse_axis("c=2").path == "method.c"
    # YAML 1.2 floats without a dot, read as numbers as in a plan file (YAML 1.1 made them strings)
    assert parse_axis("train.optimizer.lr=5e-3,1E-2,3.0e-4").values == (0.005, 0.01, 3.0e-4)
    for bad in ("c", "=1", "c=", "c=1,,2"):
        with pytest.raises(PlanError):
            parse_axis(bad)


def test_sweep_overrides_plan_fields(plan_file):
    plan = build_plan(plan_file, {"sparsity": 0.9, "block": [16, 16], "c": 8, "seed": 3})
    assert plan.targets.defaults.sparsity == 0.9 and plan.targets.defaults.block == (16, 16)
    assert all(r.sparsity is None for r in plan.targets.rules)     # the alias reaches every layer
    assert plan.method.c == 8 and plan.train.seed == 3
    dotted = build_plan(plan_file, {"targets.defaults.sparsity": 0.9})
    assert dotted.targets.rules[1].sparsity == 0.75                # a dotted path sets exactly that field
    acdc = build_plan(plan_file, {"method": "acdc"})
    assert acdc.method.name == "acdc" and acdc.schedule.preset == "paper"   # `simple` is SA++'s only


def test_schedule_variants(plan_file):
    base = build_plan(plan_file, {})
    nos = build_plan(plan_file, {"schedule": "no-sparsify"})
    assert "sparsify" in [p.kind for p in base.schedule.phases]
    assert "sparsify" not in [p.kind for p in nos.schedule.phases]
    assert sum(p.steps for p in nos.schedule.phases) == sum(p.steps for p in base.schedule.phases) == 20
    dense = build_plan(plan_file, {"method": "dense"})
    assert [p.kind for p in dense.schedule.phases] == ["dense"]


def test_bad_sweep_value_is_a_positioned_plan_error(plan_file):
    with pytest.raises(PlanError) as err:
        expand([plan_file], [parse_axis("c=2,-1")], seeds=None, out="unused")
    (problem,) = err.value.problems
    text = open(plan_file).read().splitlines()
    assert problem.path == "method.c" and problem.line > 0
    assert text[problem.line - 1].strip().startswith("c:")           # the line of the key it replaces
    assert "sweep c=-1" in problem.message


def test_two_runs_never_share_a_folder_even_when_their_labels_differ(plan_file):
    # before: labels 'output=a b' and 'output=a_b' differ, their folder names do not: the
    # second run reused (or replaced) the first's folder
    with pytest.raises(PlanError, match="two runs would share the folder .*output=a_b"):
        expand([plan_file], [parse_axis("output=a b,a_b")], seeds=None, out="unused")
    assert len(expand([plan_file], [parse_axis("output=a,b")], seeds=None, out="unused")) == 2


def test_cli_bad_sweep_exits_2_before_running(plan_file, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", plan_file, "--sweep", "method=acdc,nope", "--out", str(out)]) == 2
    assert "sweep method=nope" in capsys.readouterr().err
    assert not (out / "runs").exists()
    assert main(["compare", plan_file, "--sweep", "bogus", "--out", str(out)]) == 2


def test_compare_runs_writes_tables_matching_reports(plan_file, tmp_path):
    out = tmp_path / "cmp"
    logs = []
    result = compare([plan_file], ["method=sequential_attention_pp,acdc"], seeds=2, out=str(out),
                     log=logs.append)
    assert (out / "compare.md").is_file() and (out / "compare.json").is_file()
    assert (out / "compare_metric.png").stat().st_size > 1000
    saved = json.loads((out / "compare.json").read_text())
    assert len(saved["runs"]) == 4 and len(saved["groups"]) == 2
    md = (out / "compare.md").read_text()
    rows = [l for l in md.splitlines() if l.startswith("| sequential_attention_pp") or l.startswith("| acdc")]
    assert [r.split("|")[1].strip() for r in rows] == ["sequential_attention_pp", "acdc"]
    for g in saved["groups"]:
        reports = [json.load(open(os.path.join(d, "report.json"))) for d in g["run_dirs"]]
        accs = [r["metrics"]["final"]["accuracy"] for r in reports]
        assert g["metric"]["mean"] == pytest.approx(statistics.fmean(accs))
        assert g["metric"]["std"] == pytest.approx(statistics.stdev(accs))
        assert g["seeds"] == [0, 1]
        assert g["mean_sparsity"]["mean"] == pytest.approx(0.75)
        assert {r["method"]["name"] for r in reports} == {g["values"]["method"]}
        for d in g["run_dirs"]:
            assert os.path.isfile(os.path.join(d, "report.md"))
        row = next(r for r in rows if r.split("|")[1].strip() == g["values"]["method"])
        assert f"{g['metric']['mean']:.2f} ± {g['metric']['std']:.2f}" in row
    sapp = next(g for g in saved["groups"] if g["values"]["method"] == "sequential_attention_pp")
    assert sapp["attention_std"] is not None
    # the seed really changes the run
    runs = [r for r in saved["runs"] if r["values"]["method"] == "acdc"]
    assert runs[0]["seed"] != runs[1]["seed"]

    # a second call reuses the finished folders
    before = {d: os.path.getmtime(os.path.join(d, "tensors.safetensors")) for g in saved["groups"] for d in g["run_dirs"]}
    again = compare([plan_file], ["method=sequential_attention_pp,acdc"], seeds=2, out=str(out), log=logs.append)
    assert all(r["reused"] for r in again["runs"])
    assert before == {d: os.path.getmtime(os.path.join(d, "tensors.safetensors")) for d in before}
    assert [g["metric"] for g in again["groups"]] == [g["metric"] for g in saved["groups"]]
    # ... but not when the plan changed
    longer = compare([plan_file], ["method=acdc"], seeds=1, out=str(out), steps=24, log=logs.append)
    assert not longer["runs"][0]["reused"] and longer["runs"][0]["steps"] == 24

    # --no-run: a table from the finished runs only (acdc seed 0 now holds another plan)
    logs.clear()
    partial = compare([plan_file], ["method=sequential_attention_pp,acdc"], seeds=3, out=str(out), no_run=True,
                      log=logs.append)
    assert sorted((r["values"]["method"], r["seed"]) for r in partial["runs"]) == [
        ("acdc", 1), ("sequential_attention_pp", 0), ("sequential_attention_pp", 1)]
    assert len([l for l in logs if l.startswith("missing (not run)")]) == 3
    assert not any("seed=2" in d for d in os.listdir(out / "runs"))


def test_an_interrupted_run_is_resumed_from_its_checkpoint_not_restarted(plan_file, tmp_path):
    # before: compare trained every unfinished run again from step 0 (overwrite), throwing
    # its checkpoints away: an hour-long run stopped at 55 minutes cost the whole hour again
    doc = dict(TINY, train=dict(TINY["train"], checkpoint_every=5))
    path = tmp_path / "ckpt.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    (job,) = expand([str(path)], [], seeds=None, out=str(tmp_path / "cmp"))
    stopped = train(load_plan(job.plan_yaml), job.run_dir, stop_after=10, progress=False, log=lambda s: None)
    assert not stopped.finished
    logs = []
    (row,) = compare([str(path)], [], out=str(tmp_path / "cmp"), log=logs.append)["runs"]
    assert row["resumed_at"] == 10 and any("resumed at step 10" in line for line in logs), logs
    (whole,) = compare([str(path)], [], out=str(tmp_path / "uninterrupted"), log=lambda s: None)["runs"]
    assert whole["resumed_at"] is None
    assert (row["metric"], row["loss"]) == (whole["metric"], whole["loss"])      # bitwise the same run
    # a checkpoint of another plan in the folder is not resumed: that run starts afresh
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(dict(doc, method=dict(TINY["method"], c=2)), sort_keys=False))
    (job2,) = expand([str(other)], [], seeds=None, out=str(tmp_path / "cmp2"))
    train(load_plan(job.plan_yaml), job2.run_dir, stop_after=10, progress=False, log=lambda s: None)
    (row2,) = compare([str(other)], [], out=str(tmp_path / "cmp2"), log=lambda s: None)["runs"]
    assert row2["resumed_at"] is None and row2["steps"] == 20


def test_eval_hook_adds_columns(plan_file, tmp_path):
    out = tmp_path / "cmp"
    result = compare([plan_file], [], out=str(out), eval_spec="test_compare:_count_zero_weights",
                     bench=True, log=lambda s: None)
    (g,) = result["groups"]
    assert g["eval"]["zero_fraction"]["mean"] > 0.3
    extra = json.loads((Path(g["run_dirs"][0]) / "compare_extra.json").read_text())
    assert extra["bench"]["baked_ms"] > 0 and extra["bench"]["lowered_ms"] > 0
    md = (out / "compare.md").read_text()
    assert "zero_fraction" in md
    if extra["bench"]["lowered_layers"]:     # the cost model may keep a 32-wide layer dense
        assert g["speedup"]["mean"] == pytest.approx(extra["bench"]["speedup"])
        assert f"{g['speedup']['mean']:.2f} |" in md
    else:
        assert g["speedup"] is None


def _broken_eval(model, plan):
    raise KeyError("embedding")


def _eval_returning_text(model, plan):
    return "cosine 0.9"


@pytest.mark.parametrize("bad", ["test_compare:_broken_eval", "test_compare:_eval_returning_text"])
def test_a_failing_eval_is_one_line_naming_it_and_the_kept_run(plan_file, tmp_path, capsys, bad):
    # before: "planc: internal error: KeyError: 'embedding'" after the training, naming neither
    out = tmp_path / "cmp"
    status = main(["compare", plan_file, "--out", str(out), "--eval", bad])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and "internal error" not in err[-1], err
    assert err[-1].startswith(f"planc: --eval {bad}") and "cmp-tiny" in err[-1] and "kept" in err[-1], err
    (run_dir,) = (out / "runs").iterdir()
    assert (run_dir / "report.json").is_file()          # the training is not lost ...
    result = compare([plan_file], [], out=str(out), eval_spec="test_compare:_count_zero_weights", log=lambda s: None)
    assert result["runs"][0]["reused"] and result["groups"][0]["eval"]["zero_fraction"]["mean"] > 0.3   # ... but reused


def test_table_shows_the_speedup_the_run_folder_serves(tmp_path):
    files = []
    for name, lower in (("cmp-lowered", {"backend": "cpu", "min_speedup": 0.001}), ("cmp-dense", {"backend": "dense"})):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(dict(TINY, name=name, lower=lower), sort_keys=False))
        files.append(str(path))
    result = compare(files, [], out=str(tmp_path / "cmp"), log=lambda s: None)
    groups = {g["plan"]: g for g in result["groups"]}
    lowering = json.loads((Path(groups["cmp-lowered"]["run_dirs"][0]) / "report.json").read_text())["lowering"]
    assert lowering["lowered_layers"] > 0                  # min_speedup 0.001: lowered whatever it times
    assert groups["cmp-lowered"]["served_speedup"]["mean"] == pytest.approx(lowering["speedup"])
    assert groups["cmp-dense"]["served_speedup"] is None   # lowering off: nothing timed, nothing shown
    md = (tmp_path / "cmp" / "compare.md").read_text()
    head = next(l for l in md.splitlines() if l.startswith("| plan"))
    assert head.rstrip(" |").endswith("served speedup")
    rows = {l.split("|")[1].strip(): l for l in md.splitlines() if l.startswith("| cmp-")}
    assert rows["cmp-lowered"].endswith(f"| {lowering['speedup']:.2f} |")
    assert rows["cmp-dense"].endswith("| – |")
    # a run whose whole lowered model timed too slow serves its baked model: 1.0
    job = {"label": "x", "plan_name": "x", "plan_file": "x.yaml", "values": {}, "seed": 0, "run_dir": "x"}
    kept = summarize(job, {"lowering": {"lowered_layers": 0, "speedup": 0.8, "kept_dense": "slower"}})
    assert kept["served_speedup"] == 1.0
    assert summarize(job, {})["served_speedup"] is None


def test_seeds_that_end_alike_are_flagged_not_tabulated_as_no_spread():
    def row(seed, loss, values=None):
        job = {"label": f"p/seed={seed}", "plan_name": "p", "plan_file": "p.yaml", "values": dict(values or {}),
               "seed": seed, "run_dir": f"runs/{seed}"}
        return summarize(job, {"metrics": {"final": {"loss": loss}}})
    alike = [row(s, 0.25, {"sparsity": 0.7}) for s in (0, 1, 2)]        # a pretrained model without dropout
    spread = [row(s, 0.25 + s / 100, {"sparsity": 0.9}) for s in (0, 1, 2)]
    single = [row(0, 0.3, {"sparsity": 0.5})]
    groups = group(alike + spread + single)
    assert [g["seeds_alike"] for g in groups] == [True, False, False]
    warnings = [l for l in to_markdown(groups).splitlines() if l.startswith("Warning:")]
    assert len(warnings) == 1 and "p/sparsity=0.7: its 3 seeds ended bitwise alike" in warnings[0]
    assert "train.data.kwargs.seed" in warnings[0]


def _count_zero_weights(model, plan):
    w = model.layers[0].weight
    return {"zero_fraction": float((w == 0).float().mean())}
