"""The plain-loop helpers of planc.integrations (see its docstring)."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable, Iterator, List, Optional

import torch

from planc.errors import RuntimeStateError


def schedule_steps(pruned) -> int:
    """The number of optimizer steps the plan's phase schedule covers."""
    phases = pruned.plan.schedule.phases
    return int(phases[-1].end) if phases else 0


def _runtime(pruned):
    return pruned.pruning_runtime()


def _batches(data: Iterable) -> Iterator:
    """Endless: restarts `data` (a DataLoader, a list, ...) at each epoch's end."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise RuntimeStateError("the training data is empty")


def prune_loop(pruned, optimizer: torch.optim.Optimizer, data: Iterable,
               loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor], *, steps: Optional[int] = None,
               on_step: Optional[Callable[[int, float], None]] = None) -> List[float]:
    """Train `pruned.module` with `optimizer` on `data` for `steps` optimizer steps (default:
    the rest of the plan's schedule), calling `pruned.step()` after each. `loss_fn(module,
    batch)` returns the loss. Returns the losses. `on_step(step, loss)` is called after
    each step (logging, evaluation)."""
    rt = _runtime(pruned)
    if rt.optimizer is not optimizer:
        pruned.attach(optimizer)
    total = schedule_steps(pruned) - rt.t if steps is None else int(steps)
    if total < 0:
        raise RuntimeStateError(f"expected a non-negative number of steps, got {total}")
    module = pruned.module
    module.train()
    losses: List[float] = []
    it = _batches(data)
    for _ in range(total):
        loss = loss_fn(module, next(it))
        if not torch.isfinite(loss):
            raise RuntimeStateError(f"the loss became {float(loss)} at step {rt.t}; lower the learning rate")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        pruned.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(rt.t, losses[-1])
    return losses


@contextlib.contextmanager
def pruning(pruned, optimizer: torch.optim.Optimizer, *, require_complete: bool = False):
    """`with pruning(pruned, opt) as p: ... p.step() after each opt.step() ...`. Attaches
    the optimizer on entry. On a normal exit, with `require_complete`, raises
    RuntimeStateError if the schedule did not reach its end (the masks would not be at
    their targets)."""
    pruned.attach(optimizer)
    yield pruned
    rt = _runtime(pruned)
    end = schedule_steps(pruned)
    if require_complete and rt.t < end:
        raise RuntimeStateError(f"the loop stopped at step {rt.t} of the schedule's {end}; "
                                "the masks are not at their targets")
