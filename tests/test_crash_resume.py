"""Crash safety of `planc apply`: a real process is SIGKILLed at a random step, `planc
apply --resume` finishes the run, and the run folder's weights and masks equal an
uninterrupted run's bitwise. A truncated or corrupt checkpoint is detected and named,
and the previous good checkpoint is used.

The data factory (written into tmp_path, on PYTHONPATH) sleeps a few milliseconds per
batch so the kill lands mid-run; nothing here asserts on time."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from planc.checkpoint import load_tensors

HELPER = "planc_test_slowdata"
HELPER_SOURCE = textwrap.dedent('''
    import time

    from planc.examples import digits


    class Slow:
        """A DataLoader whose batches take `delay` seconds each (so a test can kill mid-run)."""

        def __init__(self, loader, delay):
            self.loader, self.delay = loader, delay
            self.generator = loader.generator

        def __iter__(self):
            for batch in self.loader:
                time.sleep(self.delay)
                yield batch

        def __len__(self):
            return len(self.loader)


    def loaders(delay=0.0, **kw):
        train, evaluation = digits.loaders(**kw)
        return Slow(train, delay), evaluation
''')

STEPS = 100


def plan_text(delay: float, checkpoint_every: int = 5) -> str:
    return textwrap.dedent(f'''\
        version: 1
        name: crash-tiny
        model:
          factory: planc.examples.digits:mlp
          kwargs: {{hidden: 32}}
          example_inputs: [[16, 64]]
        targets:
          defaults: {{block: [8, 8], sparsity: 0.75, min_blocks: 16}}
          rules: [{{match: {{position: last}}, skip: true}}]
        method: {{name: sequential_attention_pp, c: 4}}
        schedule: {{preset: paper}}
        train:
          data: {{factory: "{HELPER}:loaders", kwargs: {{batch_size: 16, train_size: 160, delay: {delay}}}}}
          steps: {STEPS}
          optimizer: {{name: sgd, lr: 0.1, momentum: 0.9}}
          eval_every: 40
          checkpoint_every: {checkpoint_every}
        lower: {{backend: dense}}
        ''')


@pytest.fixture
def env(tmp_path):
    (tmp_path / f"{HELPER}.py").write_text(HELPER_SOURCE)
    e = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
             OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return e


def apply(plan: str, out: str, env, *extra, wait=True):
    argv = [sys.executable, "-m", "planc.cli", "apply", plan, "--out", out, "--progress", "off", *extra]
    if not wait:
        return subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)


def steps_logged(out: str) -> int:
    """The last step the runtime's event log mentions (it is appended as phases change)."""
    try:
        with open(os.path.join(out, "events.jsonl")) as f:
            lines = [json.loads(ln) for ln in f if ln.strip().endswith("}")]
    except (OSError, ValueError):
        return -1
    return max((e.get("step", -1) for e in lines), default=-1)


def weights_and_masks(out: str):
    from planc.runfolder import state_dict

    model = state_dict(out)
    masks, _ = load_tensors(os.path.join(out, "masks.safetensors"))
    return model, masks


def assert_bitwise_equal(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), f"{k} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run, computed once in-process with one thread (the subprocesses run
    with OMP_NUM_THREADS=1: the same kernels, so the same bits)."""
    tmp = tmp_path_factory.mktemp("ref")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    sys.path.insert(0, str(tmp))
    try:
        (tmp / f"{HELPER}.py").write_text(HELPER_SOURCE)
        sys.modules.pop(HELPER, None)
        import planc
        from planc.train import train

        out = str(tmp / "run")
        result = train(planc.load_plan(plan_text(delay=0.0)), out, progress=False, log=lambda s: None)
        assert result.finished
        assert not [n for n in os.listdir(out) if n.startswith("checkpoint")]   # removed when done
        return weights_and_masks(out)
    finally:
        sys.path.remove(str(tmp))
        torch.set_num_threads(before)


def wait_until_checkpointed(proc: subprocess.Popen, out: str, kill_after: int) -> None:
    """Return once a checkpoint exists and the events log has passed step `kill_after`,
    with the run still going (the moment to kill it)."""
    ckpt = os.path.join(out, "checkpoint.safetensors")
    while proc.poll() is None:
        if os.path.exists(ckpt) and steps_logged(out) >= kill_after:
            break
        time.sleep(0.005)
    assert proc.poll() is None, f"the run ended before the kill: {proc.communicate()[1][-2000:]}"


def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(tmp_path, env, reference):
    plan = tmp_path / "plan.yaml"
    plan.write_text(plan_text(delay=0.01))
    out = str(tmp_path / "run")
    kill_after = random.Random(os.getpid()).randrange(8, STEPS - 30)
    proc = apply(str(plan), out, env, wait=False)
    try:
        wait_until_checkpointed(proc, out, kill_after)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(out, "report.json"))      # really interrupted
    assert os.path.exists(os.path.join(out, "checkpoint.safetensors"))

    resumed = apply(str(plan), out, env, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed" in resumed.stderr
    model, masks = weights_and_masks(out)
    assert_bitwise_equal(model, reference[0])
    assert_bitwise_equal(masks, reference[1])


@pytest.fixture
def one_thread():
    """In-process runs use one thread, as the subprocesses do (OMP_NUM_THREADS=1), so that
    their floating-point reductions match the reference run's bitwise."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _interrupted_run(tmp_path, env, stop_after: int, checkpoint_every: int = 5):
    """A run stopped (in-process, at a checkpoint boundary) after `stop_after` steps."""
    import importlib

    sys.path.insert(0, str(tmp_path))
    try:
        (tmp_path / f"{HELPER}.py").write_text(HELPER_SOURCE)
        sys.modules.pop(HELPER, None)
        importlib.invalidate_caches()
        import planc
        from planc.train import train

        plan = planc.load_plan(plan_text(delay=0.0, checkpoint_every=checkpoint_every))
        out = str(tmp_path / "run")
        result = train(plan, out, stop_after=stop_after, progress=False, log=lambda s: None)
        assert not result.finished
        return plan, out
    finally:
        sys.path.remove(str(tmp_path))


def _resume(plan, out, tmp_path):
    sys.path.insert(0, str(tmp_path))
    try:
        from planc.train import train

        logs = []
        result = train(plan, out, resume=True, progress=False, log=logs.append)
        return result, logs
    finally:
        sys.path.remove(str(tmp_path))


@pytest.mark.parametrize("damage", ["truncate", "flip-bytes", "empty"])
def test_corrupt_checkpoint_is_named_and_the_previous_good_one_is_used(tmp_path, env, reference, damage, one_thread):
    plan, out = _interrupted_run(tmp_path, env, stop_after=20)
    ckpt = os.path.join(out, "checkpoint.safetensors")
    data = open(ckpt, "rb").read()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip-bytes":
        mid = len(data) // 2
        data = data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 64]) + data[mid + 64:]
    else:
        data = b""
    with open(ckpt, "wb") as f:
        f.write(data)
    result, logs = _resume(plan, out, tmp_path)
    text = "\n".join(logs)
    assert "checkpoint.safetensors" in text and ("corrupt" in text or "unreadable" in text or "not a" in text), text
    assert "previous" in text, text
    assert result.finished
    model, masks = weights_and_masks(out)
    assert_bitwise_equal(model, reference[0])
    assert_bitwise_equal(masks, reference[1])


def test_no_good_checkpoint_at_all_is_one_clear_error(tmp_path, env, one_thread):
    from planc.errors import RunFolderError

    plan, out = _interrupted_run(tmp_path, env, stop_after=20)
    for name in os.listdir(out):
        if name.startswith("checkpoint"):
            with open(os.path.join(out, name), "wb") as f:
                f.write(b"\x00" * 10)
    with pytest.raises(RunFolderError) as info:
        _resume(plan, out, tmp_path)
    assert "checkpoint" in str(info.value) and "\n" not in str(info.value)


def test_checkpoints_are_written_atomically(tmp_path, env, monkeypatch, one_thread):
    """Every checkpoint write goes through a temporary file, an fsync and a rename."""
    import planc.checkpoint as ck

    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(ck.os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(ck.os, "replace", lambda a, b: (calls.append(("replace", os.path.basename(str(b)))),
                                                        real_replace(a, b))[1])
    _interrupted_run(tmp_path, env, stop_after=10)
    written = [c for c in calls if isinstance(c, tuple) and c[1] == "checkpoint.safetensors"]
    assert len(written) >= 2 and "fsync" in calls
    assert not [n for n in os.listdir(tmp_path / "run") if ".tmp" in n]


def test_the_latest_checkpoint_name_never_disappears(tmp_path, monkeypatch):
    """Replacing a checkpoint keeps `checkpoint.safetensors` present at every rename: a kill
    between two renames must not leave only the older checkpoint (CI once killed a run there)."""
    import planc.checkpoint as ck

    path = str(tmp_path / "checkpoint.safetensors")
    ck.save_state_keep_previous(path, {"step": 1})
    seen = []
    real_replace = os.replace

    def replace(a, b):
        real_replace(a, b)
        seen.append(os.path.isfile(path))

    monkeypatch.setattr(ck.os, "replace", replace)
    ck.save_state_keep_previous(path, {"step": 2})
    assert seen and all(seen), seen
    assert ck.load_state(path)["step"] == 2
    assert ck.load_state(ck.previous_path(path))["step"] == 1
