"""state_dict / load_state_dict: plain data, no mutation of the input, no dependence on an
earlier call, and a resumed loop is bitwise equal to an uninterrupted one."""
import copy

import pytest
import torch
import torch.nn.functional as F

from planc.checkpoint import load_state, save_state
from planc.errors import RuntimeStateError

from _runtime_fakes import phases, tiny

SCHEDULE = phases(("dense", 5), ("sparsify", 6, {"every": 2}), ("sparse", 3), ("dense", 3),
                  ("sparsify", 3), ("finetune", 4))
TOTAL = SCHEDULE[-1].end


def _make(method, seed=0):
    p = tiny(method, SCHEDULE, seed=seed, sparsity=0.8)
    opt = torch.optim.Adam(p.param_groups(lr=0.01, weight_decay=1e-4)) if method == "powerprop" else \
        torch.optim.SGD(p.param_groups(lr=0.05, momentum=0.9, weight_decay=1e-4))
    p.attach(opt)
    return p, opt


def _batch(t):
    g = torch.Generator().manual_seed(1000 + t)
    return torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g)


def _run(p, opt, start, stop):
    for t in range(start, stop):
        x, y = _batch(t)
        # dropout-like use of the global RNG, so the RNG state matters too
        noise = torch.rand(1).item() * 1e-3
        (F.cross_entropy(p.module(x), y) + noise).backward()
        opt.step()
        opt.zero_grad()
        p.step()


def _params(p):
    return {k: v.detach().clone() for k, v in p.module.state_dict().items()}


@pytest.mark.parametrize("method", ["sequential_attention_pp", "acdc", "magnitude", "powerprop"])
@pytest.mark.parametrize("stop", [8, 14])
def test_resume_is_bitwise_equal(method, stop, tmp_path):
    torch.manual_seed(123)
    ref, ref_opt = _make(method)
    torch.manual_seed(7)
    _run(ref, ref_opt, 0, TOTAL)

    torch.manual_seed(123)
    a, a_opt = _make(method)
    torch.manual_seed(7)
    _run(a, a_opt, 0, stop)
    path = str(tmp_path / "state.safetensors")
    save_state(path, {"model": a.module.state_dict(), "optim": a_opt.state_dict(),
                      "runtime": a.state_dict(), "rng": torch.get_rng_state()})
    del a, a_opt

    torch.manual_seed(999)                    # a different process: fresh objects, other RNG
    b, b_opt = _make(method, seed=5)
    state = load_state(path)
    b.module.load_state_dict(state["model"])
    b.load_state_dict(state["runtime"])
    b_opt.load_state_dict(state["optim"])
    torch.set_rng_state(state["rng"])
    assert b.runtime.t == stop
    _run(b, b_opt, stop, TOTAL)

    ra, rb = _params(ref), _params(b)
    assert ra.keys() == rb.keys()
    for k in ra:
        assert torch.equal(ra[k], rb[k]), k
    assert ref.events == b.events


def test_state_dict_is_plain_data_and_load_does_not_mutate_it():
    p, opt = _make("sequential_attention_pp")
    _run(p, opt, 0, 9)
    sd = p.state_dict()
    assert set(sd) == {"format", "method", "step", "phase", "started", "layers", "events", "plan", "kernels"}
    # the sparse-phase kernels' decisions: small layers are not worth timing, they stay dense
    assert sd["kernels"] == {"now": {"fc1": "dense", "fc2": "dense"}, "timed": {}}
    for entry in sd["layers"].values():
        assert all(v is None or type(v) is torch.Tensor for v in entry.values())
        assert entry["alive"].dtype == torch.bool
    snapshot = copy.deepcopy(sd)
    # the state is a copy: training on does not change it
    _run(p, opt, 9, 12)
    for n in sd["layers"]:
        assert torch.equal(sd["layers"][n]["alive"], snapshot["layers"][n]["alive"])
        assert torch.equal(sd["layers"][n]["logits"], snapshot["layers"][n]["logits"])
    q, _ = _make("sequential_attention_pp", seed=3)
    q.load_state_dict(sd)
    q.runtime.events.append({"event": "x"})
    with torch.no_grad():
        for m in q.masks.values():
            m.logits.add_(1.0)
    assert sd["events"] == snapshot["events"]
    for n in sd["layers"]:
        assert torch.equal(sd["layers"][n]["logits"], snapshot["layers"][n]["logits"])
    # loading twice, or after other loads, gives the same state
    r, _ = _make("sequential_attention_pp", seed=4)
    r.load_state_dict(p.state_dict())
    r.load_state_dict(sd)
    assert r.runtime.t == 9 and q.runtime.t == 9
    for n in sd["layers"]:
        assert torch.equal(r.masks[n].alive, q.masks[n].alive)
        assert torch.equal(r.masks[n].logits.detach(), sd["layers"][n]["logits"])


def test_load_state_dict_rejects_bad_state_before_changing_anything():
    p, opt = _make("acdc")
    _run(p, opt, 0, 9)
    sd = p.state_dict()
    q, _ = _make("acdc", seed=2)
    bad = copy.deepcopy(sd)
    bad["layers"]["fc2"]["alive"] = torch.ones(3, 3, dtype=torch.bool)
    with pytest.raises(RuntimeStateError, match="fc2"):
        q.load_state_dict(bad)
    assert q.runtime.t == 0 and all(bool(m.alive.all()) for m in q.masks.values())
    with pytest.raises(RuntimeStateError, match="layers"):
        q.load_state_dict(dict(sd, layers={"fc1": sd["layers"]["fc1"]}))
    with pytest.raises(RuntimeStateError, match="method"):
        q.load_state_dict(dict(sd, method="magnitude"))
    for kernels in ({"fc1": "kernels"}, {"now": {"fc1": "fast"}}, {"timed": {"fc1": ["dense", None]}},
                    {"now": {"nothere": "dense"}}, ["fc1"]):
        with pytest.raises(RuntimeStateError, match="kernels"):
            q.load_state_dict(dict(sd, kernels=kernels))
    assert q.runtime.t == 0
    with pytest.raises(RuntimeStateError, match="format"):
        q.load_state_dict({"step": 3})
