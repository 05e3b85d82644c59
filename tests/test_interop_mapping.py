"""torch_to_flax / flax_to_torch with real torch and Flax modules: outputs agree, round trips are exact."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
tnn = torch.nn

from interop import MappingError, Rule, flax_to_torch, torch_to_flax  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


def _seed(module, seed=0):
    """Random values everywhere, BatchNorm running stats included (so they matter in eval)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in list(module.parameters()) + [b for b in module.buffers() if b.is_floating_point()]:
            t.copy_(torch.randn(t.shape, generator=g) * 0.5)
        for m in module.modules():
            if isinstance(m, tnn.modules.batchnorm._BatchNorm):
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return module.eval()


def _assert_round_trip(torch_module, tree, rules=None):
    back = flax_to_torch(tree, torch_module.state_dict(), rules)
    fresh = type(torch_module)()
    fresh.load_state_dict(back, strict=True)
    for key, t in torch_module.state_dict().items():
        assert back[key].dtype == t.dtype and torch.equal(back[key], t), key


# ---------------------------------------------------------------- MLP (linen, list of submodules)
class TorchMLP(tnn.Module):
    def __init__(self):
        super().__init__()
        self.layers = tnn.ModuleList([tnn.Linear(6, 16), tnn.Linear(16, 16), tnn.Linear(16, 3)])

    def forward(self, x):
        for layer in self.layers[:-1]:
            x = torch.relu(layer(x))
        return self.layers[-1](x)


class FlaxMLP(nn.Module):
    def setup(self):
        self.layers = [nn.Dense(16), nn.Dense(16), nn.Dense(3)]

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = nn.relu(layer(x))
        return self.layers[-1](x)


def test_mlp_linen_matches_torch_and_round_trips():
    tm = _seed(TorchMLP())
    x = np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)
    fm = FlaxMLP()
    template = fm.init(jax.random.key(0), x)
    params, report = torch_to_flax(tm.state_dict(), template, with_report=True)
    assert report.ok and {e.layout for e in report.entries} == {"linear", "identity"}
    assert params["params"]["layers_0"]["kernel"].shape == (6, 16)
    np.testing.assert_allclose(np.asarray(fm.apply(params, x)), tm(torch.from_numpy(x)).detach().numpy(), **TOL)
    _assert_round_trip(tm, params)
    # default names (no torch template) give the same state_dict for this model
    back = flax_to_torch(params)
    assert set(back) == set(tm.state_dict())
    assert all(torch.equal(back[k], v) for k, v in tm.state_dict().items())


def test_shape_dtype_struct_template():
    tm = _seed(TorchMLP())
    template = jax.eval_shape(FlaxMLP().init, jax.random.key(0), jnp.zeros((1, 6)))
    params = torch_to_flax(tm.state_dict(), template)
    np.testing.assert_array_equal(params["params"]["layers_2"]["kernel"], tm.layers[2].weight.detach().numpy().T)


# ---------------------------------------------------------------- CNN with BatchNorm (linen, two collections)
class TorchCNN(tnn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = tnn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = tnn.BatchNorm2d(8)
        self.conv2 = tnn.Conv2d(8, 8, 3, padding=1, groups=8)  # depthwise
        self.bn2 = tnn.BatchNorm2d(8)
        self.conv3 = tnn.Conv2d(8, 12, 3, stride=2, padding=1, groups=4)  # grouped
        self.fc = tnn.Linear(12, 5)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = self.conv3(x).mean(dim=(2, 3))
        return self.fc(x)


class FlaxCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        bn = dict(use_running_average=True, epsilon=1e-5)
        x = nn.relu(nn.BatchNorm(name="bn1", **bn)(nn.Conv(8, (3, 3), padding=1, name="conv1")(x)))
        x = nn.Conv(8, (3, 3), padding=1, feature_group_count=8, name="conv2")(x)
        x = nn.relu(nn.BatchNorm(name="bn2", **bn)(x))
        x = nn.Conv(12, (3, 3), strides=2, padding=1, feature_group_count=4, name="conv3")(x).mean(axis=(1, 2))
        return nn.Dense(5, name="fc")(x)


def test_cnn_batchnorm_depthwise_grouped_linen():
    tm = _seed(TorchCNN())
    x = np.random.default_rng(1).standard_normal((2, 3, 9, 9)).astype(np.float32)
    x_nhwc = x.transpose(0, 2, 3, 1)
    fm = FlaxCNN()
    template = fm.init(jax.random.key(0), x_nhwc)
    variables, report = torch_to_flax(tm.state_dict(), template, with_report=True)
    assert sorted(report.ignored) == ["bn1.num_batches_tracked", "bn2.num_batches_tracked"]
    assert variables["batch_stats"]["bn1"]["mean"].shape == (8,)
    assert variables["params"]["conv2"]["kernel"].shape == (3, 3, 1, 8)
    np.testing.assert_allclose(np.asarray(fm.apply(variables, x_nhwc)), tm(torch.from_numpy(x)).detach().numpy(), **TOL)
    _assert_round_trip(tm, variables)


# ---------------------------------------------------------------- nnx: Linear + BatchNorm1d + Conv1d
class TorchSeq1d(tnn.Module):
    def __init__(self):
        super().__init__()
        self.conv = tnn.Conv1d(4, 6, 5, padding=2)
        self.norm = tnn.BatchNorm1d(6)
        self.head = tnn.Linear(6, 2)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))).mean(dim=2))


class NnxSeq1d(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(4, 6, (5,), padding=2, rngs=rngs)
        self.norm = nnx.BatchNorm(6, use_running_average=True, epsilon=1e-5, rngs=rngs)
        self.head = nnx.Linear(6, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(nnx.relu(self.norm(self.conv(x))).mean(axis=1))


def test_nnx_state_conv1d_batchnorm():
    tm = _seed(TorchSeq1d())
    x = np.random.default_rng(2).standard_normal((3, 4, 11)).astype(np.float32)
    model = NnxSeq1d(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    new_state = torch_to_flax(tm.state_dict(), state)
    assert isinstance(new_state, nnx.State)
    nnx.update(model, new_state)
    out = model(jnp.asarray(x.transpose(0, 2, 1)))
    np.testing.assert_allclose(np.asarray(out), tm(torch.from_numpy(x)).detach().numpy(), **TOL)
    _assert_round_trip(tm, nnx.state(model))


# ---------------------------------------------------------------- Conv3d
def test_conv3d_layout():
    tconv = _seed(tnn.Conv3d(2, 3, (2, 3, 3), padding=1))
    x = np.random.default_rng(3).standard_normal((1, 2, 4, 5, 5)).astype(np.float32)
    fconv = nn.Conv(3, (2, 3, 3), padding=1)
    variables = torch_to_flax(tconv.state_dict(), fconv.init(jax.random.key(0), x.transpose(0, 2, 3, 4, 1)))
    out = fconv.apply(variables, x.transpose(0, 2, 3, 4, 1))
    np.testing.assert_allclose(
        np.asarray(out), tconv(torch.from_numpy(x)).detach().numpy().transpose(0, 2, 3, 4, 1), **TOL
    )


# ---------------------------------------------------------------- ConvTranspose
class TorchUp(tnn.Module):
    def __init__(self):
        super().__init__()
        self.up = tnn.ConvTranspose2d(3, 5, 3, stride=2, padding=1, output_padding=1)

    def forward(self, x):
        return self.up(x)


@pytest.mark.parametrize("transpose_kernel", [False, True])
def test_conv_transpose(transpose_kernel):
    tm = _seed(TorchUp())
    x = np.random.default_rng(4).standard_normal((2, 3, 6, 7)).astype(np.float32)
    x_nhwc = x.transpose(0, 2, 3, 1)

    class FlaxUp(nn.Module):
        @nn.compact
        def __call__(self, x):
            # torch padding p, output_padding op <=> explicit (k-1-p, k-1-p+op) on the dilated input
            return nn.ConvTranspose(
                5, (3, 3), strides=(2, 2), padding=((1, 2), (1, 2)), transpose_kernel=transpose_kernel, name="up"
            )(x)

    fm = FlaxUp()
    template = fm.init(jax.random.key(0), x_nhwc)
    # Flax's default transpose_kernel=False needs the flipped layout; transpose_kernel=True is the conv layout
    rules = [Rule(r"^up\.weight$", layout="conv_transpose")] if not transpose_kernel else None
    variables = torch_to_flax(tm.state_dict(), template, rules)
    expected = tm(torch.from_numpy(x)).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(fm.apply(variables, x_nhwc)), expected, **TOL)
    _assert_round_trip(tm, variables, rules)


# ---------------------------------------------------------------- transformer block: Embedding + LayerNorm
class TorchBlock(tnn.Module):
    def __init__(self, vocab=11, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.embed = tnn.Embedding(vocab, dim)
        self.ln1 = tnn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (tnn.Linear(dim, dim) for _ in range(4))
        self.ln2 = tnn.LayerNorm(dim)
        self.mlp = tnn.Sequential(tnn.Linear(dim, 4 * dim), tnn.GELU(), tnn.Linear(4 * dim, dim))

    def forward(self, tokens):
        x = self.embed(tokens)
        h = self.ln1(x)
        b, t, d = h.shape

        def split(y):
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        att = torch.softmax(split(self.q(h)) @ split(self.k(h)).transpose(-1, -2) / (d // self.heads) ** 0.5, -1)
        x = x + self.o((att @ split(self.v(h))).transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class FlaxBlock(nn.Module):
    vocab: int = 11
    dim: int = 8
    heads: int = 2

    @nn.compact
    def __call__(self, tokens):
        d, nh = self.dim, self.heads
        x = nn.Embed(self.vocab, d, name="embed")(tokens)
        h = nn.LayerNorm(epsilon=1e-5, name="ln1")(x)
        b, t, _ = h.shape

        def split(y):
            return y.reshape(b, t, nh, d // nh).transpose(0, 2, 1, 3)

        q, k, v = (split(nn.Dense(d, name=n)(h)) for n in ("q", "k", "v"))
        att = jax.nn.softmax(q @ k.swapaxes(-1, -2) / (d // nh) ** 0.5, axis=-1)
        x = x + nn.Dense(d, name="o")((att @ v).transpose(0, 2, 1, 3).reshape(b, t, d))
        h = nn.LayerNorm(epsilon=1e-5, name="ln2")(x)
        h = nn.Dense(d, name="mlp_2")(nn.gelu(nn.Dense(4 * d, name="mlp_0")(h), approximate=False))
        return x + h


def test_transformer_block_embedding_layernorm():
    tm = _seed(TorchBlock())
    tokens = np.random.default_rng(5).integers(0, 11, (2, 7))
    fm = FlaxBlock()
    template = fm.init(jax.random.key(0), tokens)
    params, report = torch_to_flax(tm.state_dict(), template, with_report=True)
    layouts = {e.torch_name: e.layout for e in report.entries}
    assert layouts["embed.weight"] == "identity" and layouts["ln1.weight"] == "identity"
    assert layouts["mlp.0.weight"] == "linear"
    np.testing.assert_array_equal(params["params"]["embed"]["embedding"], tm.embed.weight.detach().numpy())
    np.testing.assert_allclose(
        np.asarray(fm.apply(params, tokens)), tm(torch.from_numpy(tokens)).detach().numpy(), **TOL
    )
    _assert_round_trip(tm, params)


# ---------------------------------------------------------------- dtypes, rules, reports
def test_bf16_values_keep_their_bits():
    lin = tnn.Linear(3, 4).to(torch.bfloat16)
    template = {"params": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)}}
    params = torch_to_flax(lin.state_dict(), template)
    kernel = params["params"]["kernel"]
    assert kernel.dtype == jnp.bfloat16
    back = flax_to_torch(params, lin.state_dict())
    assert torch.equal(back["weight"].view(torch.int16), lin.weight.detach().view(torch.int16))


def test_rename_rules_and_callable():
    tm = _seed(TorchMLP())
    template = {
        "params": {
            f"dense{i}": {"kernel": jnp.zeros(s), "bias": jnp.zeros(s[1])}
            for i, s in enumerate([(6, 16), (16, 16), (16, 3)])
        }
    }
    with pytest.raises(MappingError, match=r"(?s)layers\.0\.weight.*params/dense0/kernel"):
        torch_to_flax(tm.state_dict(), template)
    by_regex = torch_to_flax(tm.state_dict(), template, [(r"^layers\.(\d+)\.", r"dense\1/")])
    by_callable = torch_to_flax(tm.state_dict(), template, lambda n: n.replace("layers.", "dense").replace(".", "/", 1))
    for tree in (by_regex, by_callable):
        np.testing.assert_array_equal(tree["params"]["dense1"]["kernel"], tm.layers[1].weight.detach().numpy().T)
    back = flax_to_torch(by_regex, tm.state_dict(), [(r"^layers\.(\d+)\.", r"dense\1/")])
    assert all(torch.equal(back[k], v) for k, v in tm.state_dict().items())
    # a callable returning None ignores a key (reported, not silently dropped)
    _, report = torch_to_flax(
        tm.state_dict(),
        template,
        [(r"^layers\.(\d+)\.", r"dense\1/"), lambda n: None if "dense2" in n else n],
        strict=False,
        with_report=True,
    )
    assert sorted(report.ignored) == ["layers.2.bias", "layers.2.weight"]
    assert sorted(report.unmatched_flax) == ["params/dense2/bias", "params/dense2/kernel"]


def test_report_lists_unmatched_and_mismatched_on_both_sides():
    tm = _seed(TorchMLP())
    template = FlaxMLP().init(jax.random.key(0), jnp.zeros((1, 6)))
    template["params"]["layers_1"]["kernel"] = jnp.zeros((16, 15))
    template["params"]["extra"] = {"kernel": jnp.zeros((2, 2))}
    state = dict(tm.state_dict())
    state["stray.weight"] = torch.ones(3)
    del state["layers.2.bias"]
    with pytest.raises(MappingError) as info:
        torch_to_flax(state, template)
    msg = str(info.value)
    assert "stray.weight" in msg and "params/extra/kernel" in msg and "params/layers_2/bias" in msg
    assert "layers.1.weight -> params/layers_1/kernel: (16, 16) vs (16, 15)" in msg
    tree, report = torch_to_flax(state, template, strict=False, with_report=True)
    assert report.unmatched_torch == ["stray.weight"]
    assert sorted(report.unmatched_flax) == ["params/extra/kernel", "params/layers_2/bias"]
    assert [e.torch_name for e in report.mismatched] == ["layers.1.weight"]
    # unmatched leaves keep the template value; matched ones are filled
    assert tree["params"]["layers_1"]["kernel"].shape == (16, 15)
    np.testing.assert_array_equal(tree["params"]["layers_0"]["kernel"], tm.layers[0].weight.detach().numpy().T)


def test_flax_to_torch_reports_against_torch_template():
    tm = _seed(TorchMLP())
    params = torch_to_flax(tm.state_dict(), FlaxMLP().init(jax.random.key(0), jnp.zeros((1, 6))))
    other = tnn.ModuleDict({"layers": tnn.ModuleList([tnn.Linear(6, 16), tnn.Linear(16, 8)])})
    with pytest.raises(MappingError) as info:
        flax_to_torch(params, other.state_dict())
    msg = str(info.value)
    assert "layers.1.weight -> params/layers_1/kernel: (16, 8) vs (16, 16)" in msg
    assert "Flax paths with no torch match (2):\n  params/layers_2/bias\n  params/layers_2/kernel" in msg


def test_quantized_values_are_refused_with_a_pointer():
    import torch.ao.nn.quantized as nnq

    with pytest.raises(MappingError, match="import_qparams"):
        torch_to_flax(nnq.Conv2d(2, 2, 1).state_dict(), {"params": {"weight": jnp.zeros((1, 1, 2, 2))}})
