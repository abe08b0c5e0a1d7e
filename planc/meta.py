"""Keys under which passes record what they learn in `node.meta`. Defined once here so
that every pass and tool reads the same names; nothing is stored as ad-hoc attributes
on fx nodes."""

# passes.select: a planc.passes.select.TargetInfo for every node that applies a weight
# as a linear map or convolution (skipped ones too, with their reason).
TARGET = "planc.target"
# passes.insert_masks: the qualified name of the BlockMask module the weight flows through.
MASK = "planc.mask"
# passes.bake: a dict with the achieved sparsity of the layer (blocks and weights).
BAKED = "planc.baked"
# passes.lower: a dict saying what the lower pass did with the node and why.
LOWERED = "planc.lowered"
