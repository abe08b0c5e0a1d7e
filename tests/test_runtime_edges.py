"""Phase edges: the function changes only by the blocks pruned, the optimizer state is
reset, pruned weights stay exactly zero, revived blocks restart at zero, every layer
ends at exactly its target count."""
import copy

import pytest
import torch
import torch.nn.functional as F

from planc.blocks import sparsify_grid_count
from planc.errors import RuntimeStateError
from planc.runtime.methods import select_prune

from _runtime_fakes import phases, tiny

METHODS = ["sequential_attention_pp", "acdc", "magnitude", "powerprop"]
SCHEDULE = phases(("dense", 6), ("sparsify", 6, {"every": 2}), ("sparse", 4), ("dense", 4),
                  ("sparse", 3), ("dense", 3), ("sparsify", 3), ("finetune", 5))


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)


def _train_and_snapshot(p, opt, steps, at, snapshot):
    """Train `steps` steps on one batch, calling `snapshot(p)` just before the runtime
    advances past step `at`; returns what it returned and the batch."""
    x, y = _data(1)
    taken = None
    for _ in range(steps):
        F.cross_entropy(p.module(x), y).backward()
        opt.step()
        opt.zero_grad()
        if p.runtime.t == at:
            taken = snapshot(p)
        p.step()
    return taken, (x, y)


def _dead_raw_weights_are_zero(p):
    for name, mask in p.masks.items():
        w = p.weight(name).detach()
        if not bool((w[mask.view.expand(~mask.alive)] == 0).all()):
            return False
    return True


@pytest.mark.parametrize("method", METHODS)
def test_edges_change_the_function_only_by_the_pruned_blocks(method):
    p = tiny(method, SCHEDULE, sparsity=0.75)
    opt = torch.optim.SGD(p.param_groups(lr=0.05, momentum=0.9, weight_decay=1e-3))
    p.attach(opt)
    x, y = _data()
    edges = {ph.start for ph in SCHEDULE}
    n_checked = n_reset = 0
    for _ in range(SCHEDULE[-1].end):
        F.cross_entropy(p.module(x), y).backward()
        opt.step()
        opt.zero_grad()
        assert len(opt.state) > 0
        before_alive = {n: m.alive.clone() for n, m in p.masks.items()}
        with torch.no_grad():
            y_before = p.module(x)
        reference = copy.deepcopy(p.module)        # the pre-step model, to receive the new masks
        p.step()
        t = p.runtime.t
        with torch.no_grad():
            y_after = p.module(x)
            for name, mask in p.masks.items():
                reference.get_submodule(name).parametrizations.weight[0].alive.copy_(mask.alive)
            y_ref = reference(x)
        # the new masks applied to the old model give exactly the new function
        assert torch.equal(y_after, y_ref), (method, t)
        changed = any(not torch.equal(before_alive[n], m.alive) for n, m in p.masks.items())
        if not any(bool((before_alive[n] & ~m.alive).any()) for n, m in p.masks.items()):
            # nothing pruned (a dense edge revives blocks at zero): the function is unchanged
            assert torch.equal(y_after, y_before), (method, t)
        if t in edges:
            assert len(opt.state) == 0, f"optimizer state not reset at edge {t}"
            n_reset += 1
        n_checked += changed
        assert _dead_raw_weights_are_zero(p)
    assert n_reset == len(edges) - 1 and n_checked >= 6
    for name, mask in p.masks.items():
        assert int((~mask.alive).sum()) == sparsify_grid_count(mask.num_blocks, 0.75)


@pytest.mark.parametrize("method", ["sequential_attention_pp", "acdc"])
def test_dense_edge_revives_every_block_at_zero(method):
    sched = phases(("dense", 5), ("sparse", 5), ("dense", 5))
    p = tiny(method, sched, sparsity=0.5)
    opt = torch.optim.SGD(p.param_groups(lr=0.05, momentum=0.9))
    p.attach(opt)
    (dead, logits), (x, y) = _train_and_snapshot(p, opt, 10, at=9, snapshot=lambda p: (
        {n: ~m.alive.clone() for n, m in p.masks.items()},
        {n: None if m.logits is None else m.logits.detach().clone() for n, m in p.masks.items()}))
    assert p.runtime.phase.kind == "dense"
    for name, mask in p.masks.items():
        assert bool(mask.alive.all())
        assert bool((p.weight(name).detach()[mask.view.expand(dead[name])] == 0).all())
        if mask.logits is not None:     # logits are kept: changing them would rescale the alive blocks
            assert torch.equal(mask.logits.detach(), logits[name])
    revived = [e for e in p.events if e["event"] == "phase" and e["step"] == 10][0]["revived"]
    assert revived == {n: int(d.sum()) for n, d in dead.items()} and all(revived.values())
    # revived blocks train again
    F.cross_entropy(p.module(x), y).backward()
    opt.step()
    assert any(bool((p.weight(n).detach()[p.masks[n].view.expand(d)] != 0).any()) for n, d in dead.items())


def test_pruned_blocks_get_zero_optimizer_state_mid_phase():
    sched = phases(("dense", 3), ("sparsify", 6), ("finetune", 2))
    p = tiny("magnitude", sched, sparsity=0.5)
    opt = torch.optim.Adam(p.param_groups(lr=0.01))
    p.attach(opt)
    x, y = _data(2)
    for _ in range(8):
        F.cross_entropy(p.module(x), y).backward()
        opt.step()
        opt.zero_grad()
        p.step()
        for name, mask in p.masks.items():
            st = opt.state.get(p.weight(name), {})
            for v in st.values():
                if v.shape == p.weight(name).shape:
                    assert bool((v[mask.view.expand(~mask.alive)] == 0).all())
        assert _dead_raw_weights_are_zero(p)


def test_select_prune_breaks_ties_by_block_index_and_never_revives():
    alive = torch.ones(2, 3, dtype=torch.bool)
    alive[0, 0] = False
    scores = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.5, 1.0]])
    out = select_prune(scores, alive, total_pruned=3)
    # one dead already; prune two more: (1,1) scores lowest, then the first of the ties, (0,1)
    assert out.tolist() == [[False, True, False], [False, True, False]]
    assert not bool(select_prune(scores, alive, 1).any())
    nan = torch.tensor([[0.0, float("nan"), 5.0], [1.0, 2.0, 3.0]])
    assert select_prune(nan, alive, 2).tolist() == [[False, True, False], [False, False, False]]


def test_param_groups_logits_lr_and_weight_decay():
    p = tiny("sequential_attention_pp", phases(("dense", 1)), logits_lr=0.5)
    groups = p.param_groups(lr=0.1, weight_decay=1e-4, momentum=0.9)
    assert [g["name"] for g in groups] == ["weights", "logits"]
    w, lg = groups
    assert (w["lr"], lg["lr"], w["weight_decay"], lg["weight_decay"]) == (0.1, 0.5, 1e-4, 1e-4)
    assert lg["momentum"] == 0.9 and len(lg["params"]) == 2
    ids = {id(t) for t in lg["params"]}
    assert not ids & {id(t) for t in w["params"]}
    assert len(w["params"]) + len(lg["params"]) == len(list(p.module.parameters()))
    q = tiny("sequential_attention_pp", phases(("dense", 1)), logits_weight_decay=0.0)
    assert q.param_groups(lr=0.1, weight_decay=1e-4)[1]["weight_decay"] == 0.0
    assert [g["name"] for g in tiny("acdc", phases(("dense", 1))).param_groups(lr=0.1)] == ["weights"]


def test_step_without_an_optimizer_is_an_error():
    p = tiny("acdc", phases(("dense", 2)))
    with pytest.raises(RuntimeStateError, match="attach"):
        p.step()


def test_pretrained_schedule_prunes_at_step_zero_by_block_norm():
    p = tiny("magnitude", phases(("finetune", 0)), sparsity=0.5, variant="pretrained")
    raw = {n: p.weight(n).detach().clone() for n in p.masks}
    p.attach(torch.optim.SGD(p.param_groups(lr=0.1)))
    for name, mask in p.masks.items():
        norms = mask.view.block_norms(raw[name]).flatten()
        k = sparsify_grid_count(mask.num_blocks, 0.5)
        expect = torch.zeros_like(norms, dtype=torch.bool)
        expect[torch.argsort(norms, stable=True)[:k]] = True
        assert torch.equal(~mask.alive.flatten(), expect)


def test_wrong_mask_mode_is_rejected():
    from _runtime_fakes import FakePruned, MLP, make_plan
    plan = make_plan("acdc", phases(("dense", 1)))
    fake = FakePruned(MLP(), plan, ["fc1"])
    fake.plan = make_plan("powerprop", phases(("dense", 1)))
    with pytest.raises(RuntimeStateError, match="powerprop"):
        fake.pruning_runtime()


def test_acdc_masking_keeps_pruned_weights_and_revives_them_with_their_values():
    # the paper's Criteo ACDC: "masking instead of pruning"
    sched = phases(("dense", 5), ("sparse", 5), ("dense", 5))
    p = tiny("acdc", sched, sparsity=0.5, masking=True)
    opt = torch.optim.SGD(p.param_groups(lr=0.05))             # no weight decay: masked weights stay put
    p.attach(opt)
    def inside_the_sparse_phase(p):
        dead = {n: ~m.alive.clone() for n, m in p.masks.items()}
        assert not _dead_raw_weights_are_zero(p)                # masked, not zeroed
        for n, m in p.masks.items():                            # ... and invisible behind the mask
            assert bool((m(p.weight(n)).detach()[m.view.expand(dead[n])] == 0).all())
        return dead, {n: p.weight(n).detach().clone() for n in p.masks}

    (dead, kept), _ = _train_and_snapshot(p, opt, 10, at=5, snapshot=inside_the_sparse_phase)
    assert p.runtime.phase.kind == "dense"
    for name, mask in p.masks.items():
        assert bool(mask.alive.all())
        hidden = mask.view.expand(dead[name])
        assert torch.equal(p.weight(name).detach()[hidden], kept[name][hidden])      # back with their values
        assert bool((kept[name][hidden] != 0).any())


OPTIMIZERS = {
    "sgd": lambda g: torch.optim.SGD(g, lr=0.05, momentum=0.9, weight_decay=1e-3, nesterov=True),
    "adam": lambda g: torch.optim.Adam(g, lr=1e-2, amsgrad=True),
    "adamw": lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.1),
    "rmsprop": lambda g: torch.optim.RMSprop(g, lr=1e-3, momentum=0.5, weight_decay=1e-3),
}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_pruned_weights_stay_zero_without_a_pass_between_prunings(monkeypatch, method, optimizer):
    """step() zeroes pruned weights only where it prunes; in between, torch's optimizers
    leave them at exactly zero by themselves (zero gradient, zero state)."""
    from planc.runtime.runtime import Runtime

    sched = phases(("dense", 3), ("sparsify", 8, {"every": 4}), ("sparse", 6), ("finetune", 4))
    p = tiny(method, sched, sparsity=0.75)
    opt = OPTIMIZERS[optimizer](p.param_groups(lr=1e-2))
    p.attach(opt)
    zeroing_steps = []
    real_enforce = Runtime._enforce_zeros
    monkeypatch.setattr(Runtime, "_enforce_zeros", lambda self: zeroing_steps.append(self.t) or real_enforce(self))
    x, y = _data()
    for _ in range(sched[-1].end):
        F.cross_entropy(p.module(x), y).backward()
        opt.step()
        opt.zero_grad()
        assert _dead_raw_weights_are_zero(p), (method, optimizer, p.runtime.t)
        p.step()
    pruning_steps = {3, 7, 11, 17}                      # edges and sparsify updates of this schedule
    assert set(zeroing_steps) <= pruning_steps and len(zeroing_steps) >= 3
    assert any(not bool(m.alive.all()) for m in p.masks.values())


def test_a_pruning_step_zeroes_pruned_weights_an_optimizer_moved():
    """The net under the steps in between: an optimizer that moves a zero-gradient weight
    (here, by hand) is corrected at the next step that prunes."""
    sched = phases(("sparse", 4), ("finetune", 4))
    p = tiny("magnitude", sched, sparsity=0.5)
    opt = torch.optim.SGD(p.param_groups(lr=0.05))
    p.attach(opt)
    name, mask = next(iter(p.masks.items()))
    with torch.no_grad():
        p.weight(name).add_(1.0)                        # every pruned entry now nonzero
    for _ in range(4):
        p.step()
    assert _dead_raw_weights_are_zero(p) and p.runtime.t == 4
