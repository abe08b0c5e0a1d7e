"""RuntimeAccess: the training-time methods of a compiled model, written once.

Anything with `.module`, `.plan`, `.masks`, `.targets` (records with `name` and
`sparsity`) and `.weight(name)` (planc.pruned.Pruned, or a test's stand-in) mixes this
in to get `param_groups`, `attach`, `start`, `step`, `state_dict`, `load_state_dict`,
`events` and `phase`, all delegating to one Runtime: created on first use by
`pruning_runtime()`, and given what it needs, not the object itself."""
from __future__ import annotations

from typing import Dict

from planc.runtime.runtime import Runtime


def target_sparsities(targets) -> Dict[str, float]:
    """Layer name -> target sparsity, from the compiled targets (TargetInfo records)."""
    out: Dict[str, float] = {}
    for info in targets or ():
        name, sparsity = getattr(info, "name", None), getattr(info, "sparsity", None)
        if name is not None and sparsity is not None:
            out[str(name)] = float(sparsity)
    return out


class RuntimeAccess:
    runtime = None            # the one Runtime, once created

    def pruning_runtime(self) -> Runtime:
        """The model's pruning runtime (the phase schedule's state), created once."""
        if self.runtime is None:
            self.runtime = Runtime(self.plan, self.module, self.masks, self.weight, target_sparsities(self.targets))
        return self.runtime

    def param_groups(self, **kw):
        return self.pruning_runtime().param_groups(**kw)

    def attach(self, optimizer):
        return self.pruning_runtime().attach(optimizer)

    def start(self):
        """Apply step 0's actions without an optimizer (prune a pretrained model)."""
        return self.pruning_runtime().start()

    def step(self):
        return self.pruning_runtime().step()

    def state_dict(self):
        return self.pruning_runtime().state_dict()

    def load_state_dict(self, state):
        return self.pruning_runtime().load_state_dict(state)

    @property
    def events(self):
        return self.pruning_runtime().events

    @property
    def phase(self):
        return self.pruning_runtime().phase
