"""A Hugging Face `transformers` Trainer callback that runs planc's pruning runtime.

    pruned = planc.compile(model, plan, example_inputs)
    trainer = Trainer(model=pruned.module, args=TrainingArguments(..., max_steps=N),
                      callbacks=[PlancCallback(pruned)], compute_loss_func=...)
    trainer.train()
    baked = pruned.bake()

What it does:
- on_train_begin: attaches the Trainer's optimizer (unwrapped from accelerate's
  AcceleratedOptimizer) so the runtime resets its state at phase edges and zeroes the
  state of pruned blocks; applies step 0's actions. If the Trainer resumes from one of its
  checkpoints that holds planc's runtime state (written by on_save), that state is loaded.
- on_step_end (once per optimizer step, after gradient accumulation): `pruned.step()`.
- on_save: writes the runtime's state (pickle-free, planc.checkpoint) as
  `planc_runtime.safetensors` into the Trainer's checkpoint folder.

The Trainer builds its optimizer from `model.parameters()`, which include the attention
logits of SequentialAttention++ masks (they are parameters of `pruned.module`); to give
the logits their own learning rate or weight decay, pass
`optimizers=(torch.optim.AdamW(pruned.param_groups(lr=...)), None)` to the Trainer.
FSDP2 (accelerate's `fsdp_version: 2`): the compiled module must be sharded at its root
(`fsdp_auto_wrap_policy: NO_WRAP`): a compiled GraphModule never calls its layers, so a
per-layer wrap policy is refused at on_train_begin with a one-line RuntimeStateError
(planc.sharding.check_groups). The runtime then gathers each masked weight to score it
and zeroes pruned blocks on each rank's shard; on_save runs on every rank (it gathers the
sharded logits) and rank 0 writes.
The plan's schedule should cover `max_steps`: a mismatch is logged as a warning (past the
schedule's end the runtime holds the last phase).
"""
from __future__ import annotations

import logging
import os
from typing import Optional

from transformers import TrainerCallback
from planc.checkpoint import save_state
from planc.checkpoint import load_state

logger = logging.getLogger(__name__)

STATE_FILE = "planc_runtime.safetensors"


def _unwrap(optimizer):
    """The torch optimizer inside accelerate's (or anyone's) wrapper."""
    seen = 0
    while hasattr(optimizer, "optimizer") and seen < 8 and optimizer.optimizer is not optimizer:
        optimizer = optimizer.optimizer
        seen += 1
    return optimizer


class PlancCallback(TrainerCallback):
    """Runs `pruned`'s phase schedule inside `transformers.Trainer` (see the module doc)."""

    def __init__(self, pruned, *, save_state: bool = True):
        self.pruned = pruned
        self.save_state = save_state

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        if optimizer is None:
            raise RuntimeError("PlancCallback: the Trainer passed no optimizer to on_train_begin")
        rt = self.pruned.pruning_runtime()
        self._maybe_resume(args, state)
        rt.attach(_unwrap(optimizer))
        end = rt.phases[-1].end if rt.phases else 0
        if state.max_steps and state.max_steps != end:
            logger.warning("planc: the plan's schedule covers %d steps, the Trainer runs %d", end, state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        self.pruned.step()

    def on_save(self, args, state, control, **kwargs):
        if not self.save_state:
            return
        runtime_state = self.pruned.state_dict()   # on every rank: gathers FSDP2-sharded logits (collective)
        if not state.is_world_process_zero:
            return

        folder = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if os.path.isdir(folder):
            save_state(os.path.join(folder, STATE_FILE), runtime_state)

    def _maybe_resume(self, args, state) -> None:
        if not state.global_step:
            return
        path: Optional[str] = os.path.join(args.output_dir, f"checkpoint-{state.global_step}", STATE_FILE)
        if os.path.isfile(path):
            self.pruned.load_state_dict(load_state(path))
            logger.info("planc: resumed the pruning runtime at step %d from %s", state.global_step, path)
        else:
            logger.warning("planc: the Trainer resumes at step %d but %s is missing; the pruning schedule "
                           "restarts from step 0", state.global_step, path)
