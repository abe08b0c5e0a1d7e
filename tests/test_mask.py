"""BlockMask: the effective weight in each mode, against direct computations."""
import pytest
import torch

from planc.blocks import BlockView
from planc.mask import BlockMask


def _random_alive(view, seed=0):
    alive = torch.rand(view.grid, generator=torch.Generator().manual_seed(seed)) > 0.4
    alive[0, 0] = True
    return alive


@pytest.mark.parametrize("shape,block", [((32, 48), (16, 16)), ((10, 7), (4, 3)), ((6, 4, 3, 3), (3, 8))])
def test_attention_mode_with_zero_logits_is_the_identity(shape, block):
    mask = BlockMask(shape, block, "attention")
    w = torch.randn(shape)
    assert torch.allclose(mask(w), w, atol=1e-6)
    assert torch.allclose(mask.attention(), torch.ones(mask.view.grid))


def test_attention_mode_scales_each_block_by_n_softmax_and_zeroes_pruned_blocks():
    mask = BlockMask((8, 12), (4, 4), "attention")
    with torch.no_grad():
        mask.logits.copy_(torch.randn(mask.view.grid))
    mask.alive.copy_(_random_alive(mask.view))
    w = torch.randn(8, 12, dtype=torch.float64)
    a = 6 * torch.softmax(mask.logits.detach().flatten().double(), 0).view(2, 3)
    ref = w.clone()
    for i in range(2):
        for j in range(3):
            ref[i * 4:(i + 1) * 4, j * 4:(j + 1) * 4] *= a[i, j] * float(mask.alive[i, j])
    assert torch.allclose(mask(w), ref, atol=1e-6)
    assert abs(float(mask.attention().detach().mean()) - 1.0) < 1e-5


def test_pruning_a_block_does_not_rescale_the_others():
    # the phase-edge invariant: the softmax runs over all blocks, alive or not
    mask = BlockMask((8, 8), (4, 4), "attention")
    with torch.no_grad():
        mask.logits.copy_(torch.randn(2, 2))
    w = torch.randn(8, 8)
    before = mask(w).detach()
    mask.alive[1, 1] = False
    after = mask(w).detach()
    assert torch.equal(after[:4], before[:4]) and torch.equal(after[4:, :4], before[4:, :4])
    assert torch.count_nonzero(after[4:, 4:]) == 0


def test_attention_clip_is_applied():
    mask = BlockMask((4, 4), (2, 2), "attention", clip=(0.5, 1.5))
    with torch.no_grad():
        mask.logits.copy_(torch.tensor([[5.0, 0.0], [0.0, -5.0]]))
    a = mask.attention().detach()
    assert float(a.max()) == 1.5 and float(a.min()) == 0.5


def test_support_mode_is_weight_times_expanded_alive():
    mask = BlockMask((6, 4, 3, 3), (3, 8), "support")
    mask.alive.copy_(_random_alive(mask.view, 1))
    w = torch.randn(6, 4, 3, 3)
    assert torch.equal(mask(w), w * mask.view.expand(mask.alive.float()))
    assert mask.logits is None and len(list(mask.parameters())) == 0


def test_powerprop_block_variant_multiplies_each_block_by_its_norm():
    mask = BlockMask((8, 8), (4, 4), "powerprop")
    w = torch.randn(8, 8, dtype=torch.float64)
    view = BlockView((8, 8), (4, 4))
    assert torch.allclose(mask(w), w * view.expand(view.block_norms(w)))


def test_powerprop_gradient_is_finite_at_a_zero_block():
    mask = BlockMask((8, 8), (4, 4), "powerprop")
    w = torch.randn(8, 8)
    with torch.no_grad():
        w[:4, :4] = 0
    w.requires_grad_(True)
    mask(w).pow(2).sum().backward()
    assert torch.isfinite(w.grad).all()


def test_powerprop_element_variant():
    mask = BlockMask((4, 4), (2, 2), "powerprop", alpha=3.0, granularity="element")
    w = torch.randn(4, 4, dtype=torch.float64)
    assert torch.allclose(mask(w), w * w.abs() ** 2)


def test_bad_mode_is_named():
    with pytest.raises(ValueError, match="expected mode in"):
        BlockMask((4, 4), (2, 2), "banana")
    with pytest.raises(ValueError, match="only in attention mode"):
        BlockMask((4, 4), (2, 2), "support").attention()


def test_powerprop_block_variant_honours_alpha():
    mask = BlockMask((8, 8), (4, 4), "powerprop", alpha=3.0)
    w = torch.randn(8, 8, dtype=torch.float64)
    view = BlockView((8, 8), (4, 4))
    assert torch.allclose(mask(w), w * view.expand(view.block_norms(w) ** 2))


@pytest.mark.parametrize("alpha,granularity", [(2.0, "block"), (3.0, "block"), (1.5, "block"),
                                               (2.0, "element"), (3.0, "element")])
def test_powerprop_reparameterisation_starts_at_the_dense_weight(alpha, granularity):
    # Without it the effective block ‖W_b‖·W_b of a default-initialised layer starts
    # several times smaller than W_b (the 2–5x shrink of issue 18).
    mask = BlockMask((12, 10), (4, 4), "powerprop", alpha=alpha, granularity=granularity)
    dense = torch.nn.Linear(10, 12).weight.detach().double()
    with torch.no_grad():
        dense[:4, :4] = 0                         # a zero block stays zero
    v = dense.clone()
    mask.reparameterize_(v)
    assert torch.allclose(mask(v), dense, atol=1e-12)


def test_reparameterize_is_for_powerprop_only():
    with pytest.raises(ValueError, match="powerprop masks"):
        BlockMask((4, 4), (2, 2), "support").reparameterize_(torch.zeros(4, 4))


def test_clip_range_density_reads_the_paper_on_a_mean_one_attention():
    from planc.mask import clip_range
    assert clip_range("density", 0.9) == pytest.approx((0.1, 10.0))
    assert clip_range("density", 0.0) == (1.0, 1.0)
    assert clip_range((0.5, 2), 0.9) == (0.5, 2.0)
    assert clip_range(None, 0.9) is None
    with pytest.raises(ValueError, match="expected clip"):
        clip_range("dens", 0.9)
