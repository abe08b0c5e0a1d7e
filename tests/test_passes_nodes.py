"""weight_uses on every kind of graph the frontends produce."""
import torch
import torch.nn.functional as F
from torch import fx, nn

from planc.examples.digits import cnn
from planc.passes import trace, weight_uses

from _passes_helpers import Conv1DStyle, Functional


def test_symbolic_graph_call_module_and_functional():
    gm = fx.symbolic_trace(Functional())
    uses = {u.weight_target: u for u in weight_uses(gm)}
    assert set(uses) == {"w1", "conv.weight", "out.weight"}
    assert uses["w1"].op == "linear" and uses["w1"].bias_target == "b1" and uses["w1"].weight_node.op == "get_attr"
    conv = uses["conv.weight"]
    assert (conv.op, conv.module_name, conv.module_type, conv.groups, conv.padding) == ("conv2d", "conv", "Conv2d", 2, (1, 1))
    assert uses["out.weight"].is_call_module and uses["out.weight"].module_mro == ("Linear",)


def test_export_graph_names_from_nn_module_stack():
    m = cnn(4)
    gm = trace(m, (torch.randn(3, 64),))
    uses = weight_uses(gm)
    assert [(u.op, u.module_name, u.module_type) for u in uses] == [
        ("conv2d", "features.0", "Conv2d"), ("conv2d", "features.3", "Conv2d"), ("linear", "head", "Linear")]
    assert uses[0].node.target is torch.ops.aten.conv2d.default and uses[0].stride == (1, 1)


def test_decomposed_addmm_and_convolution():
    m = cnn(4)
    ep = torch.export.export(m, (torch.randn(3, 64),), strict=False).run_decompositions()
    uses = weight_uses(ep.module())
    ops = [(u.op, u.node.target, u.weight_target, u.bias_target) for u in uses]
    assert ops[0][1] is torch.ops.aten.convolution.default
    assert ops[-1][:1] == ("linear",) and ops[-1][1] is torch.ops.aten.addmm.default
    assert ops[-1][2:] == ("head.weight", "head.bias")
    assert uses[-1].weight_user is not uses[-1].node      # the mask goes before the transpose


def test_non_parameter_weights_and_conv1d_are_not_uses():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv1d(2, 2, 3)
            self.register_buffer("w", torch.randn(4, 4))

        def forward(self, x, y):
            return F.linear(x, self.w), self.c1(y)

    assert weight_uses(fx.symbolic_trace(M())) == []


def test_transposed_linear_maps_are_uses():
    gm = trace(Conv1DStyle(), (torch.randn(2, 3, 8),))
    uses = {u.weight_target: u for u in weight_uses(gm)}
    assert set(uses) == {"weight", "proj"}
    conv1d, proj = uses["weight"], uses["proj"]
    assert (conv1d.op, conv1d.transposed, conv1d.bias_target) == ("linear", True, "bias")
    assert conv1d.node.target is torch.ops.aten.addmm.default and conv1d.weight_user is conv1d.node
    assert (proj.op, proj.transposed) == ("linear", False) and proj.node.target is torch.ops.aten.matmul.default
    assert proj.weight_user is not proj.node                   # the mask goes before the transpose
