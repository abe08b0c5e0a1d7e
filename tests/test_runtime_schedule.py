"""The sparsification curves and update steps against hand-computed values, and the
runtime's pruned counts along a sparsify phase."""
import math

import pytest
import torch

from planc.blocks import sparsify_grid_count
from planc.plan.types import Phase
from planc.runtime import schedule as S

from _runtime_fakes import phases, tiny

# (1 − e^(−ct)) / (1 − e^(−c)), worked by hand: at t = 1/2 it is 1 / (1 + e^(−c/2)).
EXPONENTIAL = {
    (2, 0.25): (1 - math.exp(-0.5)) / (1 - math.exp(-2)),   # 0.393469 / 0.864665 = 0.455054
    (2, 0.5): 0.7310585786,                                 # 1 / (1 + e^-1)
    (4, 0.25): 0.6439142599,                                # 0.632121 / 0.981684
    (4, 0.5): 0.8807970780,                                 # 1 / (1 + e^-2)
    (4, 0.75): 0.9679413967,                                # 0.950213 / 0.981684
    (8, 0.25): 0.8649548768,                                # 0.864665 / 0.999665
    (8, 0.5): 0.9820137900,                                 # 1 / (1 + e^-4)
}


@pytest.mark.parametrize("c,t", sorted(EXPONENTIAL))
def test_exponential_curve_matches_hand_values(c, t):
    assert S.exponential(t, c) == pytest.approx(EXPONENTIAL[(c, t)], abs=1e-9)
    # the paper's s(t) = s · curve(t)
    assert S.scheduled_sparsity(0.9, t, curve="exponential", c=c) == pytest.approx(0.9 * EXPONENTIAL[(c, t)], abs=1e-9)


@pytest.mark.parametrize("c", [2, 4, 8])
def test_exponential_endpoints_are_exact(c):
    assert S.exponential(0.0, c) == 0.0
    assert S.exponential(1.0, c) == 1.0
    assert S.scheduled_sparsity(0.95, 1.0, curve="exponential", c=c) == 0.95
    # larger c front-loads the pruning
    assert S.exponential(0.3, 2) < S.exponential(0.3, 4) < S.exponential(0.3, 8)


def test_cubic_matches_zhu_gupta():
    # s_t = s_f + (s_i − s_f)(1 − t)³
    assert S.scheduled_sparsity(0.9, 0.0, curve="cubic") == pytest.approx(0.0)
    assert S.scheduled_sparsity(0.9, 0.5, curve="cubic") == pytest.approx(0.9 * (1 - 0.125))      # 0.7875
    assert S.scheduled_sparsity(0.8, 0.25, curve="cubic") == pytest.approx(0.8 * (1 - 0.421875))  # 0.4625
    # initial = 1/2: s_i = 0.45; at t = 1/2: 0.9 + (0.45 − 0.9)·0.125 = 0.84375
    assert S.scheduled_sparsity(0.9, 0.5, curve="cubic", initial=0.5) == pytest.approx(0.84375)
    assert S.scheduled_sparsity(0.9, 0.0, curve="cubic", initial=0.5) == pytest.approx(0.45)
    assert S.scheduled_sparsity(0.9, 1.0, curve="cubic", initial=0.5) == 0.9


def test_update_steps_follow_every():
    p = Phase("sparsify", start=10, steps=10, every=3)
    # updates at 10, 13, 16, 19 (K = ⌊9/3⌋ = 3), progress 0, 1/3, 2/3, 1
    got = {s: S.update_progress(p, s) for s in range(8, 23)}
    assert {s: v for s, v in got.items() if v is not None} == {10: 0.0, 13: 1 / 3, 16: 2 / 3, 19: 1.0}
    one = Phase("sparsify", start=0, steps=4, every=10)          # K = 0: a single update at t = 1
    assert S.update_progress(one, 0) == 1.0 and S.update_progress(one, 1) is None
    empty = Phase("sparsify", start=5, steps=0)
    assert S.update_progress(empty, 5) == 1.0


def test_phase_lookup():
    ph = phases(("dense", 3), ("finetune", 0), ("sparse", 2))
    assert [S.phase_index_at(ph, t) for t in range(7)] == [0, 0, 0, 2, 2, 2, 2]
    assert S.phases_starting_at(ph, 3) == [1, 2]


@pytest.mark.parametrize("method,curve", [("sequential_attention_pp", "exponential"), ("magnitude", "cubic")])
def test_runtime_prunes_the_scheduled_counts(method, curve):
    sched = phases(("dense", 4), ("sparsify", 9, {"every": 2, "c": 8.0}), ("finetune", 3))
    p = tiny(method, sched, sparsity=0.9)
    opt = torch.optim.SGD(p.param_groups(lr=0.01))
    p.attach(opt)
    seen = {}
    for step in range(16):
        opt.step()
        p.step()
        seen[p.runtime.t] = {n: int((~m.alive).sum()) for n, m in p.masks.items()}
    sp = sched[1]
    for u, t in [(4, 0.0), (6, 0.25), (8, 0.5), (10, 0.75), (12, 1.0)]:
        assert S.update_progress(sp, u) == t
        for name, mask in p.masks.items():
            s = S.scheduled_sparsity(0.9, t, curve=curve, c=8.0)
            want = sparsify_grid_count(mask.num_blocks, s) if u else 0
            assert seen[u][name] == want, (u, name)
            assert seen[u + 1][name] == want              # nothing between updates
    for name, mask in p.masks.items():
        assert seen[16][name] == sparsify_grid_count(mask.num_blocks, 0.9)
    prunes = [e for e in p.events if e["event"] == "prune"]
    assert [e["step"] for e in prunes] == [4, 6, 8, 10, 12]
    assert prunes[-1]["sparsity"] == {n: round(1 - (m.num_blocks - sparsify_grid_count(m.num_blocks, 0.9)) / m.num_blocks, 6)
                                      for n, m in p.masks.items()}
