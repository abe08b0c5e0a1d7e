"""Sparse phases on the block-sparse kernels (planc.passes.kernel_form,
planc.runtime.sparse_phases): the kernel form computes what the dense masked product
computes — outputs and every gradient (input, weight, bias, logits) — for each mask mode;
the graph goes back to its dense form exactly; a whole schedule with the switch on gives
the losses, masks and weights of the switch off; resume stays bitwise; auto's decisions
are part of the runtime state."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import planc
from planc.mask import BlockMask
from planc.passes import kernel_form as kf
from planc.runtime.sparse_phases import MIN_ELEMENTS


def _close(got: torch.Tensor, want: torch.Tensor, rel: float = 1e-5) -> None:
    """Relative to the reference's size: the kernels sum in another order."""
    err = float((got - want).detach().norm() / want.detach().norm().clamp_min(1e-30))
    assert err < rel, f"relative error {err:.2e}"


def _mask(mode: str, shape=(96, 128), block=(16, 32), **kw) -> BlockMask:
    torch.manual_seed(0)
    m = BlockMask(shape, block, mode, **kw)
    with torch.no_grad():
        m.alive.copy_(torch.rand(m.view.grid) < 0.4)
        m.alive[0, 0] = True
        if m.logits is not None:
            m.logits.normal_(0, 0.5)
    return m


MASKS = {
    "attention": lambda: _mask("attention"),
    "attention-clipped": lambda: _mask("attention", clip=(0.5, 1.5)),
    "support": lambda: _mask("support"),
    "powerprop-block": lambda: _mask("powerprop", alpha=2.0),
    "powerprop-element": lambda: _mask("powerprop", alpha=1.5, granularity="element"),
}


@pytest.mark.parametrize("kind", sorted(MASKS))
@pytest.mark.parametrize("x_shape", [(40, 128), (3, 7, 128)])
def test_kernel_path_equals_the_dense_masked_product_with_every_gradient(kind, x_shape):
    mask = MASKS[kind]()
    g = torch.Generator().manual_seed(1)
    w0, b0 = torch.randn(96, 128, generator=g), torch.randn(96, generator=g)
    x0, dy = torch.randn(*x_shape, generator=g), torch.randn(*x_shape[:-1], 96, generator=g)

    def run(decision):
        x, w, b = (t.clone().requires_grad_(True) for t in (x0, w0, b0))
        if mask.logits is not None:
            mask.logits.grad = None
        object.__setattr__(mask, kf.DECISION, decision)
        y = kf.masked_linear(x, w, b, mask)
        y.backward(dy)
        grads = [x.grad, w.grad, b.grad] + ([mask.logits.grad.clone()] if mask.logits is not None else [])
        return y.detach(), grads

    y_dense, g_dense = run(kf.DENSE)
    y_kern, g_kern = run(kf.KERNELS)
    _close(y_kern, y_dense)
    for got, want in zip(g_kern, g_dense):
        _close(got, want)
    pruned = mask.view.expand(~mask.alive)
    assert bool((g_kern[1][pruned] == 0).all())            # no gradient reaches a pruned block


def test_kept_values_are_the_effective_weights_blocks():
    mask = MASKS["attention-clipped"]()
    w = torch.randn(96, 128)
    rows, cols = mask.alive.nonzero(as_tuple=True)
    want = mask.view.to_blocks(mask(w))[rows, cols]
    torch.testing.assert_close(mask.kept_values(w, rows, cols), want)
    with pytest.raises(ValueError, match="tile exactly"):
        BlockMask((90, 128), (16, 32)).kept_values(torch.randn(90, 128), rows, cols)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(256, 10)

    def forward(self, x):
        return self.head(torch.relu(self.b(torch.relu(self.a(x)))))


def plan_for(setting, method: str = "sequential_attention_pp") -> str:
    return f"""
version: 1
model: {{example_inputs: [[4, 256]]}}
targets: {{defaults: {{block: [32, 32], sparsity: 0.75, min_blocks: 4}}}}
method: {{name: {method}}}
schedule:
  sparse_kernels: {setting}
  phases:
    - {{phase: dense, steps: 2}}
    - {{phase: sparsify, steps: 4, every: 2}}
    - {{phase: sparse, steps: 3}}
    - {{phase: dense, steps: 2}}
    - {{phase: finetune, steps: 4}}
"""


STEPS = 15


def _batch(t):
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(48, 256, generator=g), torch.randint(0, 10, (48,), generator=g)


def _make(setting, method="sequential_attention_pp", frontend=None):
    torch.manual_seed(0)
    p = planc.compile(Net(), plan_for(setting, method), frontend=frontend)
    opt = torch.optim.SGD(p.param_groups(lr=0.05, momentum=0.9))
    p.attach(opt)
    return p, opt


def _train(p, opt, start, stop, log=None):
    for t in range(start, stop):
        x, y = _batch(t)
        loss = F.cross_entropy(p.module(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        p.step()
        if log is not None:
            log.append((p.runtime.phase.kind, float(loss.detach()), dict(p.runtime.kernels.decisions())))


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)        # the CPU kernels' threads sum in a varying order
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("method", ["sequential_attention_pp", "acdc", "powerprop"])
def test_a_schedule_on_the_kernels_trains_like_the_dense_computation(method, one_thread):
    on, on_opt = _make("true", method)
    off, off_opt = _make("false", method)
    log_on, log_off = [], []
    _train(on, on_opt, 0, STEPS, log_on)
    _train(off, off_opt, 0, STEPS, log_off)
    used = [d for kind, _, d in log_on if kind in ("sparse", "finetune", "sparsify")]
    on_kernels = {"a": "kernels", "b": "kernels"}                        # head: 10 rows, not tiled
    assert len(used) == 12 and all(d == on_kernels for d in used)   # t = 2-5 sparsify, 6-8 sparse, 11-15 finetune
    assert all(d == {} for kind, _, d in log_on if kind == "dense")
    assert all(d == {} for _, _, d in log_off)
    for (k1, l1, _), (k2, l2, _) in zip(log_on, log_off):
        assert k1 == k2 and l1 == pytest.approx(l2, rel=1e-4)
    for name in on.masks:
        assert torch.equal(on.masks[name].alive, off.masks[name].alive)
    a, b = on.module.state_dict(), off.module.state_dict()
    for key in b:
        _close(a[key].float(), b[key].float(), rel=1e-4)


@pytest.mark.parametrize("frontend", ["export", "symbolic"])
def test_the_graph_returns_to_its_dense_form_and_bakes(frontend, one_thread):
    p, opt = _make("true", frontend=frontend)
    dense_code = p.module.code
    _train(p, opt, 0, 8)                      # inside the sparse phase
    assert p.runtime.phase.kind == "sparse" and "masked_linear" in p.module.code
    x = _batch(0)[0]
    baked = p.bake()                          # bake restores the dense form on its copy
    assert "masked_linear" not in baked.code
    _close(baked(x), p.module(x))
    _train(p, opt, 8, 10)                     # a dense phase: the original graph again
    assert p.runtime.phase.kind == "dense" and p.module.code == dense_code
    from planc.passes import masks_of
    assert list(masks_of(p.module)) == list(p.masks)          # the passes find every mask again


@pytest.mark.parametrize("stop", [7, 13])
def test_resume_with_the_kernels_is_bitwise(stop, one_thread):
    ref, ref_opt = _make("true")
    _train(ref, ref_opt, 0, STEPS)
    a, a_opt = _make("true")
    _train(a, a_opt, 0, stop)
    state = {"model": {k: v.clone() for k, v in a.module.state_dict().items()},
             "optim": a_opt.state_dict(), "runtime": a.state_dict()}
    b, b_opt = _make("true")
    b.module.load_state_dict(state["model"])
    b.load_state_dict(state["runtime"])
    b_opt.load_state_dict(state["optim"])
    assert ("masked_linear" in b.module.code) == (b.runtime.phase.kind in ("sparse", "finetune"))
    _train(b, b_opt, stop, STEPS)
    ra, rb = ref.module.state_dict(), b.module.state_dict()
    for k in ra:
        assert torch.equal(ra[k], rb[k]), k


def test_auto_measures_big_layers_once_and_keeps_its_decisions_in_the_state(one_thread):
    assert 256 * 256 >= MIN_ELEMENTS
    p, opt = _make("auto")
    _train(p, opt, 0, 6)
    # the last sparsify update (t = 4) brought the density to 0.25: timed on the next call
    kernels = p.runtime.kernels
    decided = kernels.decisions()
    assert set(decided) == {"a", "b"} and set(decided.values()) <= {"kernels", "dense"}
    assert {n: at for n, (_, at) in kernels.state()["timed"].items()} == {"a": 0.25, "b": 0.25}
    _train(p, opt, 6, 7)                    # the sparse phase, same density: the timing is reused
    assert kernels.decisions() == decided
    state = p.state_dict()
    assert state["kernels"] == {"now": decided, "timed": {n: [d, 0.25] for n, d in decided.items()}}
    q, q_opt = _make("auto")
    q.load_state_dict(state)
    assert q.runtime.kernels.state() == state["kernels"]
    kernels.forget()                        # e.g. another batch size: time again
    assert kernels.decisions() == {"a": "measure", "b": "measure"} and kernels.state()["timed"] == {}
    _train(p, opt, 7, 9)
    assert kernels.decisions() == {} and set(kernels.state()["timed"]) == {"a", "b"}    # dense: off


def test_small_layers_stay_dense_under_auto(one_thread):
    class Small(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.head = nn.Linear(256, 64), nn.Linear(64, 10)

        def forward(self, x):
            return self.head(torch.relu(self.a(x)))

    assert 256 * 64 < MIN_ELEMENTS
    p = planc.compile(Small(), plan_for("auto").replace("min_blocks: 4", "min_blocks: 2"))
    opt = torch.optim.SGD(p.param_groups(lr=0.05))
    p.attach(opt)
    _train(p, opt, 0, 7)
    assert p.runtime.kernels.decisions() == {"a": "dense"} and p.runtime.kernels.state()["timed"] == {}


def test_the_setting_is_checked_where_it_is_written(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(plan_for("sometimes"))
    with pytest.raises(planc.PlanError) as err:
        planc.load_plan(str(path))
    assert "sparse_kernels" in str(err.value) and f"{path}:7" in str(err.value)
