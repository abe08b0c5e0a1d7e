"""Block OBS (planc.obs, method obs): the greedy is the exact greedy, the kept weights are
the least-squares optimum, a pruned model is closer to its dense self than magnitude
pruning leaves it, and `planc apply` calibrates once and resumes bitwise."""
from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

import planc
from planc.errors import PlancError, PlanError, RuntimeStateError
from planc.obs import choose_blocks, obs_prune
from planc.runfolder import CHECKPOINT
from planc.train import calibration_batches, train

D = torch.float64


def _exact_solution(W, Hd, C, alive, block):
    """Per block-row, the least-squares weights on the kept columns (plain solves)."""
    new = torch.zeros_like(W)
    target = C @ W.t()
    br, bc = block
    for r in range(alive.shape[0]):
        cols = [c for j in range(alive.shape[1]) if alive[r, j] for c in range(j * bc, min((j + 1) * bc, W.shape[1]))]
        rows = slice(r * br, min((r + 1) * br, W.shape[0]))
        if cols:
            idx = torch.tensor(cols)
            new[rows, idx] = torch.linalg.solve(Hd[idx][:, idx], target[idx, rows]).t()
    return new


def _error(W, new, Hd, C):
    """The objective up to its constant: tr(W' Hd W'ᵀ) − 2 tr(W' C Wᵀ)."""
    return float((new @ Hd * new).sum() - 2 * (new @ C * W).sum())


@pytest.mark.parametrize("shape,block,prune", [((12, 20), (4, 5), 7), ((10, 13), (4, 5), 5)])
def test_the_greedy_removes_what_an_exact_search_removes_and_keeps_the_least_squares_weights(shape, block, prune):
    g = torch.Generator().manual_seed(0)
    out_dim, in_dim = shape
    X = torch.randn(300, in_dim, dtype=D, generator=g) @ torch.randn(in_dim, in_dim, dtype=D, generator=g)
    Xt = X + 0.2 * torch.randn(X.shape, dtype=D, generator=g)     # the dense model's inputs differ
    W = torch.randn(out_dim, in_dim, dtype=D, generator=g)
    H, C = X.t() @ X, X.t() @ Xt
    Hd = H + 0.01 * H.diagonal().mean() * torch.eye(in_dim, dtype=D)
    grid = (-(-out_dim // block[0]), -(-in_dim // block[1]))
    alive = torch.ones(grid, dtype=torch.bool)
    for _ in range(prune):                   # naive greedy: try every removal, solve exactly
        best = None
        for r in range(grid[0]):
            for j in range(grid[1]):
                if alive[r, j]:
                    trial = alive.clone()
                    trial[r, j] = False
                    e = _error(W, _exact_solution(W, Hd, C, trial, block), Hd, C)
                    if best is None or e < best[0]:
                        best = (e, r, j)
        alive[best[1], best[2]] = False
    got_alive, got_w = choose_blocks(W, H, C, block, prune, damp=0.01)
    assert torch.equal(got_alive, alive)
    want = _exact_solution(W, Hd, C, alive, block)
    assert (got_w - want).abs().max() <= 1e-9 * want.abs().max()


class _Attn(nn.Module):
    """Three layers reading one input (a query, key, value) and two after them."""

    def __init__(self, d=32):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2) / 8.0, dim=-1) @ self.v(x)
        return self.down(torch.relu(self.up(x + a)))


def _plan(method="obs", steps=0, **extra):
    return planc.load_plan({"version": 1, "model": {"example_inputs": [[2, 6, 32]]},
                            "targets": {"defaults": {"block": [8, 8], "sparsity": 0.5, "min_blocks": 4}},
                            "method": {"name": method, **extra}, "train": {"steps": steps}})


def _batches(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(32, 32, generator=g) / 4
    return [torch.randn(4, 6, 32, generator=g) @ mix + torch.randn(32, generator=g) for _ in range(n)]


def test_obs_prunes_to_target_and_stays_closer_to_the_dense_model_than_magnitude():
    torch.manual_seed(0)
    model = _Attn().eval()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    calib, held = _batches(48, seed=1), _batches(4, seed=2)
    with torch.no_grad():
        ref = [model(x) for x in held]

    pruned = planc.compile(model, _plan())
    layers = obs_prune(pruned, calib)
    assert {r["name"] for r in layers} == set(pruned.masks)
    for rec in layers:
        mask = pruned.masks[rec["name"]]
        assert int((~mask.alive).sum()) == rec["pruned"] == pruned.pruning_runtime().target_blocks(rec["name"])
        assert rec["error"] <= rec["error_cut"] + 1e-9           # reconstruction never loses to the cut
        w = pruned.weight(rec["name"])
        assert torch.count_nonzero(mask.view.scale(w.detach(), (~mask.alive).to(w.dtype))) == 0
    pruned.start()                                            # the runtime finds every layer at target
    with torch.no_grad():
        obs_err = sum(float((pruned.module(x) - r).pow(2).sum()) for x, r in zip(held, ref))

    model.load_state_dict(dense)
    mag = planc.compile(model, _plan("magnitude", variant="pretrained"))
    mag.start()
    with torch.no_grad():
        mag_err = sum(float((mag.module(x) - r).pow(2).sum()) for x, r in zip(held, ref))
    assert obs_err < 0.5 * mag_err, (obs_err, mag_err)


def test_without_calibration_the_runtime_refuses_to_prune():
    pruned = planc.compile(_Attn().eval(), _plan())
    with pytest.raises(RuntimeStateError, match="planc.obs_prune"):
        pruned.start()


def test_obs_refuses_a_pruned_model_and_attention_masks():
    pruned = planc.compile(_Attn().eval(), _plan())
    obs_prune(pruned, _batches(2))
    with pytest.raises(PlancError, match="already pruned"):
        obs_prune(pruned, _batches(2))
    sapp = planc.compile(_Attn().eval(), _plan("sequential_attention_pp", steps=40))
    with pytest.raises(PlancError, match="mode 'attention'"):
        obs_prune(sapp, _batches(2))
    with pytest.raises(PlancError, match="no calibration batches"):
        obs_prune(planc.compile(_Attn().eval(), _plan()), [])


def test_obs_refuses_convolutions_by_name():
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.Flatten(), nn.Linear(16 * 4 * 4, 16))
    plan = planc.load_plan({"version": 1, "model": {"example_inputs": [[2, 8, 6, 6]]},
                            "targets": {"defaults": {"block": [8, 8], "sparsity": 0.5, "min_blocks": 1}},
                            "method": {"name": "obs"}, "train": {"steps": 0}})
    pruned = planc.compile(model.eval(), plan)
    with pytest.raises(PlancError, match="convolutions: 0"):
        obs_prune(pruned, [torch.randn(2, 8, 6, 6)])


def test_plans_with_obs_accept_only_sparse_and_finetune_phases(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nmodel: {example_inputs: [[4, 64]]}\nmethod: {name: obs, damp: 0}\n"
                   "schedule:\n  phases:\n    - {phase: dense, steps: 5}\n    - {phase: finetune, steps: 5}\n")
    with pytest.raises(PlanError) as err:
        planc.load_plan(str(bad))
    text = str(err.value)
    assert f"{bad}:3:27: method.damp: expected a number > 0" in text
    assert f"{bad}:6:15: schedule.phases[0].phase: method obs prunes once" in text


def test_calibration_batches_leave_the_training_order_alone():
    data = torch.utils.data.TensorDataset(torch.arange(40.0).view(20, 2), torch.zeros(20))
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True,
                                         generator=torch.Generator().manual_seed(3))
    torch.manual_seed(5)
    before = [b[0].clone() for b in loader]
    loader.generator.manual_seed(3)
    torch.manual_seed(5)
    got = calibration_batches(loader, 2)
    after = [b[0].clone() for b in loader]
    assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(before, after))


def _digits_plan(steps=16, **method):
    return planc.load_plan({
        "version": 1, "name": "obs-digits",
        "model": {"factory": "planc.examples.digits:mlp", "kwargs": {"hidden": 64},
                  "example_inputs": [[8, 64]]},
        "targets": {"defaults": {"block": [8, 8], "sparsity": 0.75, "min_blocks": 16},
                    "rules": [{"match": {"position": "last"}, "skip": True}]},
        "method": {"name": "obs", "calibration_batches": 3, **method},
        "train": {"data": {"factory": "planc.examples.digits:loaders",
                           "kwargs": {"batch_size": 32, "train_size": 320}},
                  "steps": steps, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
                  "eval_every": 4, "loss": "cross_entropy", "checkpoint_every": 5},
    })


def test_apply_calibrates_once_records_it_and_resumes_bitwise(tmp_path):
    plan = _digits_plan()
    ref, part = str(tmp_path / "ref"), str(tmp_path / "part")
    done = train(plan, ref, progress=False)
    assert done.report["mean_sparsity"] == pytest.approx(0.75, abs=0.01)
    events = [json.loads(line) for line in open(os.path.join(ref, "events.jsonl"))]
    obs = [e for e in events if e["event"] == "calibration"]
    assert len(obs) == 1 and obs[0]["batches"] == 3 and len(obs[0]["layers"]) == len(done.pruned.masks)
    first = train(plan, part, progress=False, stop_after=10)
    assert not first.finished and os.path.isfile(os.path.join(part, CHECKPOINT))
    assert train(plan, part, resume=True, progress=False).finished
    events = [json.loads(line) for line in open(os.path.join(part, "events.jsonl"))]
    assert sum(e["event"] == "calibration" for e in events) == 1          # the resumed run did not calibrate again
    a, b = planc.runfolder.state_dict(ref), planc.runfolder.state_dict(part)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _Stored(nn.Module):
    """One linear map, its weight stored (in, out) and applied as addmm (GPT-2's Conv1D),
    or stored (out, in) as an nn.Linear."""

    def __init__(self, weight_out_in, bias, transposed):
        super().__init__()
        self.transposed = transposed
        if transposed:
            self.weight = nn.Parameter(weight_out_in.t().contiguous())
            self.bias = nn.Parameter(bias.clone())
        else:
            self.lin = nn.Linear(weight_out_in.shape[1], weight_out_in.shape[0])
            with torch.no_grad():
                self.lin.weight.copy_(weight_out_in)
                self.lin.bias.copy_(bias)

    def forward(self, x):
        if self.transposed:
            return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], -1)
        return self.lin(x)


def test_a_transposed_layer_gets_the_blocks_and_weights_of_the_same_map_stored_out_by_in():
    g = torch.Generator().manual_seed(4)
    w, b = torch.randn(16, 24, generator=g), torch.randn(16, generator=g)
    calib = [torch.randn(5, 24, generator=g) @ torch.randn(24, 24, generator=g) for _ in range(6)]
    plan = planc.load_plan({"version": 1, "model": {"example_inputs": [[5, 24]]},
                            "targets": {"defaults": {"block": [4, 8], "sparsity": 0.5, "min_blocks": 1}},
                            "method": {"name": "obs"}, "train": {"steps": 0}})
    got = {}
    for transposed in (False, True):
        pruned = planc.compile(_Stored(w, b, transposed).eval(), plan)
        (name,) = pruned.masks
        obs_prune(pruned, calib)
        weight = pruned.weight(name).detach()
        got[transposed] = (pruned.masks[name].alive.clone(), weight.t() if transposed else weight)
    assert torch.equal(got[False][0], got[True][0])
    assert torch.allclose(got[False][1], got[True][1], rtol=1e-4, atol=1e-5)
