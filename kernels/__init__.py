"""Block-sparse formats and kernels (installed as planc.kernels).

    format.py      BlockSparseMatrix: the one object passed between layers and kernels
    ops.py         block_sparse_linear (public op) → autograd Function → launcher
    triton_bsr.py  Triton kernels (GPU; Triton's interpreter on CPU in tests)
    cpu.py         the CPU path (column panels; torch.sparse BSR; dense)
    conv.py        Conv2d through a channels-last im2col
    cost.py        whether the sparse op beats dense, for the lower pass

triton_bsr is not imported here: TRITON_INTERPRET is read when its kernels are decorated.
"""
from planc.kernels.format import BlockSparseMatrix  # noqa: F401
from planc.kernels.ops import BlockSparseLinear, block_sparse_linear  # noqa: F401
