"""The pruning runtime: the phase schedule, the four methods, and the state that
`Pruned.param_groups/attach/step/state_dict` delegate to (see planc.runtime.runtime)."""
from planc.runtime.runtime import Runtime  # noqa: F401
from planc.runtime.methods import make_method  # noqa: F401
