"""planc: a declarative pruning-plan compiler over torch.fx graphs.

    plan = planc.load_plan("plans/digits-sapp.yaml")
    pruned = planc.compile(model, plan, example_inputs)
    ...train, calling pruned.step() after each optimizer step...
    fast = planc.lower(pruned.bake(), backend="auto")

The public names are imported lazily so that `import planc` stays cheap (the CLI's
`validate` should not pay for torch.export).
"""
from __future__ import annotations

__version__ = "0.1.0"

from planc.errors import PlancError, PlanError, PassError, Problem  # noqa: F401


def load_plan(source, *, file=None):
    """A resolved, validated Plan from a path, YAML text or a dict. Raises PlanError."""
    from planc.plan.load import load_plan as _load   # lazy: see the module doc

    return _load(source, file=file)


def compile(model, plan, example_inputs=None, **kwargs):
    """trace + select + insert_masks: a Pruned object (see planc.pruned)."""
    from planc.pruned import compile as _compile   # lazy: see the module doc

    return _compile(model, plan, example_inputs, **kwargs)


def lower(graph_module, backend: str = "auto", *, example_inputs=None, **kwargs):
    """Rewrite baked pruned layers to block-sparse kernels (planc.passes.lower), keeping
    the result only if the whole model measures at least min_speedup faster on
    `example_inputs` (or the shapes the graph records); see planc.lowering.lower_checked."""
    from planc.lowering import lower_checked   # lazy: see the module doc

    return lower_checked(graph_module, backend=backend, example_inputs=example_inputs, **kwargs)


def obs_prune(pruned, batches, **kwargs):
    """Prune a compiled pretrained model once, by block OBS on calibration batches, and
    reconstruct its kept weights (plans with method obs; planc.obs). Call before attach."""
    from planc.obs import obs_prune as _obs   # lazy: see the module doc

    return _obs(pruned, batches, **kwargs)


def save(out, pruned, *, baked=None, lowered=None, example_inputs=None, overwrite=False):
    """Write a run folder for a model pruned in your own loop (see planc.runfolder.save):
    then `planc.load(out)` gives the lowered model back, without your code."""
    from planc.runfolder import save as _save   # lazy: see the module doc

    return _save(out, pruned, baked=baked, lowered=lowered, example_inputs=example_inputs, overwrite=overwrite)


def load(run_dir, model=None, *, lowered=True, trust_factory=False):
    """The model a run folder holds, rebuilt with no pickle and no code from the folder:
    its lowered program (block-sparse kernels), or with `lowered=False` its baked program
    (dense layout, pruned blocks zero). `model=` loads the baked weights into your own
    module instead. See planc.runfolder and docs/robustness.md (the trust model)."""
    from planc.runfolder import load as _load   # lazy: see the module doc

    return _load(run_dir, model, lowered=lowered, trust_factory=trust_factory)
