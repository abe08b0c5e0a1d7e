"""RuntimeAccess: the training-time methods of a Pruned object, written once.

Anything with `.module`, `.plan`, `.masks` and `.weight(name)` (planc.pruned.Pruned, or
a test's stand-in) mixes this in to get `param_groups`, `attach`, `start`, `step`, `state_dict`,
`load_state_dict`, `events` and `phase`, all delegating to one Runtime created on
first use."""
from __future__ import annotations


class RuntimeAccess:
    runtime = None

    def _rt(self):
        if self.runtime is None:
            from planc.runtime import Runtime

            self.runtime = Runtime(self)
        return self.runtime

    def param_groups(self, **kw):
        return self._rt().param_groups(**kw)

    def attach(self, optimizer):
        return self._rt().attach(optimizer)

    def start(self):
        """Apply step 0's actions without an optimizer (prune a pretrained model)."""
        return self._rt().start()

    def step(self):
        return self._rt().step()

    def state_dict(self):
        return self._rt().state_dict()

    def load_state_dict(self, state):
        return self._rt().load_state_dict(state)

    @property
    def events(self):
        return self._rt().events

    @property
    def phase(self):
        return self._rt().phase
