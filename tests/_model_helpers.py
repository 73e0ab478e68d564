"""Small models and independent float64 oracles shared by the model-API tests."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers.pytorch_utils import Conv1D

import loldu


class TinyNet(nn.Module):
    """Every supported layer kind: Embedding -> Linear -> Conv1D -> Linear, and a Conv2d branch."""

    def __init__(self, vocab=40, dim=24, hidden=32, ch=(3, 10)):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.proj = Conv1D(hidden, hidden)  # transformers: weight (in, out)
        nn.init.normal_(self.proj.weight, std=0.2)
        self.fc2 = nn.Linear(hidden, dim, bias=False)
        self.conv = nn.Conv2d(ch[0], ch[1], 3, stride=1, padding=1)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids, img):
        h = self.emb(ids)
        h = self.fc2(torch.tanh(self.proj(torch.relu(self.fc1(h)))))
        return self.norm(h), self.conv(img)


TARGETS = ["emb", "fc1", "proj", "fc2", "conv"]


def inputs(batch=4, seq=5, vocab=40, ch=3, hw=6):
    return torch.randint(0, vocab, (batch, seq)), torch.randn(batch, ch, hw, hw)


def perturb(model, adapter=None, scale=0.5, sigma=False):
    """Moves every layer's z (and sigma) of `adapter` away from init, so c != 0."""
    with torch.no_grad():
        for _, layer in loldu.adapted_layers(model):
            name = adapter or layer.active_adapter
            z = layer.loldu_z[name]
            z.add_(scale * torch.randn_like(z) * (z.abs() + 0.1))
            if sigma:
                layer.loldu_sigma[name].mul_(1.0 + 0.5 * torch.rand(()))


def c64(layer, name):
    """c = sigma z - sigma0 D in float64, computed independently of the layer's code."""
    return (layer.loldu_sigma[name].double() * layer.loldu_z[name].double()
            - layer.sigma0[name] * layer.loldu_D.double())


def dense_weights(model, name=None):
    """{layer name: (W0 + PL diag(c) U) in float64, shaped like the module's weight}."""
    out = {}
    for n, layer in loldu.adapted_layers(model):
        a = name or layer.active_adapter
        W0 = layer.base_layer.weight.double()
        dW = layer.loldu_PL.double() @ torch.diag(c64(layer, a)) @ layer.loldu_U.double()
        if layer.kind == "conv2d":
            dW = dW.reshape(W0.shape)
        elif layer.kind == "conv1d":
            dW = dW.t()
        out[n] = W0 + dW
    return out


def oracle_forward(model, ids, img, name=None):
    """TinyNet's forward in float64 with dense adapted weights (no loldu code on the path)."""
    Ws = dense_weights(model, name)
    m = loldu.adapted_layers(model)
    layers = dict(m)
    b = lambda n: None if layers[n].base_layer.bias is None else layers[n].base_layer.bias.double()  # noqa: E731
    root = loldu.model.unwrap(model)
    h = F.embedding(ids, Ws["emb"])
    h = torch.relu(F.linear(h, Ws["fc1"], b("fc1")))
    h = torch.tanh(h @ Ws["proj"] + b("proj"))
    h = F.linear(h, Ws["fc2"], None)
    h = F.layer_norm(h, h.shape[-1:], root.norm.weight.double(), root.norm.bias.double(), root.norm.eps)
    y = F.conv2d(img.double(), Ws["conv"], b("conv"), padding=1)
    return h, y


def snapshot(model):
    """Everything a failed edit must leave alone: names, types, values and requires_grad."""
    return ({k: v.detach().clone() for k, v in model.state_dict().items()},
            [(n, type(m)) for n, m in model.named_modules()],
            [(n, p.requires_grad) for n, p in model.named_parameters()])


def assert_same_snapshot(a, b):
    assert a[1] == b[1]
    assert a[2] == b[2]
    assert a[0].keys() == b[0].keys()
    for k in a[0]:
        assert torch.equal(a[0][k].nan_to_num(7.0), b[0][k].nan_to_num(7.0)), k
