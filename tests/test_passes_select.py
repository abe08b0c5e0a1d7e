"""select: rules (first match wins), positions, skip reasons, errors, changed flag."""
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from planc import meta
from planc.errors import SelectError
from planc.examples.digits import mlp
from planc.passes import select, targets_of, trace
from planc.plan.types import Match
from planc.pruned import layer_table

from _passes_helpers import Functional, plan


def _mlp_graph(depth=3):
    return fx.symbolic_trace(mlp(hidden=32, depth=depth))


def test_rules_first_match_wins_and_defaults():
    gm = _mlp_graph()
    p = plan(block=(8, 8), sparsity=0.5, rules=(
        {"match": Match(position="last"), "skip": True},
        {"match": Match(type="Linear", name="layers.2"), "sparsity": 0.75, "block": (4, 4)},
        {"match": Match(name="layers.*"), "sparsity": 0.25},
    ))
    gm, changed = select(gm, p)
    assert changed
    t = {x.name: x for x in targets_of(gm)}
    assert list(t) == ["layers.0", "layers.2", "layers.4", "head"]
    assert (t["head"].skip_reason, t["head"].rule, t["head"].targeted) == ("skipped by targets.rules[0]", 0, False)
    assert (t["layers.2"].sparsity, t["layers.2"].block, t["layers.2"].grid, t["layers.2"].rule) == (0.75, (4, 4), (8, 8), 1)
    assert (t["layers.4"].sparsity, t["layers.4"].rule) == (0.25, 2)
    assert (t["layers.0"].weight_shape, t["layers.0"].grid, t["layers.0"].num_blocks) == ((32, 64), (4, 8), 32)
    assert [x.order for x in t.values()] == [0, 1, 2, 3]
    node = next(n for n in gm.graph.nodes if n.op == "call_module" and n.target == "head")
    assert node.meta[meta.TARGET] is t["head"] or node.meta[meta.TARGET] == t["head"]
    # the same plan again changes nothing
    assert select(gm, p)[1] is False


def test_min_blocks_reason():
    # Every layer stays dense here, so select refuses the plan, naming each layer's reason.
    gm = _mlp_graph(depth=1)
    with pytest.raises(SelectError) as err:
        select(gm, plan(block=(16, 16), min_blocks=9, rules=({"match": Match(name="head"), "sparsity": 0.0},)))
    assert str(err.value) == ("targets: no layer to prune: all 2 layers stay dense "
                              "(layers.0: 8 blocks < min_blocks 9; head: target sparsity 0)")


def test_grouped_conv_is_skipped_with_reason_and_functional_weights_are_layers():
    gm, _ = select(fx.symbolic_trace(Functional()), plan(block=(2, 2)))
    t = {x.name: x for x in targets_of(gm)}
    assert set(t) == {"w1", "conv", "out"}
    assert t["conv"].skip_reason.startswith("grouped convolution (groups=2)")
    assert t["w1"].targeted and t["w1"].module_type == "Functional" and t["out"].targeted


def test_positions_come_from_the_dataflow_graph():
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.trunk = nn.Linear(8, 4)
            self.h1, self.h2 = nn.Linear(4, 2), nn.Linear(4, 2)

        def forward(self, x):
            z = self.trunk(torch.cat([self.a(x), self.b(x)], -1))
            return self.h1(z), self.h2(z)

    gm = fx.symbolic_trace(TwoHeads())
    gm, _ = select(gm, plan(block=(2, 2), rules=({"match": Match(position="first"), "skip": True},
                                                 {"match": Match(position="last"), "sparsity": 0.9})))
    t = {x.name: x for x in targets_of(gm)}
    assert {n for n, x in t.items() if x.rule == 0} == {"a", "b"}
    assert {n for n, x in t.items() if x.rule == 1} == {"h1", "h2"}
    assert t["trunk"].rule is None


def test_name_globs_ignore_ddp_prefixes():
    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.module = mlp(hidden=16, depth=1)

        def forward(self, x):
            return self.module(x)

    gm = fx.symbolic_trace(Wrapped())
    gm, _ = select(gm, plan(rules=({"match": Match(name="layers.*"), "sparsity": 0.8},)))
    assert {x.name: x.sparsity for x in targets_of(gm)} == {"module.layers.0": 0.8, "module.head": 0.5}
    gm2, _ = select(_mlp_graph(1), plan(rules=({"match": Match(name="module.head"), "skip": True},)))
    assert [x.name for x in targets_of(gm2) if not x.targeted] == ["head"]


def test_type_matches_base_classes():
    mha = nn.MultiheadAttention(8, 2)
    assert type(mha.out_proj).__name__ == "NonDynamicallyQuantizableLinear"

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = mha.out_proj

        def forward(self, x):
            return self.proj(x)

    gm, _ = select(fx.symbolic_trace(M()), plan(block=(2, 2), rules=({"match": Match(type="Linear"), "sparsity": 0.7},)))
    assert targets_of(gm)[0].sparsity == 0.7


def test_a_rule_that_matches_nothing_lists_the_closest_names():
    with pytest.raises(SelectError) as err:
        select(_mlp_graph(), plan(rules=({"match": Match(position="last"), "skip": True},
                                        {"match": Match(name="layer.*"), "sparsity": 0.9})))
    msg = str(err.value)
    assert msg.startswith("targets.rules[1]: match {name: layer.*} matches no layer; closest layer names: layers.")
    with pytest.raises(SelectError, match=r"layer types in the model: Linear"):
        select(_mlp_graph(), plan(rules=({"match": Match(type="Conv2d")},)))


def test_tied_weights_are_skipped():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec = nn.Linear(8, 8), nn.Linear(8, 8)
            self.dec.weight = self.enc.weight
            self.head = nn.Linear(8, 8)

        def forward(self, x):
            return self.head(self.dec(self.enc(x)))

    gm, _ = select(fx.symbolic_trace(Tied()), plan(block=(2, 2)))
    t = {x.name: x for x in targets_of(gm)}
    assert "tied" in t["enc"].skip_reason and t["head"].targeted


class TiedHead(nn.Module):
    """A tiny LM whose head shares the input embedding's weight, tied the way `how` says:
    'alias' (transformers: lm_head.weight = embed.weight, two names), 'direct'
    (F.linear(h, self.embed.weight), one name read twice)."""

    def __init__(self, how: str):
        super().__init__()
        self.how = how
        self.embed = nn.Embedding(40, 16)
        self.body = nn.Linear(16, 16)
        self.lm_head = nn.Linear(16, 40, bias=False)
        if how == "alias":
            self.lm_head.weight = self.embed.weight

    def forward(self, ids):
        h = self.body(self.embed(ids)).relu()
        return self.lm_head(h) if self.how == "alias" else F.linear(h, self.embed.weight)


@pytest.mark.parametrize("how", ["alias", "direct"])
@pytest.mark.parametrize("frontend", ["export", "symbolic"])
def test_a_head_tied_to_the_input_embedding_is_skipped_however_it_is_tied(how, frontend):
    model, ids = TiedHead(how), torch.randint(0, 40, (2, 5))
    gm = trace(model, (ids,), frontend=frontend)
    gm, _ = select(gm, plan(block=(4, 4)))
    t = {x.name: x for x in targets_of(gm)}
    head = t["lm_head" if how == "alias" and frontend == "symbolic" else
             next(n for n in t if n != "body")]
    assert t["body"].targeted and not head.targeted
    assert head.skip_reason.startswith("weight tied to the input embedding embed (tied LM head)")
    assert [(r.module_name, r.kind) for r in head.shared_with] == [("embed", "embedding")]
    table = layer_table(targets_of(gm))
    assert "also embed" in table and "same weight as" in table      # each use has a row


@pytest.mark.parametrize("frontend", ["export", "symbolic"])
def test_every_use_of_a_shared_weight_is_in_the_table(frontend):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)
            self.dec.weight = self.enc.weight

        def forward(self, x):
            return self.head(self.dec(self.enc(x)))

    gm, _ = select(trace(Tied(), (torch.randn(2, 8),), frontend=frontend), plan(block=(2, 2)))
    t = {x.name: x for x in targets_of(gm)}
    assert list(t) == ["enc", "head"]                    # one layer per Parameter, named by its first user
    assert t["enc"].skip_reason.startswith("weight shared with dec (linear; tied weights)") and t["head"].targeted
    rows = [r.split() for r in layer_table(targets_of(gm)).splitlines()[2:]]
    assert [r[:3] for r in rows[:2]] == [["enc", "linear", "8x8"], ["also", "dec", "linear"]]
