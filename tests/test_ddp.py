"""The pruning runtime under torch.distributed DDP: 2 CPU processes on gloo.

- Every rank holds identical masks at every phase edge, and they equal a single-process
  run with the same global batch (each rank trains on its half of it).
- Decisions are rank 0's even when a rank's state diverges (here: rank 1's weights are
  perturbed before the first sparsify phase, which DDP never re-synchronises): the
  runtime broadcasts each pruning decision (planc.distributed).
- Names resolve with and without the wrapper: compile(DDP(model)) compiles the model
  inside, and a rule written for wrapped names (`module.layers.*`) matches `layers.0`;
  a model whose layers live under `.module` matches rules written without the prefix.
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import planc
from planc.checkpoint import load_state, save_state
from planc.examples.digits import mlp

PHASES = ("[{phase: dense, steps: 3}, {phase: sparsify, steps: 3}, {phase: sparse, steps: 2}, "
          "{phase: dense, steps: 2}, {phase: sparsify, steps: 2}, {phase: finetune, steps: 3}]")
STEPS = 15
GLOBAL_BATCH = 32


def plan_for(method: str, rule_name: str = "layers.*", kernels="auto") -> str:
    return f"""
version: 1
name: ddp-{method}
model: {{example_inputs: [[16, 64]]}}
targets:
  defaults: {{block: [8, 8], sparsity: 0.75, min_blocks: 16}}
  rules: [{{match: {{position: last}}, skip: true}}, {{match: {{name: "{rule_name}"}}, sparsity: 0.5}}]
method: {{name: {method}}}
schedule: {{phases: {PHASES}, sparse_kernels: {kernels}}}
"""


def batches():
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(STEPS, GLOBAL_BATCH, 64, generator=g)
    ys = torch.randint(0, 10, (STEPS, GLOBAL_BATCH), generator=g)
    return xs, ys


def train(method: str, rank: int = 0, world: int = 1, wrap=None, perturb_rank=None, rule_name="layers.*",
          kernels="auto") -> dict:
    """Run the schedule; returns the alive grids at every phase edge and the final weights."""
    torch.manual_seed(0)
    pruned = planc.compile(mlp(hidden=32), plan_for(method, rule_name, kernels))
    module = wrap(pruned.module) if wrap else pruned.module
    opt = torch.optim.SGD(pruned.param_groups(lr=0.1, momentum=0.9))
    pruned.attach(opt)
    rt = pruned.runtime
    edges = {}

    def snapshot():
        edges[f"{rt.t}:{rt.phase_index}"] = {n: m.alive.clone() for n, m in pruned.masks.items()}

    snapshot()
    xs, ys = batches()
    per = GLOBAL_BATCH // world
    kernel_steps = 0
    for step in range(STEPS):
        if perturb_rank == rank and step == 3:            # rank-local state, before the first sparsify edge
            with torch.no_grad():
                for name in pruned.masks:
                    w = pruned.weight(name)
                    w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(99)))
        x, y = xs[step, rank * per:(rank + 1) * per], ys[step, rank * per:(rank + 1) * per]
        kernel_steps += "kernels" in rt.kernels.decisions().values()
        F.cross_entropy(module(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        before = rt.phase_index
        pruned.step()
        if rt.phase_index != before or any(e.get("step") == rt.t and e.get("event") == "prune" for e in rt.events):
            snapshot()
    from planc import distributed

    distributed.assert_synchronized(pruned.masks)
    return {"edges": edges, "weights": {k: v.detach().clone() for k, v in pruned.module.state_dict().items()},
            "names": sorted(pruned.masks), "kernel_steps": torch.tensor(kernel_steps)}


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        results = {"sapp": train("sequential_attention_pp", rank, world, wrap=DDP),
                   "acdc_perturbed": train("acdc", rank, world, wrap=DDP, perturb_rank=1),
                   # sparse and finetune phases on the block-sparse kernels (planc.runtime.sparse_phases)
                   "sapp_kernels": train("sequential_attention_pp", rank, world, wrap=DDP, kernels="true")}
        torch.manual_seed(0)
        wrapped = planc.compile(DDP(mlp(hidden=32)), plan_for("acdc", rule_name="module.layers.*"))
        results["wrapped_names"] = sorted(wrapped.masks)
        results["wrapped_sparsity"] = {t.name: t.sparsity for t in wrapped.targets if t.targeted}
        save_state(os.path.join(out, f"rank{rank}.safetensors"), results)
    finally:
        dist.destroy_process_group()


def spawn_ranks(worker, tmp, world: int = 2) -> list:
    """Run worker(rank, world, init file, folder) on `world` processes; each saves its
    results as <folder>/rank<r>.safetensors, returned in rank order."""
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(world, str(tmp / "init"), str(tmp)), nprocs=world, join=True)
    return [load_state(str(tmp / f"rank{r}.safetensors")) for r in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_ranks(_worker, tmp_path_factory.mktemp("ddp"))


def assert_same_edges(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for edge in a:
        for name in a[edge]:
            assert torch.equal(a[edge][name], b[edge][name]), f"{name} differs at edge (step:phase) {edge}"


def test_masks_identical_on_both_ranks_at_every_edge(ranks):
    r0, r1 = ranks[0]["sapp"], ranks[1]["sapp"]
    assert len(r0["edges"]) >= 6                         # every phase edge and sparsify update
    assert_same_edges(r0["edges"], r1["edges"])
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k


def test_masks_equal_a_single_process_run_with_the_same_global_batch(ranks):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = train("sequential_attention_pp")
    finally:
        torch.set_num_threads(before)
    assert_same_edges(single["edges"], ranks[0]["sapp"]["edges"])
    for k, v in single["weights"].items():
        torch.testing.assert_close(ranks[0]["sapp"]["weights"][k], v, rtol=1e-4, atol=1e-5)
    last = list(single["edges"])[-1]
    assert any(not bool(g.all()) for g in single["edges"][last].values())   # something was pruned


def test_rank_local_divergence_does_not_split_decisions(ranks):
    assert_same_edges(ranks[0]["acdc_perturbed"]["edges"], ranks[1]["acdc_perturbed"]["edges"])


def test_compiling_a_ddp_wrapped_model_uses_the_inner_names(ranks):
    for r in ranks:
        assert r["wrapped_names"] == ["layers.0", "layers.2"]
        assert r["wrapped_sparsity"] == {"layers.0": 0.5, "layers.2": 0.5}   # `module.layers.*` matched


class Wrapper(nn.Module):
    """A model whose layers are named `module.layers.0`, as a wrapped model's are."""

    def __init__(self):
        super().__init__()
        self.module = mlp(hidden=32)

    def forward(self, x):
        return self.module(x)


@pytest.mark.parametrize("rule", ["layers.*", "module.layers.*"])
def test_rules_match_names_with_and_without_the_module_prefix(rule):
    pruned = planc.compile(Wrapper(), plan_for("acdc", rule_name=rule))
    got = {t.name: t.sparsity for t in pruned.targets if t.targeted}
    assert got == {"module.layers.0": 0.5, "module.layers.2": 0.5}


def test_sparse_phases_on_the_kernels_stay_consistent_across_ranks(ranks):
    r0, r1 = ranks[0]["sapp_kernels"], ranks[1]["sapp_kernels"]
    # sparsify 3 + sparse 2 + sparsify 2 + finetune 3 steps on the kernels; none without them
    assert int(r0["kernel_steps"]) == 10 and int(ranks[0]["sapp"]["kernel_steps"]) == 0
    assert_same_edges(r0["edges"], r1["edges"])
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
    # and they train what the dense computation trains (up to summation order)
    assert_same_edges(r0["edges"], ranks[0]["sapp"]["edges"])
    for k, v in ranks[0]["sapp"]["weights"].items():
        torch.testing.assert_close(r0["weights"][k], v, rtol=1e-4, atol=1e-5)
