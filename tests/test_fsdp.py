"""The pruning runtime with FSDP2 (`fully_shard`, DTensor parameters): 2 CPU processes on gloo.

The compiled module is sharded at its root (every parameter, the attention logits too,
split by rows over the 2 ranks) and trained through the runtime with the plain-loop
helper (planc.integrations.prune_loop) and, separately, with the HF Trainer callback's
hooks called as the Trainer calls them. Each rank trains on its half of the same global
batches as tests/test_ddp.py, so:

- the alive grids are identical on both ranks at every phase edge and sparsify update,
  and equal a single-process run of the same plan on the full batch;
- the final weights equal the single-process ones within fp32 tolerance (relative to
  each tensor's size);
- after every step, pruned blocks are exactly zero on each rank's own shard of the
  weight and of its momentum, and right after every phase edge the optimizer holds no
  state at all (the reset covers the sharded state);
- each rank holds about half of the model's parameter bytes, and the shards add up to it;
- sharding a layer the graph never calls, or building the optimizer before sharding,
  is one planc error at attach().
"""
from __future__ import annotations

import os
import types

import pytest
import torch
import torch.nn.functional as F

import planc
from planc.checkpoint import load_state, save_state
from planc.errors import RuntimeStateError
from planc.examples.digits import mlp
from planc.integrations import prune_loop
from test_ddp import GLOBAL_BATCH, STEPS, assert_same_edges, batches, plan_for, spawn_ranks
from test_ddp import train as train_one_process

METHOD = "sequential_attention_pp"


def _rank_batches(rank: int, world: int):
    xs, ys = batches()
    per = GLOBAL_BATCH // world
    return [(xs[s, rank * per:(rank + 1) * per], ys[s, rank * per:(rank + 1) * per]) for s in range(STEPS)]


def _local_rows(full: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's rows of a full-shaped tensor as FSDP2 lays them out (torch.chunk on dim 0)."""
    return torch.chunk(full, world, dim=0)[rank]


class Recorder:
    """Alive grids at every edge (keys as tests/test_ddp.py's), and the invariants after each step."""

    def __init__(self, pruned, opt, rank: int, world: int):
        self.pruned, self.opt, self.rank, self.world = pruned, opt, rank, world
        self.rt = pruned.runtime
        self.edges, self.phase = {}, self.rt.phase_index
        self.violations, self.edges_with_state = [], 0
        self.snapshot()

    def snapshot(self):
        self.edges[f"{self.rt.t}:{self.rt.phase_index}"] = {n: m.alive.clone() for n, m in self.pruned.masks.items()}

    def after_step(self, *_):
        rt = self.rt
        entered = rt.phase_index != self.phase
        self.phase = rt.phase_index
        if entered or any(e.get("step") == rt.t and e.get("event") == "prune" for e in rt.events):
            self.snapshot()
        if entered and len(self.opt.state) != 0:
            self.edges_with_state += 1
        for name, mask in self.pruned.masks.items():
            weight = self.pruned.weight(name)
            dead = _local_rows(mask.view.expand(~mask.alive), self.rank, self.world)
            shards = [("weight", weight.to_local())]
            momentum = self.opt.state.get(weight, {}).get("momentum_buffer")
            if momentum is not None:
                shards.append(("momentum", momentum.to_local()))
            for what, local in shards:
                if bool(local[dead].ne(0).any()):
                    self.violations.append(f"step {rt.t} {name} {what}")


def _sharded(method: str):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    pruned = planc.compile(mlp(hidden=32), plan_for(method))
    fully_shard(pruned.module)
    opt = torch.optim.SGD(pruned.param_groups(lr=0.1, momentum=0.9))
    return pruned, opt


def _full_state(pruned) -> dict:
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v.clone()
            for k, v in pruned.module.state_dict().items()}


def _with_prune_loop(rank: int, world: int) -> dict:
    pruned, opt = _sharded(METHOD)
    pruned.attach(opt)
    rec = Recorder(pruned, opt, rank, world)
    prune_loop(pruned, opt, _rank_batches(rank, world), lambda m, b: F.cross_entropy(m(b[0]), b[1]),
               on_step=rec.after_step)
    params = list(pruned.module.parameters())
    memory = {"local": sum(p.to_local().numel() * p.element_size() for p in params),
              "whole": sum(p.numel() * p.element_size() for p in params)}
    return {"edges": rec.edges, "weights": _full_state(pruned), "violations": rec.violations,
            "edges_with_state": rec.edges_with_state, "memory": memory}


def _with_hf_callback(rank: int, world: int, out: str) -> dict:
    """The Trainer's calls, in its order: on_train_begin, then per optimizer step on_step_end, on_save."""
    import torch.distributed as dist

    from planc.integrations.hf import STATE_FILE, PlancCallback

    pruned, opt = _sharded(METHOD)
    callback = PlancCallback(pruned)
    args = types.SimpleNamespace(output_dir=out)
    state = types.SimpleNamespace(global_step=0, max_steps=STEPS, is_world_process_zero=rank == 0)
    callback.on_train_begin(args, state, None, optimizer=opt)
    rec = Recorder(pruned, opt, rank, world)
    for x, y in _rank_batches(rank, world):
        F.cross_entropy(pruned.module(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        state.global_step += 1
        callback.on_step_end(args, state, None)
        rec.after_step()
    os.makedirs(os.path.join(out, f"checkpoint-{STEPS}"), exist_ok=True)
    callback.on_save(args, state, None)
    dist.barrier()
    saved = load_state(os.path.join(out, f"checkpoint-{STEPS}", STATE_FILE))
    logits = {n: m.logits.full_tensor() for n, m in pruned.masks.items()}
    return {"edges": rec.edges, "saved_logits_equal": all(torch.equal(saved["layers"][n]["logits"], logits[n])
                                                           for n in logits)}


def _refusal(build) -> str:
    try:
        build()
    except RuntimeStateError as err:
        return str(err)
    return "no error"


def _per_layer_groups():
    from torch.distributed.fsdp import fully_shard

    pruned = planc.compile(mlp(hidden=32), plan_for("acdc"))
    fully_shard(pruned.module.get_submodule("layers.0"))
    fully_shard(pruned.module)
    pruned.attach(torch.optim.SGD(pruned.param_groups(lr=0.1)))


def _optimizer_before_sharding():
    from torch.distributed.fsdp import fully_shard

    pruned = planc.compile(mlp(hidden=32), plan_for("acdc"))
    opt = torch.optim.SGD(pruned.param_groups(lr=0.1))
    fully_shard(pruned.module)
    pruned.attach(opt)


def _worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        results = {"loop": _with_prune_loop(rank, world),
                   "callback": _with_hf_callback(rank, world, os.path.join(out, "hf")),
                   "per_layer": _refusal(_per_layer_groups),
                   "stale_optimizer": _refusal(_optimizer_before_sharding)}
        save_state(os.path.join(out, f"rank{rank}.safetensors"), results)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn_ranks(_worker, tmp_path_factory.mktemp("fsdp"))


@pytest.fixture(scope="module")
def single():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train_one_process(METHOD)
    finally:
        torch.set_num_threads(before)


def test_masks_identical_on_both_ranks_and_equal_one_process(ranks, single):
    r0, r1 = ranks[0]["loop"], ranks[1]["loop"]
    assert len(r0["edges"]) >= 6                         # every phase edge and sparsify update
    assert_same_edges(r0["edges"], r1["edges"])
    assert_same_edges(single["edges"], r0["edges"])
    last = list(single["edges"])[-1]
    assert any(not bool(g.all()) for g in single["edges"][last].values())   # something was pruned


def test_final_weights_equal_one_process_within_fp32_tolerance(ranks, single):
    for r in ranks:
        got = r["loop"]["weights"]
        assert sorted(got) == sorted(single["weights"])
        for k, want in single["weights"].items():
            scale = float(want.abs().max()) if want.is_floating_point() and want.numel() else 1.0
            torch.testing.assert_close(got[k], want, rtol=1e-4, atol=1e-5 * max(scale, 1e-3), msg=k)


def test_pruned_blocks_stay_zero_on_every_shard_and_edges_reset_the_sharded_state(ranks):
    for r in ranks:
        assert r["loop"]["violations"] == []
        assert r["loop"]["edges_with_state"] == 0


def test_each_rank_holds_half_of_the_parameters(ranks):
    whole = ranks[0]["loop"]["memory"]["whole"]
    local = [r["loop"]["memory"]["local"] for r in ranks]
    assert sum(local) == whole                           # sharded, nothing replicated
    for bytes_on_rank in local:
        assert abs(bytes_on_rank / whole - 0.5) < 0.05


def test_the_hf_callback_drives_a_sharded_model_to_the_same_masks(ranks, single):
    for r in ranks:
        assert_same_edges(single["edges"], r["callback"]["edges"])
        assert r["callback"]["saved_logits_equal"]       # on_save gathered the sharded logits on every rank


def test_sharding_a_layer_the_graph_never_calls_is_one_error(ranks):
    for r in ranks:
        msg = r["per_layer"]
        assert msg.startswith("fully_shard('layers.0'): the compiled module reads") and "\n" not in msg
        assert "fully_shard(pruned.module)" in msg


def test_an_optimizer_built_before_sharding_is_one_error(ranks):
    for r in ranks:
        msg = r["stale_optimizer"]
        assert "build it after fully_shard(pruned.module)" in msg and "\n" not in msg
