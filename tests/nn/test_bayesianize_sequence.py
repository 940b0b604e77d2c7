# SPDX-License-Identifier: Apache-2.0
"""bayesianize of sequence models: embeddings, multi-head attention, transformer layers, transposed convolutions."""

import warnings

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import SVI, TraceMeanField_ELBO
from torch import nn

from pyro_vdrop.infer import AutoVariationalDropout
from pyro_vdrop.nn import bayesianize
from pyro_vdrop.poutine import LazyWeightError, local_reparam

VOCAB, EMBED, CLASSES, LENGTH = 12, 8, 3, 5


class SequenceNet(nn.Module):
    """Embedding -> LSTM -> MultiheadAttention -> Linear, on (batch, length) token ids."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, EMBED)
        self.lstm = nn.LSTM(EMBED, EMBED, batch_first=True)
        self.attn = nn.MultiheadAttention(EMBED, 2, batch_first=True)
        self.head = nn.Linear(EMBED, CLASSES)

    def forward(self, tokens):
        h, _ = self.lstm(self.embed(tokens))
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head((h + a).mean(1))


#: the random sites of SequenceNet, in module order, and the shapes of their weights
SEQUENCE_SITES = {
    "embed.weight": (VOCAB, EMBED),
    "lstm.weight_ih_l0": (4 * EMBED, EMBED),
    "lstm.weight_hh_l0": (4 * EMBED, EMBED),
    "attn.in_proj_weight": (3 * EMBED, EMBED),
    "attn.out_proj.weight": (EMBED, EMBED),
    "head.weight": (CLASSES, EMBED),
}


def _data(n=96):
    # the class is the first token modulo 3: the network must look the token up and carry it through attention
    tokens = torch.randint(0, VOCAB, (n, LENGTH))
    return tokens, tokens[:, 0] % CLASSES


def test_sequence_model_weights_are_random_and_train_under_local_reparam():
    net = SequenceNet()
    model = bayesianize(net, num_data=96)
    assert model.random_sites == tuple(SEQUENCE_SITES) and model.deterministic_modules == ()
    x, y = _data()
    tr = poutine.trace(poutine.condition(model, data=model.initial_weights())).get_trace(x, y)
    for site, shape in SEQUENCE_SITES.items():
        assert tr.nodes[site]["type"] == "sample" and tr.nodes[site]["fn"].event_shape == shape
    torch.testing.assert_close(tr.nodes["_RETURN"]["value"], net(x))  # the same network with its own weights
    guide = AutoVariationalDropout(model, parameterization="additive")  # sparse VD
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.03}), TraceMeanField_ELBO())
    with local_reparam():  # LRT per time step is not the model of a recurrent weight: it raises, naming the site
        with pytest.raises(LazyWeightError, match="lstm.weight_ih_l0"):
            svi.step(x, y)
    with local_reparam(estimator="flipout"):  # exact for every layer here: per-sequence signs for the LSTM
        losses = [svi.step(x, y) for _ in range(60)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10]), (losses[:10], losses[-10:])
    assert set(guide.median()) == set(SEQUENCE_SITES)


def test_conv_transpose_and_attention_with_other_key_dims():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(2, 3, 3, stride=2, output_padding=1, groups=1)
            self.attn = nn.MultiheadAttention(4, 2, kdim=3, vdim=5, bias=True)
            self.head = nn.Linear(3 * 10 * 10 + 4, 2)  # (4 - 1) * 2 + 3 + 1 = 10

        def forward(self, x):
            up = self.up(x).flatten(1)
            q = up[:, :4].unsqueeze(0)
            a, _ = self.attn(q, up[:, 4:7].unsqueeze(0), up[:, 7:12].unsqueeze(0))
            return self.head(torch.cat([up, a[0]], -1))

    net = Net()
    model = bayesianize(net, random_bias=True)
    assert model.random_sites == (
        "up.weight",
        "up.bias",
        "attn.q_proj_weight",
        "attn.k_proj_weight",
        "attn.v_proj_weight",
        "attn.in_proj_bias",
        "attn.out_proj.weight",
        "attn.out_proj.bias",
        "head.weight",
        "head.bias",
    )
    x = torch.randn(3, 2, 4, 4)
    torch.testing.assert_close(poutine.condition(model, data=model.initial_weights())(x), net(x))
    guide = AutoVariationalDropout(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), TraceMeanField_ELBO())
    for estimator in ("lrt", "flipout", "per-example"):
        with local_reparam(estimator=estimator):
            assert torch.isfinite(torch.tensor(svi.step(x, torch.tensor([0, 1, 0]))))


def _transformer():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, EMBED)
            self.block = nn.TransformerEncoderLayer(EMBED, 2, 16, dropout=0.0, batch_first=True)
            self.head = nn.Linear(EMBED, CLASSES)

        def forward(self, tokens):
            return self.head(self.block(self.embed(tokens)).mean(1))

    return Net()


def _run(model, guide, x, estimator):
    with local_reparam(estimator=estimator):
        guide_trace = poutine.trace(guide).get_trace(x)
        return poutine.replay(model, trace=guide_trace)(x)


def test_transformer_layer_in_eval_mode_is_not_its_fast_path():
    """
    In eval mode without gradients torch's transformer layer takes a fused fast path that reads the weights'
    values; lazy weights turn it off (they have a __torch_function__), so the layers see the lazy weights: with
    no noise ("mean") the output is the network with the posterior means, with noise it varies.
    """
    net = _transformer()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the LayerNorms stay deterministic
        # only the transformer layer's weights: noise in the output can then only come from its own layers
        model = bayesianize(
            net, layers=["block.self_attn", "block.self_attn.out_proj", "block.linear1", "block.linear2"]
        )
    assert model.random_sites == (
        "block.self_attn.in_proj_weight",
        "block.self_attn.out_proj.weight",
        "block.linear1.weight",
        "block.linear2.weight",
    )
    x, y = _data(16)
    guide = AutoVariationalDropout(model)
    guide(x, y)
    model.eval()
    with torch.no_grad():
        out = _run(model, guide, x, "mean")
        reference = model.to_deterministic().eval()
        reference.load_state_dict({**reference.state_dict(), **guide.median()})
        torch.testing.assert_close(out, reference(x), atol=1e-5, rtol=1e-4)  # the fused fast path's rounding
        first, second = _run(model, guide, x, "lrt"), _run(model, guide, x, "lrt")
    assert not torch.allclose(first, second)


@pytest.mark.parametrize("estimator", ["lrt", "flipout"])
def test_transformer_trains(estimator):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        model = bayesianize(_transformer(), num_data=96)
    x, y = _data()
    guide = AutoVariationalDropout(model, parameterization="additive")
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.03}), TraceMeanField_ELBO())
    with local_reparam(estimator=estimator):
        losses = [svi.step(x, y) for _ in range(40)]
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10]), (losses[:10], losses[-10:])
