"""`planc apply` under torchrun: 2 CPU processes (gloo) run the shipped smoke plan and
write the same run folder as one process, up to float summation order; rank 0 alone
writes it. Also the pieces: the batch split and the launcher-environment errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from planc.distributed import Ranks, join_from_environment
from planc.errors import PlancError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLAN = os.path.join(ROOT, "plans", "digits-tiny.yaml")


def _apply(out: str, launcher: list) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run([*launcher, "-m", "planc.cli", "apply", PLAN, "--out", out, "--progress", "off"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("torchrun")
    single = _apply(str(tmp / "single"), [sys.executable])
    assert single.returncode == 0, single.stderr[-2000:]
    multi = _apply(str(tmp / "ranks"), [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                        "--nproc_per_node", "2"])
    assert multi.returncode == 0, multi.stderr[-3000:]
    return tmp / "single", tmp / "ranks", multi


def test_two_ranks_prune_the_same_blocks_as_one_process(runs):
    single, ranks, _ = runs
    a, b = load_file(str(single / "masks.safetensors")), load_file(str(ranks / "masks.safetensors"))
    assert sorted(a) == sorted(b)
    alive = [k for k in a if k.endswith(".alive")]
    assert alive and all(torch.equal(a[k], b[k]) for k in alive)
    assert any(not bool(a[k].all()) for k in alive)                 # something was pruned
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    from planc.runfolder import state_dict

    wa, wb = state_dict(str(single)), state_dict(str(ranks))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)


def test_rank_zero_alone_writes_the_run_folder(runs):
    single, ranks, multi = runs
    report = json.loads((ranks / "report.json").read_text())
    assert report["ranks"] == 2
    one = json.loads((single / "report.json").read_text())
    assert report["metrics"]["final"]["accuracy"] == pytest.approx(one["metrics"]["final"]["accuracy"], abs=0.5)
    # one events log, not two interleaved: as many lines as the single-process run's
    assert len((ranks / "events.jsonl").read_text().splitlines()) == len((single / "events.jsonl").read_text().splitlines())
    summary = [ln for ln in multi.stdout.splitlines() if ln.startswith(str(ranks))]
    assert len(summary) == 2 and "60 steps" in summary[0]           # printed once, by rank 0


@pytest.mark.parametrize("world,n", [(2, 32), (2, 7), (3, 10), (4, 4)])
def test_rank_shares_make_ddp_average_the_global_mean_loss(world, n):
    x, y = torch.arange(n, dtype=torch.float32)[:, None], torch.randn(n)
    slices = [Ranks(rank=r, world=world).share(x, y) for r in range(world)]
    assert torch.equal(torch.cat([s[1] for s in slices]), y)        # every sample once, in order
    # DDP averages over ranks: mean_r(share_r * mean(y_r)) must be mean(y)
    averaged = sum(share * float(ys.mean()) for _, ys, share in slices) / world
    assert averaged == pytest.approx(float(y.mean()), rel=1e-6)


def test_a_batch_smaller_than_the_world_is_one_error():
    with pytest.raises(PlancError, match="batch of 3 samples cannot be split across 4 ranks"):
        Ranks(rank=0, world=4).share(torch.zeros(3, 2), torch.zeros(3))


@pytest.mark.parametrize("env,says", [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE: expected a number of processes, got 'two'"),
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE=2 but RANK, MASTER_ADDR, MASTER_PORT not set: start the ranks with torchrun"),
])
def test_a_broken_launcher_environment_is_one_error(monkeypatch, env, says):
    for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(PlancError) as info:
        join_from_environment()
    assert str(info.value).endswith(says)


def test_one_process_without_a_launcher_is_rank_zero_of_one(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert join_from_environment() == Ranks(rank=0, world=1, started_group=False)
