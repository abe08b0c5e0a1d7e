"""The runtime behind the real planc.compile: the README's plain PyTorch loop, phase
edges on a traced GraphModule, and a resume through Pruned.state_dict()."""
import copy

import pytest
import torch
import torch.nn.functional as F

import planc
from planc.blocks import sparsify_grid_count
from planc.examples.digits import loaders, mlp
from planc.runtime.schedule import update_progress

PLAN = {
    "version": 1,
    "name": "loop",
    "model": {"example_inputs": [[16, 64]], "frontend": "{frontend}"},
    "targets": {"defaults": {"block": [8, 8], "sparsity": 0.8, "min_blocks": 16},
                "rules": [{"match": {"position": "last"}, "skip": True}]},
    "method": {"name": "{method}"},
    "schedule": {"phases": [{"phase": "dense", "steps": 8}, {"phase": "sparsify", "steps": 6, "every": 2},
                            {"phase": "sparse", "steps": 4}, {"phase": "dense", "steps": 4},
                            {"phase": "sparsify", "steps": 3}, {"phase": "finetune", "steps": 5}]},
    "train": {"steps": 30},
}
TOTAL = 30


def _plan(method, frontend="symbolic"):
    data = copy.deepcopy(PLAN)
    data["model"]["frontend"] = frontend
    data["method"]["name"] = method
    return planc.load_plan(data)


def _compile(method, frontend="symbolic", seed=0):
    torch.manual_seed(seed)
    return planc.compile(mlp(hidden=64), _plan(method, frontend), torch.randn(16, 64))


def _batches():
    train, _ = loaders(batch_size=32, train_size=320)
    while True:
        yield from train


@pytest.mark.parametrize("method,frontend", [("sequential_attention_pp", "export"), ("acdc", "symbolic"),
                                             ("magnitude", "symbolic"), ("powerprop", "symbolic")])
def test_readme_loop_runs_every_method_on_the_compiled_model(method, frontend):
    pruned = _compile(method, frontend)
    opt = torch.optim.SGD(pruned.param_groups(lr=0.1, momentum=0.9), lr=0.1)
    pruned.attach(opt)
    x_probe = torch.randn(8, 64)
    phases = pruned.plan.schedule.phases
    acting = {p.start for p in phases} | {t for p in phases if p.kind == "sparsify"
                                          for t in range(p.start, p.end) if update_progress(p, t) is not None}
    data = _batches()
    for _ in range(TOTAL):
        x, y = next(data)
        loss = F.cross_entropy(pruned.module(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        before = {n: m.alive.clone() for n, m in pruned.masks.items()}
        check = pruned.runtime.t + 1 in acting          # the steps where masks may change
        reference = copy.deepcopy(pruned.module) if check else None
        pruned.step()
        if check:
            with torch.no_grad():
                for name, mask in pruned.masks.items():
                    dict(reference.named_modules())[_mask_path(pruned.module, mask)].alive.copy_(mask.alive)
                assert torch.equal(pruned.module(x_probe), reference(x_probe))
        for name, mask in pruned.masks.items():
            w = pruned.weight(name).detach()
            assert bool((w[mask.view.expand(~mask.alive)] == 0).all())
        if any(not torch.equal(before[n], m.alive) for n, m in pruned.masks.items()) and \
                pruned.runtime.t in {p.start for p in pruned.plan.schedule.phases}:
            assert len(opt.state) == 0
    assert pruned.phase.kind == "finetune"
    for name, mask in pruned.masks.items():
        assert int((~mask.alive).sum()) == sparsify_grid_count(mask.num_blocks, 0.8)
    baked = pruned.bake()
    with torch.no_grad():
        assert torch.allclose(baked(x_probe), pruned.module(x_probe), atol=1e-5)


def _mask_path(module, mask):
    for path, m in module.named_modules():
        if m is mask:
            return path
    raise KeyError("mask not in module")


def test_resume_through_pruned_state_dict_is_bitwise_equal():
    def run(pruned, opt, data, start, stop):
        for _ in range(start, stop):
            x, y = next(data)
            F.cross_entropy(pruned.module(x), y).backward()
            opt.step()
            opt.zero_grad()
            pruned.step()

    def fresh(seed=0):
        pruned = _compile("sequential_attention_pp", seed=seed)
        opt = torch.optim.SGD(pruned.param_groups(lr=0.1, momentum=0.9, weight_decay=1e-4), lr=0.1)
        pruned.attach(opt)
        return pruned, opt

    ref, ref_opt = fresh()
    data = _batches()
    run(ref, ref_opt, data, 0, TOTAL)

    a, a_opt = fresh()
    data = _batches()
    run(a, a_opt, data, 0, 12)
    saved = copy.deepcopy((a.module.state_dict(), a_opt.state_dict(), a.state_dict()))
    b, b_opt = fresh(seed=1)
    b.module.load_state_dict(saved[0])
    b_opt.load_state_dict(saved[1])
    b.load_state_dict(saved[2])
    run(b, b_opt, data, 12, TOTAL)
    sa, sb = ref.module.state_dict(), b.module.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert ref.events == b.events
