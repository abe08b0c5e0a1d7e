"""planc.timing_cache: a layer is timed once per machine and key, then the ratio is reused;
the cache is planc's own file and never breaks a run."""
import json

import pytest
import torch
from torch import fx

import planc
from planc import timing_cache
from planc.passes.lower import report

from test_lower import mlp, prune


def _lower(monkeypatch, ratio=3.0):
    from planc.passes import lower as lower_module

    calls = []
    monkeypatch.setattr(lower_module, "_measure_linear",
                        lambda module, weight, bias, tokens: calls.append(tuple(weight.shape)) or ratio)
    baked = fx.symbolic_trace(prune(mlp(hidden=128), (16, 16), 0.75))
    gm = planc.lower(baked, backend="cpu", min_speedup=1.0, blocks=(16, 16), tokens=256, measure=True)
    return calls, [r for r in report(gm) if "measured_speedup" in r]


def test_a_layer_is_timed_once_per_machine_and_key(monkeypatch, tmp_path):
    first, rows = _lower(monkeypatch)
    assert first and all("cached" not in r["reason"] for r in rows)
    again, rows = _lower(monkeypatch, ratio=0.1)        # a second run: nothing timed, the same decisions
    assert again == []
    assert all(r["measured_speedup"] == 3.0 and r["action"] == "lowered" and "cached" in r["reason"] for r in rows)
    monkeypatch.setattr(timing_cache, "machine_key", lambda: {"cpu": "another CPU", "torch": "x", "threads": 1})
    other, _ = _lower(monkeypatch)                       # another machine times for itself
    assert other == first


def test_the_cache_can_be_turned_off(monkeypatch):
    monkeypatch.setenv(timing_cache.ENV, "off")
    first, _ = _lower(monkeypatch)
    again, _ = _lower(monkeypatch)
    assert first and again == first


@pytest.mark.parametrize("content", [b"{not json", b'{"format": "other", "entries": {}}', b"\xff\xfe"])
def test_a_damaged_cache_is_set_aside_and_started_again(monkeypatch, tmp_path, content):
    path = tmp_path / "layer-timings.json"
    path.write_bytes(content)
    first, _ = _lower(monkeypatch)
    assert first
    assert (tmp_path / "layer-timings.json.bad").read_bytes() == content
    assert json.loads(path.read_text())["format"] == timing_cache.FORMAT


def test_a_link_at_the_cache_path_is_left_alone(monkeypatch, tmp_path):
    target = tmp_path / "elsewhere.json"
    target.write_text("user data")
    (tmp_path / "layer-timings.json").symlink_to(target)
    first, _ = _lower(monkeypatch)
    again, _ = _lower(monkeypatch)
    assert first and again == first                      # no cache used
    assert target.read_text() == "user data" and (tmp_path / "layer-timings.json").is_symlink()


def test_the_key_holds_the_layer_and_the_machine(monkeypatch):
    seen = []
    for density in (0.25, 0.5, 0.25):
        timing_cache.ratio({"op": "linear", "shape": (64, 64), "density": density, "dtype": torch.float32},
                           lambda: seen.append(density) or 2.0)
    assert seen == [0.25, 0.5]


def test_a_change_to_the_kernels_times_afresh(monkeypatch):
    seen = []
    layer = {"op": "linear", "shape": (64, 64), "density": 0.25}
    timing_cache.ratio(layer, lambda: seen.append(1) or 2.0)
    timing_cache.ratio(layer, lambda: seen.append(2) or 2.0)
    monkeypatch.setattr(timing_cache, "_kernels_digest", lambda: "another kernel source")
    timing_cache.ratio(layer, lambda: seen.append(3) or 2.0)
    assert seen == [1, 3]
