"""The native CPU kernel (kernels/native.c) against float64 references: every layout,
input stride, partial edge block, empty block-row and token count the threads split;
its packed-weight cache; and the fallbacks when it cannot be built."""
import subprocess
import sys

import pytest
import torch

from planc.kernels import cpu, native
from planc.kernels.format import BlockSparseMatrix

from _kernel_cases import SHAPES, SPARSITIES, TOL, make, rel_err

needs_native = pytest.mark.skipif(native.why_unavailable() is not None,
                                  reason=f"native kernel unavailable: {native.why_unavailable()}")


def supported(block) -> bool:
    return native.supports(block[0], torch.float32, torch.device("cpu"))


def index_of(bsm: BlockSparseMatrix):
    return (bsm.crow, bsm.col, bsm.row, bsm.tcrow, bsm.trow, bsm.tperm)


@needs_native
@pytest.mark.parametrize("R,C,block", [s for s in SHAPES if s[2][0] % 8 == 0])   # vector-wide rows
@pytest.mark.parametrize("sparsity", SPARSITIES + [0.9])
@pytest.mark.parametrize("layout", ["c", "t"])
@pytest.mark.parametrize("x_layout", ["rows", "transposed", "strided"])
@pytest.mark.parametrize("M", [0, 1, 7, 37, 203])
def test_native_matches_float64_reference(R, C, block, sparsity, layout, x_layout, M):
    if not supported(block):
        pytest.skip(f"{block[0]}-row blocks are not a multiple of this build's vector width")
    bsm, alive = make(R, C, block, sparsity, torch.float32, seed=R + C + M)
    g = torch.Generator().manual_seed(M)
    x64 = torch.randn(M, C, generator=g, dtype=torch.float64)
    x = {"rows": x64.float(),
         "transposed": x64.float().t().contiguous().t(),            # what the other CPU paths return
         "strided": torch.cat([x64.float(), x64.float()], 1)[:, :C]}[x_layout]
    bias = torch.randn(R, generator=g, dtype=torch.float64)
    ref = x64 @ bsm.to_dense().double().t() + bias
    for order, values in (("row", bsm.values), ("col", bsm.grouped_by_column())):
        y = native.forward(x, values, order, bsm.crow, bsm.col, bsm.tperm, bias.float(), (R, C), layout=layout)
        assert y.shape == (M, R) and y.dtype == torch.float32
        assert y.is_contiguous() if layout == "c" else y.t().is_contiguous()
        assert rel_err(y, ref) <= TOL[torch.float32], (order, rel_err(y, ref))
    y = native.forward(x, bsm.values, "row", bsm.crow, bsm.col, bsm.tperm, None, (R, C), layout=layout)
    assert rel_err(y, ref - bias) <= TOL[torch.float32]


@needs_native
@pytest.mark.parametrize("M", [1000, 100, 9])      # split by tokens; by block-rows (few tokens)
def test_native_split_over_threads_matches_one_thread(M, monkeypatch):
    monkeypatch.setattr(native, "MIN_FLOPS_TO_SPLIT", 0)
    bsm, _ = make(256, 192, (32, 32), 0.7, torch.float32, seed=5)
    x = torch.randn(M, 192, dtype=torch.float64)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.forward(x.float(), bsm.values, "row", bsm.crow, bsm.col, bsm.tperm, None, bsm.shape)
        torch.set_num_threads(3)
        three = native.forward(x.float(), bsm.values, "row", bsm.crow, bsm.col, bsm.tperm, None, bsm.shape)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, three)          # each token's sums in the same order: bitwise
    assert rel_err(three, x @ bsm.to_dense().double().t()) <= TOL[torch.float32]


@needs_native
def test_packed_blocks_follow_in_place_changes_of_the_values():
    """The packed copy is reused only while the values are unchanged (version counter)."""
    bsm, _ = make(64, 64, (32, 32), 0.0, torch.float32, seed=1)
    values = bsm.values.clone()
    x = torch.randn(16, 64)
    first = native.forward(x, values, "row", bsm.crow, bsm.col, bsm.tperm, None, bsm.shape)
    with torch.no_grad():
        values.mul_(2)
    second = native.forward(x, values, "row", bsm.crow, bsm.col, bsm.tperm, None, bsm.shape)
    assert torch.allclose(second, 2 * first, rtol=1e-5, atol=1e-5)


@needs_native
def test_auto_takes_native_for_sparse_fp32_and_the_op_is_exact():
    from planc.kernels.cost import choose_cpu_strategy
    assert choose_cpu_strategy(4096, (384, 384), (32, 32), 0.1, native=True) == "native"
    assert choose_cpu_strategy(4096, (384, 384), (32, 32), 0.1, native=False) != "native"
    assert choose_cpu_strategy(4096, (384, 384), (32, 32), 0.95, native=True) != "native"
    bsm, _ = make(96, 64, (32, 32), 0.6, torch.float32, seed=2)
    x = torch.randn(50, 64, dtype=torch.float64)
    ref = x @ bsm.to_dense().double().t()
    for layout in ("c", "t"):
        y = cpu.forward_stored(x.float(), bsm.values, "row", index_of(bsm), None, bsm.shape, "native", layout=layout)
        assert rel_err(y, ref) <= TOL[torch.float32]


def test_without_the_native_kernel_the_strategy_falls_back(monkeypatch):
    """A layer asked to run "native" where it cannot (no compiler, another dtype) still
    computes its product, through the torch formulation of the same loop."""
    monkeypatch.setattr(native, "library", lambda: None)
    assert not native.supports(32, torch.float32, torch.device("cpu"))
    bsm, _ = make(64, 96, (32, 32), 0.6, torch.float32, seed=3)
    x = torch.randn(20, 96, dtype=torch.float64)
    y = cpu.forward_stored(x.float(), bsm.values, "row", index_of(bsm), None, bsm.shape, "native")
    assert rel_err(y, x @ bsm.to_dense().double().t()) <= TOL[torch.float32]
    with pytest.raises(ValueError, match="native CPU kernel"):
        cpu.forward(x.float(), bsm, strategy="native")


def _fresh_process(env_extra, tmp_path):
    """why_unavailable() in a new process (library() is cached per process)."""
    import os

    env = dict(os.environ, PLANC_NATIVE_CACHE=str(tmp_path / "native"), **env_extra)
    code = "from planc.kernels import native; print(native.why_unavailable())"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_unavailable_is_said_in_words(tmp_path):
    off = _fresh_process({"PLANC_NATIVE": "0"}, tmp_path)
    assert off.returncode == 0 and "PLANC_NATIVE=0" in off.stdout
    failing = tmp_path / "bad-cc"
    failing.write_text("#!/bin/sh\necho 'no such thing' >&2\nexit 1\n")
    failing.chmod(0o755)
    broken = _fresh_process({"CC": str(failing)}, tmp_path)
    assert broken.returncode == 0 and "build failed" in broken.stdout, broken.stdout + broken.stderr
    assert not list((tmp_path / "native").glob("*.so"))          # nothing half-built left


@needs_native
def test_a_damaged_library_in_the_cache_is_rebuilt(tmp_path):
    first = _fresh_process({}, tmp_path)
    assert first.stdout.strip() == "None", first.stdout + first.stderr
    (built,) = (tmp_path / "native").glob("*.so")
    built.write_bytes(b"\x7fELF not really")
    again = _fresh_process({}, tmp_path)
    assert again.stdout.strip() == "None", again.stdout + again.stderr
    assert built.stat().st_size > 1000


@needs_native
@pytest.mark.parametrize("march", ["x86-64-v3", "x86-64-v2"])
def test_narrower_vector_builds_match_the_reference(march, tmp_path, monkeypatch):
    """The AVX2 (8-wide vectors, 12 accumulators) and SSE builds another CPU gets, built
    and run here: every micro-tile width and block size they take."""
    import platform

    if platform.machine() != "x86_64":
        pytest.skip("x86-64 builds")
    flags = [f if f != "-march=native" else f"-march={march}" for f in native.FLAGS]
    target = tmp_path / "narrow.so"
    native._build(native._compiler(), target, flags)
    lib = native.load(target)
    assert lib.planc_native_vector_width() == 8       # no AVX-512: 8-float vectors (SSE: in pairs)
    monkeypatch.setattr(native, "library", lambda: lib)
    for R, C, block in [(64, 96, (32, 32)), (48, 64, (16, 16)), (33, 50, (8, 8)), (128, 128, (64, 64))]:
        bsm, _ = make(R, C, block, 0.6, torch.float32, seed=R)
        x = torch.randn(45, C, dtype=torch.float64)
        bias = torch.randn(R, dtype=torch.float64)
        ref = x @ bsm.to_dense().double().t() + bias
        for layout in ("c", "t"):
            y = native.forward(x.float(), bsm.values, "row", bsm.crow, bsm.col, bsm.tperm, bias.float(), (R, C),
                               layout=layout)
            assert rel_err(y, ref) <= TOL[torch.float32], (march, block, layout)


@needs_native
@pytest.mark.parametrize("R,C,block", [s for s in SHAPES if s[2][1] % 8 == 0])
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 0.9])
def test_native_grad_input_matches_float64_reference(R, C, block, sparsity):
    """dX = dY·W through the transposed index, for the layer's blocks in either order."""
    if not native.supports(block[1], torch.float32, torch.device("cpu")):
        pytest.skip(f"{block[1]}-column blocks are not a multiple of this build's vector width")
    bsm, _ = make(R, C, block, sparsity, torch.float32, seed=R * 3 + C)
    dy = torch.randn(77, R, dtype=torch.float64)
    ref = dy @ bsm.to_dense().double()
    for order, values in (("row", bsm.values), ("col", bsm.grouped_by_column())):
        dx = native.grad_input(dy.float(), values, order, bsm.tcrow, bsm.trow, bsm.tperm, (R, C))
        assert dx.shape == (77, C) and dx.is_contiguous()
        assert rel_err(dx, ref) <= TOL[torch.float32], order
    assert rel_err(cpu.grad_input(dy.float(), bsm), ref) <= TOL[torch.float32]


@needs_native
@pytest.mark.parametrize("shape,block", [((64, 96), (32, 32)), ((48, 40), (8, 4)), ((30, 50), (5, 10)),
                                         ((256, 2048), (32, 32)), ((32, 6, 3, 3), (8, 6))])
@pytest.mark.parametrize("wants", [(True, True), (True, False), (False, True)])
def test_native_block_scale_matches_the_float64_product(shape, block, wants, monkeypatch):
    """The dense phase's mask, W ⊙ expand(S), through the native kernel (fp32): values and
    both gradients against float64 autograd of the expanded product; the kernel is used."""
    from planc.blocks import BlockView

    calls = []
    for name in ("scale_blocks", "scale_blocks_backward"):
        real = getattr(native, name)
        monkeypatch.setattr(native, name, lambda *a, _real=real, _name=name: (calls.append(_name), _real(*a))[1])
    view = BlockView(shape, block)
    g = torch.Generator().manual_seed(7)
    w64 = torch.randn(shape, generator=g, dtype=torch.float64)
    s64 = torch.rand(view.grid, generator=g, dtype=torch.float64) * 2
    probe = torch.randn(shape, generator=g, dtype=torch.float64)
    w = w64.float().requires_grad_(wants[0])
    s = s64.float().requires_grad_(wants[1])
    got = view.scale(w, s)
    ref64 = w64 * view.expand(s64)
    assert rel_err(got, ref64) <= TOL[torch.float32]
    native_path = view.blocked(w) is not None          # the conv case takes its own route
    assert ("scale_blocks" in calls) == native_path
    w64.requires_grad_(wants[0])
    s64.requires_grad_(wants[1])
    grads = torch.autograd.grad((got * probe.float()).sum(), [t for t in (w, s) if t.requires_grad])
    refs = torch.autograd.grad((w64 * view.expand(s64) * probe).sum(), [t for t in (w64, s64) if t.requires_grad])
    for a, b in zip(grads, refs):
        assert a.dtype == torch.float32 and rel_err(a, b) <= 1e-5
    assert ("scale_blocks_backward" in calls) == (wants[1] and native_path)


def test_the_cost_model_splits_where_the_kernel_does():
    """kernels/cost.py's model of the native kernel splits threads where the kernel does."""
    from planc.kernels import cost

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        few = cost._cpu_native_s(16, 128, 1600, 32, 32)            # 16 tokens: split by block-rows
        torch.set_num_threads(1)
        assert cost._cpu_native_s(16, 128, 1600, 32, 32) > 1.8 * (few - cost._CPU_NATIVE_OVERHEAD_S)
    finally:
        torch.set_num_threads(before)
