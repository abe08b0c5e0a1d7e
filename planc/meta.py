"""What passes record in `node.meta`: the keys, and the records stored under them.

Every record is a small frozen dataclass defined here, so every pass and tool reads the
same fields; nothing is stored as ad-hoc attributes on fx nodes or as free-form dicts.

    TARGET   select: a TargetInfo for every node that applies a weight as a linear map or
             convolution (skipped ones too, with their reason)
    MASK     insert_masks: the qualified name (str) of the BlockMask the weight flows through
    BAKED    bake: a BakedRecord (the layer's block and achieved sparsity)
    LOWERED  lower: a LoweredRecord (what the lower pass did with the node and why)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from planc.blocks import sparsify_grid_count

TARGET = "planc.target"
MASK = "planc.mask"
BAKED = "planc.baked"
LOWERED = "planc.lowered"


@dataclass(frozen=True)
class WeightReader:
    """One use of a weight: the module that reads it and how."""

    module_name: str          # qualified module name ('' for the model's own forward)
    kind: str                 # 'linear' | 'linear^T' | 'conv2d' | 'embedding' | an op's name
    weight_target: str        # the dotted name the graph reads it by

    @property
    def label(self) -> str:
        return self.module_name or self.weight_target


@dataclass(frozen=True)
class TargetInfo:
    name: str                             # layer name (weight path without `.weight`)
    op: str                               # linear | conv2d
    module_type: str                      # class name of the applying module
    weight_shape: Tuple[int, ...]
    weight_target: str                    # dotted parameter path in the GraphModule
    block: Tuple[int, int]
    sparsity: float                       # the layer's target sparsity (in blocks)
    min_blocks: int
    grid: Tuple[int, int]
    num_blocks: int
    rule: Optional[int]                   # index of the deciding rule in targets.rules
    skip_reason: Optional[str]            # None: the layer is pruned
    order: int                            # position among layers, in graph (topological) order
    module_name: str = ""
    bias_target: Optional[str] = None
    transposed: bool = False              # weight stored (in, out): a Conv1D-style linear
    shared_with: Tuple[WeightReader, ...] = ()   # the weight's other uses (tied weights)

    @property
    def targeted(self) -> bool:
        return self.skip_reason is None

    @property
    def blocks_kept(self) -> int:
        """Blocks alive at the target sparsity (all of them for a dense layer)."""
        return self.num_blocks - (sparsify_grid_count(self.num_blocks, self.sparsity) if self.targeted else 0)


@dataclass(frozen=True)
class BakedRecord:
    """What bake did to a layer's weight, counted from the baked weight (a block is pruned
    when all its entries are zero)."""

    block: Tuple[int, int]
    blocks: int
    blocks_pruned: int
    block_sparsity: float
    weights: int
    weights_zero: int
    weight_sparsity: float


@dataclass(frozen=True)
class LoweredRecord:
    """What the lower pass did with a weight node ("lowered" or "dense") and why."""

    layer: str
    op: str
    shape: Tuple[int, ...]
    action: str
    backend: str
    block: Optional[Tuple[int, int]]
    density: float
    predicted_speedup: Optional[float]
    reason: str
    measured_speedup: Optional[float] = None
