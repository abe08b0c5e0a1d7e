"""The block view: grids, partial edge blocks, the conv column order, BSR round trips."""
import pytest
import torch

from planc.blocks import BlockView, sparsify_grid_count

SHAPES = [((10, 7), (4, 3)), ((32, 48), (16, 16)), ((6, 5, 3, 3), (4, 5)), ((8, 2, 1, 1), (8, 2))]


@pytest.mark.parametrize("shape,block", SHAPES)
def test_blocks_round_trip_and_grid(shape, block):
    view = BlockView(shape, block)
    w = torch.randn(shape)
    R, C = view.matrix_shape
    assert view.grid == (-(-R // block[0]), -(-C // block[1]))
    assert torch.equal(view.from_blocks(view.to_blocks(w)), w)
    assert torch.equal(view.from_matrix(view.to_matrix(w)), w)


def test_conv_view_puts_input_channel_fastest():
    # weight[o, i, y, x] must land at column (y*kw + x)*cin + i of the matrix view
    out, cin, kh, kw = 3, 4, 2, 3
    w = torch.arange(out * cin * kh * kw, dtype=torch.float32).reshape(out, cin, kh, kw)
    m = BlockView(w.shape, (1, cin)).to_matrix(w)
    for o in range(out):
        for i in range(cin):
            for y in range(kh):
                for x in range(kw):
                    assert m[o, (y * kw + x) * cin + i] == w[o, i, y, x]
    # with block width cin, a block is exactly the input channels at one kernel tap
    blocks = BlockView(w.shape, (1, cin)).to_blocks(w)
    assert torch.equal(blocks[0, 4, 0], w[0, :, 1, 1])


@pytest.mark.parametrize("shape,block", SHAPES)
def test_block_norms_match_a_direct_loop(shape, block):
    view = BlockView(shape, block)
    w = torch.randn(shape, dtype=torch.float64)
    m = view.to_matrix(w)
    r, c = block
    norms = view.block_norms(w)
    for i in range(view.grid[0]):
        for j in range(view.grid[1]):
            ref = m[i * r:(i + 1) * r, j * c:(j + 1) * c].norm()
            assert torch.isclose(norms[i, j], ref)


@pytest.mark.parametrize("shape,block", SHAPES)
def test_expand_and_bsr_agree_on_the_support(shape, block):
    view = BlockView(shape, block)
    g = torch.Generator().manual_seed(0)
    alive = torch.rand(view.grid, generator=g) > 0.5
    w = torch.randn(shape, generator=g) * view.expand(alive.float())
    assert torch.equal(view.block_norms(w) > 0, alive)
    values, crow, col = view.to_bsr(w, alive)
    assert values.shape == (int(alive.sum()), *block)
    assert int(crow[-1]) == int(alive.sum())
    assert torch.equal(view.from_bsr(values, crow, col), w)
    # default support: blocks with any nonzero entry
    assert torch.equal(view.from_bsr(*view.to_bsr(w)), w)


def test_expand_is_differentiable():
    view = BlockView((4, 6), (2, 3))
    grid = torch.ones(view.grid, requires_grad=True)
    (view.expand(grid) * torch.arange(24.0).reshape(4, 6)).sum().backward()
    assert grid.grad.shape == view.grid and grid.grad[0, 0] == 0 + 1 + 2 + 6 + 7 + 8


@pytest.mark.parametrize("bad,match", [
    (dict(weight_shape=(3,), block=(1, 1)), "2-D"),
    (dict(weight_shape=(4, 4), block=(0, 2)), "two positive integers"),
    (dict(weight_shape=(4, 4), block=(2,)), "two positive integers"),
])
def test_bad_views_say_what_was_expected(bad, match):
    with pytest.raises(ValueError, match=match):
        BlockView(**bad)


def test_wrong_weight_shape_is_named():
    with pytest.raises(ValueError, match=r"expected a weight of shape \(4, 4\), got \(4, 5\)"):
        BlockView((4, 4), (2, 2)).to_blocks(torch.zeros(4, 5))


def test_sparsify_grid_count_keeps_round_half_up_and_at_least_one_block():
    assert sparsify_grid_count(1024, 0.9) == 1024 - 102      # keep round(102.4) = 102
    assert sparsify_grid_count(10, 0.95) == 9                # keep 0.5 -> 1, never 0
    assert sparsify_grid_count(10, 0.85) == 8                # keep 1.5 -> 2 (half up)
    assert sparsify_grid_count(4, 0.999) == 3
    assert sparsify_grid_count(7, 0.0) == 0


@pytest.mark.parametrize("shape,block,transposed", [
    ((64, 48), (16, 8), False), ((48, 64), (8, 16), True), ((32, 16, 3, 3), (8, 4), False),
    ((30, 50), (8, 16), False), ((32, 6, 3, 3), (8, 4), False), ((64, 48), (1, 1), False)])
def test_scale_equals_the_expanded_product_with_the_same_gradients(shape, block, transposed):
    """scale(W, g) is W ⊙ expand(g), values and gradients for both W and g, whether it
    broadcasts over a blocked view (exact tiling) or falls back to expand (partial blocks,
    conv blocks across channel slabs)."""
    from planc.blocks import BlockView

    view = BlockView(shape, block, transposed)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    grid = torch.randn(view.grid, generator=g, dtype=torch.float64, requires_grad=True)
    ref = w * view.expand(grid)
    got = view.scale(w, grid)
    assert torch.equal(got, ref)
    probe = torch.randn(shape, generator=g, dtype=torch.float64)
    gw_ref, gg_ref = torch.autograd.grad((ref * probe).sum(), (w, grid))
    gw, gg = torch.autograd.grad((got * probe).sum(), (w, grid))
    assert torch.equal(gw, gw_ref) and torch.allclose(gg, gg_ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("slab", [1, 40, 1 << 18])
@pytest.mark.parametrize("wants", [(True, True), (True, False), (False, True)])
def test_scale_backward_by_slabs_matches_the_expanded_product(monkeypatch, slab, wants):
    """The blocked scale's own backward (one read of the gradient per slab of block rows)
    gives autograd's gradients of W ⊙ expand(g), whatever the slab size (one block row,
    a slab that does not divide the grid, the whole weight) and whichever inputs want one."""
    from planc import blocks
    from planc.blocks import BlockView

    monkeypatch.setattr(blocks._ScaleBlocks, "SLAB_ELEMENTS", slab)
    view = BlockView((48, 40), (8, 4))              # grid 6×10, a block row is 320 elements
    g = torch.Generator().manual_seed(2)
    w = torch.randn(48, 40, generator=g, dtype=torch.float64, requires_grad=wants[0])
    grid = torch.randn(view.grid, generator=g, dtype=torch.float64, requires_grad=wants[1])
    probe = torch.randn(48, 40, generator=g, dtype=torch.float64)
    inputs = [t for t in (w, grid) if t.requires_grad]
    got = torch.autograd.grad((view.scale(w, grid) * probe).sum(), inputs)
    ref = torch.autograd.grad((w * view.expand(grid) * probe).sum(), inputs)
    for a, b in zip(got, ref):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert len(got) == sum(wants)


@pytest.mark.parametrize("shape,block,transposed", [
    ((64, 48), (16, 8), False), ((48, 64), (8, 16), True), ((32, 16, 3, 3), (8, 4), False), ((30, 50), (8, 16), False)])
def test_zero_blocks_in_place_equals_the_expanded_fill(shape, block, transposed):
    from planc.blocks import BlockView

    view = BlockView(shape, block, transposed)
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g)
    grid = torch.rand(view.grid, generator=g) < 0.5
    expected = w.masked_fill(view.expand(grid), 0)
    view.zero_blocks_(w, grid)
    assert torch.equal(w, expected) and bool(grid.any())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scale_backward_is_itself_differentiable(dtype):
    """create_graph=True through the blocked scale (a gradient penalty on the logits, a
    second derivative): the same second derivatives as W ⊙ expand(g). The fast backwards
    (slabs with out=, the native kernel) are not recorded by autograd, so this once raised."""
    from planc.blocks import BlockView

    view = BlockView((64, 96), (32, 32))
    g = torch.Generator().manual_seed(4)
    w = torch.randn(64, 96, generator=g, dtype=dtype, requires_grad=True)
    grid = torch.rand(view.grid, generator=g, dtype=dtype, requires_grad=True)
    results = []
    for scaled in (view.scale(w, grid), w * view.expand(grid)):
        first, = torch.autograd.grad((scaled * scaled).sum(), grid, create_graph=True)
        results.append((first,) + torch.autograd.grad(first.square().sum(), (w, grid)))
    for got, ref in zip(*results):
        assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4)
