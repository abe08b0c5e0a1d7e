"""A planted block-sparse linear regression: the true weight has 10% of its 8×8 blocks
nonzero, the targets carry noise, and SequentialAttention++ must recover the true
support exactly — ranking blocks by the learned attention alone, on several seeds."""
import pytest
import torch
from torch import nn

from _runtime_fakes import FakePruned, make_plan, phases


def planted_run(seed, score="attention", n=512, noise=0.1):
    g = torch.Generator().manual_seed(seed)
    out_f, in_f, b = 64, 80, 8
    gr, gc = out_f // b, in_f // b
    nb = gr * gc
    support = torch.zeros(nb, dtype=torch.bool)
    support[torch.randperm(nb, generator=g)[: nb // 10]] = True
    support = support.view(gr, gc)
    w_true = torch.randn(out_f, in_f, generator=g) * support.repeat_interleave(b, 0).repeat_interleave(b, 1)
    x = torch.randn(n, in_f, generator=g)
    y = x @ w_true.T + noise * torch.randn(n, out_f, generator=g)

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_f, out_f, bias=False))
    plan = make_plan("sequential_attention_pp", phases(("dense", 60), ("sparsify", 60), ("finetune", 30)),
                     block=(b, b), sparsity=0.9, score=score)
    pruned = FakePruned(model, plan, ["0"])
    opt = torch.optim.Adam(pruned.param_groups(lr=0.02))
    pruned.attach(opt)
    for _ in range(150):
        idx = torch.randint(0, n, (64,), generator=g)
        loss = (pruned.module(x[idx]) - y[idx]).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        pruned.step()
    return pruned, support, float(loss.detach())


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_sequential_attention_pp_recovers_the_planted_support(seed):
    pruned, support, loss = planted_run(seed)
    mask = pruned.masks["0"]
    assert torch.equal(mask.alive, support)
    assert loss < 0.05                       # noise variance is 0.01
    # the attention learned to single out the true blocks
    a = mask.attention().detach()
    assert float(a[support].min()) > float(a[~support].max())


def test_magnitude_score_also_recovers_it():
    pruned, support, _ = planted_run(0, score="magnitude")
    assert torch.equal(pruned.masks["0"].alive, support)
