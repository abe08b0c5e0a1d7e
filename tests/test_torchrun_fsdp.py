"""`planc apply` under torchrun with `train.distributed: fsdp`: 2 CPU processes (gloo) train
the compiled module sharded with FSDP2 and rank 0 writes the run folder from full
tensors gathered once at the end.

- The run folder equals a single-process run of the same plan: alive grids bitwise,
  baked weights and logits within fp32 tolerance relative to their size, one events log
  of the same length, the report says 2 ranks and fsdp.
- The whole torchrun process group is SIGKILLed mid-run (after a checkpoint), `planc
  apply --resume` under torchrun finishes it, and its run folder equals the uninterrupted
  FSDP run's bitwise. Checkpoints of a sharded run hold full tensors (planc.train.
  _checkpoint_state): the same pickle-free file with its sha256 as one process writes.

The plan and the slow data factory are tests/test_crash_resume.py's (its batches sleep so
the kill lands mid-run); nothing here asserts on time."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys

import pytest
import torch

from test_crash_resume import HELPER, HELPER_SOURCE, STEPS, assert_bitwise_equal, plan_text
from test_crash_resume import wait_until_checkpointed, weights_and_masks

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def fsdp_plan(delay: float) -> str:
    text = plan_text(delay=delay)
    assert "  checkpoint_every: 5\n" in text
    return text.replace("  checkpoint_every: 5\n", "  checkpoint_every: 5\n  distributed: fsdp\n")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp_apply")
    (tmp / f"{HELPER}.py").write_text(HELPER_SOURCE)
    return tmp


def _env(folder) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join([str(folder), env.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def _argv(plan: str, out: str, *extra) -> list:
    return [*TORCHRUN, "-m", "planc.cli", "apply", plan, "--out", out, "--progress", "off", *extra]


@pytest.fixture(scope="module")
def uninterrupted(folder):
    plan = folder / "plan.yaml"
    plan.write_text(fsdp_plan(delay=0.0))
    out = str(folder / "fsdp")
    done = subprocess.run(_argv(str(plan), out), env=_env(folder), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


@pytest.fixture(scope="module")
def one_process(folder):
    """The same plan in this process with one thread (as the ranks run): the reference."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    sys.path.insert(0, str(folder))
    try:
        import planc
        from planc.train import train

        out = str(folder / "single")
        result = train(planc.load_plan(fsdp_plan(delay=0.0)), out, progress=False, log=lambda s: None)
        assert result.finished
        return out
    finally:
        sys.path.remove(str(folder))
        torch.set_num_threads(before)


def test_fsdp_apply_writes_the_run_folder_one_process_writes(uninterrupted, one_process):
    out, done = uninterrupted
    (model, masks), (want_model, want_masks) = weights_and_masks(out), weights_and_masks(one_process)
    assert sorted(masks) == sorted(want_masks) and sorted(model) == sorted(want_model)
    alive = [k for k in masks if k.endswith(".alive")]
    assert alive and all(torch.equal(masks[k], want_masks[k]) for k in alive)
    assert any(not bool(masks[k].all()) for k in alive)                  # something was pruned
    for got, want in ((model, want_model), (masks, want_masks)):
        for k, w in want.items():
            if w.is_floating_point():
                scale = max(float(w.abs().max()), 1e-3) if w.numel() else 1.0
                torch.testing.assert_close(got[k], w, rtol=1e-4, atol=1e-5 * scale, msg=k)
    report = json.loads(open(os.path.join(out, "report.json")).read())
    assert report["ranks"] == 2 and report["distributed"] == "fsdp"
    lines = [open(os.path.join(d, "events.jsonl")).read().splitlines() for d in (out, one_process)]
    assert len(lines[0]) == len(lines[1])                                # one log, written by rank 0
    assert [ln for ln in done.stdout.splitlines() if ln.startswith(out)][0].startswith(f"{out}: {STEPS} steps")


def _descendants(pid: int) -> list:
    """Every process below `pid` (Linux /proc). torchrun starts each rank in a session of
    its own, so killing torchrun's process group would leave the ranks running."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue                                 # a process that ended meanwhile
    found, frontier = [], [pid]
    while frontier:
        children = [c for c, p in parents.items() if p in frontier]
        found += children
        frontier = children
    return found


def _kill_all(proc: subprocess.Popen) -> None:
    for pid in _descendants(proc.pid) + [proc.pid]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_group_mid_run(proc: subprocess.Popen, out: str, kill_after: int) -> None:
    """SIGKILL torchrun and both ranks (a lost machine) once a checkpoint exists and the
    events log has passed step `kill_after`."""
    try:
        wait_until_checkpointed(proc, out, kill_after)
        _kill_all(proc)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            _kill_all(proc)
            proc.wait()


def test_sigkill_of_all_ranks_then_resume_is_bitwise_the_uninterrupted_fsdp_run(folder, uninterrupted):
    plan = folder / "slow.yaml"
    plan.write_text(fsdp_plan(delay=0.01))
    out = str(folder / "killed")
    kill_after = random.Random(os.getpid()).randrange(8, STEPS - 30)
    proc = subprocess.Popen(_argv(str(plan), out), env=_env(folder), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    _kill_group_mid_run(proc, out, kill_after)
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(out, "report.json"))          # really interrupted
    resumed = subprocess.run(_argv(str(plan), out, "--resume"), env=_env(folder), capture_output=True,
                             text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stderr                                   # (a surviving rank would have finished it)
    model, masks = weights_and_masks(out)
    want_model, want_masks = weights_and_masks(uninterrupted[0])
    assert_bitwise_equal(model, want_model)
    assert_bitwise_equal(masks, want_masks)
