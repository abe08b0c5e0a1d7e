"""planc.report: report.md and its plots, from a real (tiny) run folder."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

import planc
from planc.report import attention_edges, read_events, sparsity_series, write_report

TINY = {
    "version": 1, "name": "report-tiny",
    "model": {"factory": "planc.examples.digits:mlp", "kwargs": {"hidden": 32}, "example_inputs": [[16, 64]]},
    "targets": {"defaults": {"block": [8, 8], "sparsity": 0.75, "min_blocks": 16},
                "rules": [{"match": {"position": "last"}, "skip": True}]},
    "method": {"name": "sequential_attention_pp", "c": 4},
    "schedule": {"phases": [{"phase": "dense", "steps": 4}, {"phase": "sparsify", "steps": 4},
                            {"phase": "sparse", "steps": 2}, {"phase": "dense", "steps": 2},
                            {"phase": "sparsify", "steps": 3}, {"phase": "finetune", "steps": 3}]},
    "train": {"data": {"factory": "planc.examples.digits:loaders", "kwargs": {"batch_size": 16}},
              "steps": 18, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9}, "eval_every": 6},
}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from planc.train import train

    out = str(tmp_path_factory.mktemp("run") / "tiny")
    train(planc.load_plan(TINY), out, progress=False, log=lambda s: None)
    return out


def test_report_md_and_plots_are_written(run_dir):
    path = write_report(run_dir)
    assert path == Path(run_dir) / "report.md" and path.is_file()
    text = path.read_text()
    for png in ("sparsity", "curves", "steptime", "density", "blocks", "attention"):
        assert os.path.getsize(os.path.join(run_dir, f"{png}.png")) > 1000, png
        assert f"]({png}.png)" in text
    with open(os.path.join(run_dir, "sparsity.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"


def test_each_phase_reports_its_mean_step_time(run_dir):
    report = json.load(open(os.path.join(run_dir, "report.json")))
    times = report["timings"]["phase_step_ms"]
    assert len(times) == len(report["phases"]) == 6 and all(ms > 0 for ms in times)
    # the phase means, weighted by their steps, add up to the training time
    total = sum(ms * p["steps"] for ms, p in zip(times, report["phases"])) / 1e3
    assert total == pytest.approx(report["timings"]["train_s"], rel=0.01)
    text = write_report(run_dir).read_text()
    assert "## Step time by phase" in text and "| 5 | finetune |" in text


def test_layer_table_matches_report_json(run_dir):
    report = json.load(open(os.path.join(run_dir, "report.json")))
    text = write_report(run_dir, plots=False).read_text()
    rows = [l for l in text.splitlines() if l.startswith("| layers.")]
    assert len(rows) == len(report["layers"]) == 2
    for row, layer in zip(rows, report["layers"]):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == layer["layer"]
        assert int(cells[3]) == layer["alive_blocks"]
        assert float(cells[5]) == pytest.approx(layer["achieved_sparsity"], abs=1e-4)
        assert float(cells[7]) == pytest.approx(layer["attention_std"], abs=1e-3)
    acc = report["metrics"]["final"]["accuracy"]
    assert re.search(rf"accuracy {acc:.4g}\b", text)


def test_sparsity_series_ends_at_the_achieved_sparsity(run_dir):
    report = json.load(open(os.path.join(run_dir, "report.json")))
    steps, series = sparsity_series(read_events(Path(run_dir) / "events.jsonl"))
    assert steps == sorted(steps) and steps[0] == 0
    for layer in report["layers"]:
        assert series[layer["layer"]][-1] == pytest.approx(layer["achieved_sparsity"], abs=1e-6)
        assert max(series[layer["layer"]]) <= layer["target_sparsity"] + 1e-6


def test_one_attention_row_per_sparsify_edge(run_dir):
    events = read_events(Path(run_dir) / "events.jsonl")
    edges = attention_edges(events)
    assert [e["step"] for e in edges] == [4, 12]           # the two sparsify phases start there
    text = write_report(run_dir, plots=False).read_text()
    table = text.split("## Attention at the sparsify edges")[1]
    assert [int(l.split("|")[1]) for l in table.splitlines() if re.match(r"\| \d+ \|", l)] == [4, 12]
    blocks = {l["layer"]: l["blocks"] for l in json.load(open(Path(run_dir) / "report.json"))["layers"]}
    for e in edges:
        assert set(e["attention"]) == set(blocks)
        for name, s in e["attention"].items():
            assert sum(s["hist"]) == blocks[name]         # a dense phase precedes: every block is alive
            assert s["min"] <= 1.0 <= s["max"]            # mean(A) = 1


def test_report_without_events_or_masks(tmp_path, run_dir):
    """Only report.json: still a report, with the plots that need nothing else."""
    import shutil

    shutil.copy(os.path.join(run_dir, "report.json"), tmp_path / "report.json")
    text = write_report(tmp_path).read_text()
    assert "](curves.png)" in text and "](density.png)" in text
    assert "](sparsity.png)" not in text and "](blocks.png)" not in text


def test_apply_writes_report_md(tmp_path):
    from planc.cli import main
    import yaml

    plan = tmp_path / "p.yaml"
    plan.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "run"
    assert main(["apply", str(plan), "--out", str(out), "--progress", "off"]) == 0
    assert (out / "report.md").is_file() and (out / "sparsity.png").is_file()


def test_apply_survives_a_plotting_failure(tmp_path, monkeypatch, capsys):
    import yaml

    import planc.report
    from planc.cli import main

    def broken(*a, **k):
        raise RuntimeError("no display")

    monkeypatch.setattr(planc.report, "write_report", broken)
    plan = tmp_path / "p.yaml"
    plan.write_text(yaml.safe_dump(dict(TINY, train=dict(TINY["train"], steps=18, eval_every=0))))
    out = tmp_path / "run"
    assert main(["apply", str(plan), "--out", str(out), "--progress", "off"]) == 0
    err = capsys.readouterr().err
    assert "report.md not written" in err and "no display" in err
    assert (out / "report.json").is_file() and not (out / "report.md").exists()
