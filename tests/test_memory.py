"""planc.memory: once training starts, glibc keeps freed large blocks in the process, so
the weight-sized tensors a masked step allocates do not fault their pages in again.

What that is worth is measured, not tested: glibc's placement of large blocks varies run
to run, so the page faults of one step range from tens to thousands either way; over
issue 16's MLP step they fall from about 10,000 to near zero (docs/benchmarks.md)."""
import os
import platform
import subprocess
import sys

import pytest
import torch

from planc import memory

glibc_only = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")


@glibc_only
def test_keep_freed_memory_is_idempotent():
    assert memory.keep_freed_memory() is True
    assert memory.keep_freed_memory() is True


def _in_a_fresh_process(env_value):
    code = "from planc import memory; print(memory.keep_freed_memory())"
    env = {k: v for k, v in os.environ.items() if k != memory.ENV}
    if env_value is not None:
        env[memory.ENV] = env_value
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@glibc_only
def test_the_environment_variable_turns_it_off():
    assert _in_a_fresh_process("0") == "False"
    assert _in_a_fresh_process(None) == "True"


@glibc_only
def test_attaching_an_optimizer_keeps_freed_memory(monkeypatch):
    import planc
    from torch import nn

    calls = []
    monkeypatch.setattr("planc.runtime.runtime.keep_freed_memory", lambda: calls.append(1) or True)
    plan = ("version: 1\nmodel: {example_inputs: [[2, 16]]}\n"
            "targets: {defaults: {block: [4, 4], sparsity: 0.5, min_blocks: 1}}\n"
            "method: {name: magnitude}\nschedule: {phases: [{phase: sparse, steps: 2}]}\ntrain: {steps: 2}\n")
    pruned = planc.compile(nn.Sequential(nn.Linear(16, 16)), plan, torch.randn(2, 16))
    pruned.attach(torch.optim.SGD(pruned.param_groups(lr=0.1)))
    assert calls == [1]
