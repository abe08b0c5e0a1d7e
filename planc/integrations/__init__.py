"""Ways to drive planc's pruning runtime from training loops planc does not own.

- `prune_loop(pruned, optimizer, data, loss_fn)`: a plain PyTorch loop (forward,
  backward, optimizer step, `pruned.step()`), for the schedule's length by default.
- `pruning(pruned, optimizer)`: a context manager for a loop you write yourself; it
  attaches the optimizer and hands back the Pruned, whose `.step()` you call after each
  optimizer step; on exit it checks the schedule ran to its end (or says how far it got).
- `planc.integrations.hf.PlancCallback(pruned)`: a Hugging Face `transformers`
  TrainerCallback (imported lazily: transformers is optional).

    pruned = planc.compile(model, plan)
    opt = torch.optim.AdamW(pruned.param_groups(lr=1e-3))
    losses = planc.integrations.prune_loop(pruned, opt, loader, lambda m, b: F.cross_entropy(m(b[0]), b[1]))
"""
from __future__ import annotations

from planc.integrations.loop import prune_loop, pruning, schedule_steps  # noqa: F401

__all__ = ["prune_loop", "pruning", "schedule_steps", "PlancCallback"]


def __getattr__(name):
    if name == "PlancCallback":
        from planc.integrations.hf import PlancCallback   # lazy: transformers is optional

        return PlancCallback
    raise AttributeError(f"module 'planc.integrations' has no attribute {name!r}")
