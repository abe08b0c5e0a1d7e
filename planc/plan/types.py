"""The resolved plan: frozen dataclasses with every default filled and every preset
expanded into explicit phases, so that everything downstream reads one typed object.

The loader (planc.plan.load) builds these from YAML after schema and semantic checks;
nothing else constructs them from untyped dicts. Key names mirror the plan file.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple, Union

from planc.errors import Problem
from planc.plan.registry import DEFAULT_METHOD

# Phase kinds. dense: every block alive, nothing pruned (revived blocks restart at zero);
# sparsify: prune gradually along `curve` to the layer's target by the phase's end;
# sparse / finetune: reach the target at once at the phase start if not there yet
# (a one-shot top-k), then hold the support fixed.
PHASE_KINDS = ("dense", "sparsify", "sparse", "finetune")
CURVES = ("exponential", "cubic")


def _freeze(mapping: Mapping[str, Any] | None) -> Tuple[Tuple[str, Any], ...]:
    return tuple(sorted((mapping or {}).items()))


@dataclass(frozen=True)
class Factory:
    """An importable `module:callable` and its keyword arguments (a sorted tuple of pairs
    so the dataclass stays hashable; `.kwargs_dict()` gives a dict)."""

    path: str
    kwargs: Tuple[Tuple[str, Any], ...] = ()

    def kwargs_dict(self) -> dict:
        return dict(self.kwargs)


@dataclass(frozen=True)
class ModelSpec:
    factory: Optional[Factory] = None                     # None: Python users pass a module
    example_inputs: Tuple[Tuple[int, ...], ...] = ()      # float32 input shapes used to trace
    input_dtype: str = "float32"                          # float32 | int64 (token ids)
    frontend: str = "export"                              # export | symbolic | auto
    dynamic_batch: bool = True


@dataclass(frozen=True)
class Match:
    """A rule's condition; all given fields must hold. None means "any"."""

    type: Optional[str] = None        # module class name: Linear, Conv2d, ...
    name: Optional[str] = None        # fnmatch glob on the qualified name
    position: Optional[str] = None    # first | last (in graph order among targets)


@dataclass(frozen=True)
class TargetSettings:
    block: Tuple[int, int] = (16, 16)
    sparsity: float = 0.9
    min_blocks: int = 100


@dataclass(frozen=True)
class Rule:
    match: Match
    skip: bool = False
    block: Optional[Tuple[int, int]] = None      # None: inherit the defaults
    sparsity: Optional[float] = None
    min_blocks: Optional[int] = None
    index: int = 0                               # its position in targets.rules


@dataclass(frozen=True)
class Targets:
    defaults: TargetSettings = TargetSettings()
    rules: Tuple[Rule, ...] = ()
    budget: str = "per_layer"                    # per_layer (paper) | global


@dataclass(frozen=True)
class Method:
    name: str = DEFAULT_METHOD                   # planc.plan.registry: which keys each method takes
    # attention methods
    score: str = "attention"                     # attention | magnitude
    c: float = 4.0                               # default constant of sparsify phases
    update_every: int = 1                        # steps between pruning updates in sparsify
    # clip the attention weights A: 'density' (the paper's, Appendix C.1: [d, 1/d], d the layer's
    # target density; planc.mask.clip_range), [lo, hi], or None (no clipping)
    clip: Union[str, Tuple[float, float], None] = "density"
    logits_lr: Optional[float] = None            # None: the weights' learning rate
    logits_weight_decay: Optional[float] = None  # None: the weights' weight decay (paper)
    # reparameterised methods
    alpha: float = 2.0
    granularity: str = "block"                   # block (paper's block variant) | element
    # ACDC: keep the raw weights of pruned blocks behind a zero mask (the paper's Criteo runs,
    # "masking instead of pruning"): revived blocks come back with their old values
    masking: bool = False
    # a method whose variant names its preset
    variant: str = "oneshot"                     # oneshot | gradual | pretrained
    # block OBS (planc.obs): training batches it calibrates on, and the damping of X^T X
    calibration_batches: int = 64
    damp: float = 0.01


@dataclass(frozen=True)
class Phase:
    kind: str                                    # one of PHASE_KINDS
    start: int                                   # first step of the phase (0-based)
    steps: int
    curve: Optional[str] = None                  # sparsify only: exponential | cubic
    c: Optional[float] = None                    # exponential only
    initial: float = 0.0                         # sparsify: fraction of the target at t=0
    every: int = 1                               # sparsify: steps between pruning updates

    @property
    def end(self) -> int:
        return self.start + self.steps


@dataclass(frozen=True)
class Schedule:
    phases: Tuple[Phase, ...]
    preset: Optional[str] = None                 # the preset they were expanded from
    sparse_kernels: Union[str, bool] = "auto"    # fixed-support phases on the kernels: auto | true | false

    @property
    def total_steps(self) -> int:
        return self.phases[-1].end if self.phases else 0


@dataclass(frozen=True)
class Optimizer:
    name: str = "sgd"                            # sgd | adam | adamw
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    betas: Tuple[float, float] = (0.9, 0.999)
    fused: bool = False                          # torch's fused optimizer step (one kernel for all parameters)


@dataclass(frozen=True)
class Distill:
    """train.distill: the loss is task·train.loss(out, y) + output·L_out(out, out_T)
    + hidden·mean over taps of ‖h − h_T‖² / ‖h_T‖² (planc.distill; docs/runtime.md)."""

    teacher: Optional[Factory] = None            # None: the dense model itself, frozen before masking
    task: float = 0.0                            # weight of train.loss against the data's targets
    output: float = 1.0                          # weight of the output loss
    output_loss: str = "auto"                    # auto (kl for cross_entropy, else mse) | mse | cosine | kl
    temperature: float = 1.0                     # kl only
    hidden: float = 0.0                          # weight of the hidden-state loss
    modules: Tuple[str, ...] = ()                # module name patterns whose outputs are the hidden states


@dataclass(frozen=True)
class Train:
    data: Optional[Factory] = None               # returns (train_loader, eval_loader)
    steps: int = 1000
    optimizer: Optimizer = Optimizer()
    lr_schedule: str = "constant"                # constant | cosine | linear
    warmup_steps: int = 0
    eval_every: int = 0                          # 0: only at the end
    checkpoint_every: int = 0                    # 0: no checkpoints
    loss: str = "cross_entropy"                  # cross_entropy | mse
    seed: int = 0
    distributed: str = "ddp"                     # under torchrun: ddp | fsdp (planc.sharding)
    dropout: bool = True                         # False: dropout off while training
    precision: str = "float32"                   # float32 | bfloat16 (autocast of the training forward) | auto
    distill: Optional[Distill] = None            # None: train on train.loss alone


@dataclass(frozen=True)
class Lower:
    backend: str = "auto"                        # auto | triton | cpu | dense
    dtype: Optional[str] = None                  # None: keep the model's dtype
    min_speedup: float = 1.0                     # lower a layer only if predicted faster
    # the input shapes `planc apply` decides and times the lowering on: the batch the model
    # will serve, which can differ from the small one it is traced on; () = model.example_inputs
    example_inputs: Tuple[Tuple[int, ...], ...] = ()


@dataclass(frozen=True)
class Plan:
    version: int = 1
    name: str = "plan"
    model: ModelSpec = ModelSpec()
    targets: Targets = Targets()
    method: Method = Method()
    schedule: Schedule = Schedule(phases=())
    train: Train = Train()
    lower: Lower = Lower()
    output: Optional[str] = None
    source: Optional[str] = field(default=None, compare=False)   # file it came from
    # where each value stood in the file (planc.plan.positions.Positions), so errors
    # found after loading (a factory that will not import, ...) still name line and column
    positions: Any = field(default=None, compare=False, repr=False)

    def problem(self, path: str, message: str) -> Problem:
        """A Problem at `path` ("train.data", "targets.rules[1].block") of this plan,
        placed at its line and column when the plan came from YAML text."""
        if self.positions is not None:
            return self.positions.problem_at(path, message)
        return Problem(message=message, path=path, file=self.source or "<plan>")
