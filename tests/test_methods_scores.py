"""Each method's block score and where it prunes: SA++ by attention (or the norm of the
effective W·A), ACDC and magnitude by block norm at the compressed phase start,
PowerProp by the norm of the effective (reparameterised) block."""
import pytest
import torch
import torch.nn.functional as F

from planc.blocks import sparsify_grid_count
from planc.plan.registry import METHODS
from planc.runtime.methods import make_method
from planc.errors import RuntimeStateError
from planc.plan.types import Method

from _runtime_fakes import phases, tiny


def _lowest(scores, k):
    out = torch.zeros(scores.numel(), dtype=torch.bool)
    out[torch.argsort(scores.flatten().double(), stable=True)[:k]] = True
    return out.view_as(scores)


def _train_to_edge(method, edge_kind, sparsity=0.5, opt_name="sgd", **kw):
    """Train densely for 6 steps, stop right before the edge; return the scores the
    method should use there, then cross the edge."""
    p = tiny(method, phases(("dense", 6), (edge_kind, 4)), sparsity=sparsity, **kw)
    groups = p.param_groups(lr=0.05)
    opt = torch.optim.SGD(groups, momentum=0.9) if opt_name == "sgd" else torch.optim.Adam(groups)
    p.attach(opt)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)
    for _ in range(6):
        F.cross_entropy(p.module(x), y).backward()
        opt.step()
        opt.zero_grad()
        if p.runtime.t == 5:
            snap = {n: (p.weight(n).detach().clone(), m.effective_weight(p.weight(n)).detach().clone(),
                        None if m.logits is None else m.logits.detach().clone())
                    for n, m in p.masks.items()}
        p.step()
    return p, snap


@pytest.mark.parametrize("method", ["acdc", "magnitude"])
def test_block_norm_top_k_at_the_compressed_phase_start(method):
    p, snap = _train_to_edge(method, "sparse")
    for name, mask in p.masks.items():
        raw = snap[name][0]
        k = sparsify_grid_count(mask.num_blocks, 0.5)
        assert torch.equal(~mask.alive, _lowest(mask.view.block_norms(raw), k))


def test_sequential_attention_pp_prunes_the_lowest_attention():
    p, snap = _train_to_edge("sequential_attention_pp", "sparse", logits_lr=1.0)
    for name, mask in p.masks.items():
        logits = snap[name][2]
        assert float(logits.std()) > 0           # the logits did train
        k = sparsify_grid_count(mask.num_blocks, 0.5)
        attention = mask.num_blocks * torch.softmax(logits.flatten(), 0).view_as(logits)
        assert torch.equal(~mask.alive, _lowest(attention, k))


def test_sequential_attention_pp_magnitude_score_uses_the_effective_weight():
    p, snap = _train_to_edge("sequential_attention_pp", "sparse", score="magnitude", logits_lr=1.0)
    for name, mask in p.masks.items():
        eff = snap[name][1]
        k = sparsify_grid_count(mask.num_blocks, 0.5)
        assert torch.equal(~mask.alive, _lowest(mask.view.block_norms(eff), k))


@pytest.mark.parametrize("granularity", ["block", "element"])
def test_powerprop_prunes_by_the_effective_weight(granularity):
    p, snap = _train_to_edge("powerprop", "finetune", opt_name="adam", granularity=granularity, alpha=3.0)
    for name, mask in p.masks.items():
        raw, eff = snap[name][0], snap[name][1]
        if granularity == "block":
            # the block variant honours alpha: V_b·‖V_b‖^(α−1) (it used to ignore it)
            assert torch.allclose(eff, raw * mask.view.expand(mask.view.block_norms(raw) ** 2.0))
        else:
            assert torch.allclose(eff, raw * raw.abs().pow(2.0))
        k = sparsify_grid_count(mask.num_blocks, 0.5)
        assert torch.equal(~mask.alive, _lowest(mask.view.block_norms(eff), k))


def test_make_method_names_the_four_methods_and_block_obs():
    assert sorted(METHODS) == ["acdc", "magnitude", "obs", "powerprop", "sequential_attention_pp"]
    assert all(make_method(Method(name=name)).name == name for name in METHODS)   # each has its strategy
    assert make_method(Method(name="magnitude")).default_curve == "cubic"
    assert [n for n in METHODS if make_method(Method(name=n)).calibrated] == ["obs"]
    with pytest.raises(RuntimeStateError, match="expected method"):
        make_method(Method(name="obd"))
