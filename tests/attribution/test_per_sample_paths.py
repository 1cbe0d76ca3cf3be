"""Per-sample gradients of Linear layers built from their factors equal the vmapped ones, and fall back where they must."""

import pytest
import torch
from torch import nn

from fgtrac_assets.attribution.model_calls import model_guard
from fgtrac_assets.attribution.per_sample import (
    RandomProjection,
    _linear_parameters,
    _vmap_grads,
    iter_per_sample_grads,
    per_sample_grads,
)

LOSS = nn.CrossEntropyLoss(reduction="none")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 20), nn.Tanh(), nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 5)).double()
    x = torch.randn(70, 12, dtype=torch.float64)
    y = torch.randint(0, 5, (70,))
    return model, x, y


def vmapped(model, names, x, y):
    with model_guard(model):
        return torch.cat(_vmap_grads(model, None, names, LOSS, x, y, False), dim=1)


@pytest.mark.parametrize("names", [None, ["2.weight"], ["4.bias", "0.weight"], ["0.bias", "2.weight", "2.bias"]])
def test_linear_factor_gradients_equal_the_vmapped_ones(names):
    model, x, y = mlp()
    names = names or [n for n, _ in model.named_parameters()]
    assert _linear_parameters(model, names) is not None
    got = per_sample_grads(model, names, x, y, LOSS, batch_size=32)
    assert got.shape == (70, sum(model.get_parameter(n).numel() for n in names))
    assert torch.allclose(got, vmapped(model, names, x, y), rtol=1e-12, atol=1e-14)
    # projected: the same projection of the same gradients
    proj = RandomProjection(16, seed=3)
    projected = torch.cat(list(iter_per_sample_grads(model, names, x, y, LOSS, batch_size=32, projection=proj)))
    want = RandomProjection(16, seed=3)(list(vmapped(model, names, x, y).split(
        [model.get_parameter(n).numel() for n in names], dim=1)))
    assert torch.allclose(projected, want, rtol=1e-10, atol=1e-12)


def test_tied_or_reused_linear_layers_take_the_general_path():
    model, x, y = mlp()
    # the same Linear twice in one forward: its hooks fire twice, so the factors do not apply; vmap does
    lin = nn.Linear(12, 12).double()
    twice = nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(12, 5)).double()
    names = [n for n, _ in twice.named_parameters()]
    assert torch.allclose(per_sample_grads(twice, names, x, y, LOSS), vmapped(twice, names, x, y), rtol=1e-12)
    # and the model keeps its Parameters (torch.func.functional_call alone leaves plain tensors here)
    assert all(isinstance(p, nn.Parameter) for m in twice.modules() for p in m._parameters.values())
    assert twice[0].weight is lin.weight and twice[0].weight.requires_grad
    # a Linear weight shared with an Embedding: not the Linear's alone
    emb = nn.Embedding(5, 12).double()
    tied = nn.ModuleDict({"emb": emb, "out": nn.Linear(12, 5).double()})
    tied["out"].weight = emb.weight
    assert _linear_parameters(tied, ["out.bias", "emb.weight"]) is None
    assert _linear_parameters(tied, ["out.bias"]) is not None


def test_a_linear_layer_on_3d_inputs_falls_back_to_vmap():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)).double()
    x = torch.randn(20, 3, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (20,))
    names = [n for n, _ in model.named_parameters()]
    assert _linear_parameters(model, names) is not None
    got = per_sample_grads(model, names, x, y, LOSS, batch_size=8)
    assert torch.allclose(got, vmapped(model, names, x, y), rtol=1e-12, atol=1e-14)
