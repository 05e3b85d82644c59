"""jquant.quantize on real model styles (linen CNN + BatchNorm, nnx, attention, nn.scan) vs hand-written fake quant.

The references inject fake quant by hand: linen's ``Conv``/``Dense`` accept custom ``conv_general_dilated`` /
``dot_general`` functions, which record the float inputs during calibration and fake-quantize lhs (per-tensor
affine int8 from the recorded min/max) and the kernel (per-output-channel symmetric int8) afterwards.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from jquant.numerics.affine import fake_quantize_affine
from jquant.numerics.qparams import choose_qparams
from jquant.transform import quantize


class HandFakeQuant:
    """Records lhs tensors in call order ("record"), then fake-quantizes with their min/max ("quant")."""

    def __init__(self):
        self.mode = "record"
        self.seen: list = []
        self.calls = 0

    def lhs(self, x):
        i, self.calls = self.calls, self.calls + 1
        if self.mode == "record":
            self.seen.append([float(x.min()), float(x.max())])
            return x
        lo, hi = self.seen[i]
        s, z = choose_qparams(jnp.float32(lo), jnp.float32(hi), dtype="int8", qscheme="per_tensor_affine")
        return fake_quantize_affine(x, s, z)

    def kernel(self, w, out_axis):
        if self.mode == "record":
            return w
        axes = tuple(a for a in range(w.ndim) if a != out_axis)
        s, z = choose_qparams(w.min(axis=axes), w.max(axis=axes), dtype="int8", qscheme="per_channel_symmetric")
        return fake_quantize_affine(w, s, z, dtype="int8", axis=out_axis)

    def conv(self, lhs, rhs, *args, dimension_numbers, **kw):
        dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
        return lax.conv_general_dilated(
            self.lhs(lhs), self.kernel(rhs, dn.rhs_spec[0]), *args, dimension_numbers=dimension_numbers, **kw
        )

    def dot(self, lhs, rhs, dimension_numbers, **kw):
        return lax.dot_general(self.lhs(lhs), self.kernel(rhs, rhs.ndim - 1), dimension_numbers, **kw)

    def start(self, mode):
        self.mode, self.calls = mode, 0


class CNN(nn.Module):
    hand: HandFakeQuant | None = None

    @nn.compact
    def __call__(self, x):
        conv_kw = {"conv_general_dilated": self.hand.conv} if self.hand else {}
        dense_kw = {"dot_general": self.hand.dot} if self.hand else {}
        x = nn.Conv(6, (3, 3), **conv_kw)(x)
        x = nn.BatchNorm(use_running_average=True)(x)
        x = jax.nn.relu(x)
        x = nn.Conv(6, (3, 3), feature_group_count=3, **conv_kw)(x)  # grouped conv
        x = jax.nn.gelu(x)
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(5, **dense_kw)(x)


def test_linen_cnn_with_batchnorm_matches_hand_written():
    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 3))
    variables = CNN().init(jax.random.key(1), x)
    variables = jax.tree_util.tree_map(lambda v: v + 0.1, variables)  # non-trivial BatchNorm statistics
    qf = quantize(lambda v, x: CNN().apply(v, x))
    qstate = qf.init(variables, x)
    assert [s.name for s in qf.sites] == [
        "CNN/Conv_0/conv_general_dilated",
        "CNN/Conv_1/conv_general_dilated",
        "CNN/Dense_0/dot_general",
    ]
    conv1 = qf.sites[1]
    assert conv1.operand("weight").out_axes == (3,)  # HWIO kernel: output features on the last dim
    assert qstate["CNN/Conv_1/conv_general_dilated"]["weight"].scale.shape == (6,)

    _, qstate = qf.apply(qstate, variables, x, mode="calibrate")
    out, _ = qf.apply(qstate, variables, x, mode="eval")

    hand = HandFakeQuant()
    CNN(hand).apply(variables, x)
    hand.start("quant")
    expected = jax.jit(lambda v, x: CNN(hand).apply(v, x))(variables, x)
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-5)  # XLA may fuse BatchNorm differently


def test_linen_conv_transpose_and_depthwise_channel_axis():
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3), feature_group_count=2)(x)  # depthwise-style grouped conv
            return nn.ConvTranspose(3, (2, 2), strides=(2, 2))(x)

    x = jax.random.normal(jax.random.key(0), (2, 5, 5, 2))
    v = Net().init(jax.random.key(1), x)
    qf = quantize(lambda v, x: Net().apply(v, x))
    qstate = qf.init(v, x)
    _, qstate = qf.apply(qstate, v, x, mode="calibrate")
    names = [s.name for s in qf.sites]
    assert names == ["Net/Conv_0/conv_general_dilated", "Net/ConvTranspose_0/conv_general_dilated"]
    kernel = v["params"]["ConvTranspose_0"]["kernel"]  # (2, 2, 4, 3): HWIO
    scale = qstate[names[1]]["weight"].scale
    expected, _ = choose_qparams(
        kernel.min(axis=(0, 1, 2)), kernel.max(axis=(0, 1, 2)), dtype="int8", qscheme="per_channel_symmetric"
    )
    np.testing.assert_array_equal(scale, expected)


class NnxMLP(nnx.Module):
    def __init__(self, rngs):
        self.linear1 = nnx.Linear(8, 16, rngs=rngs)
        self.linear2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.linear2(jax.nn.silu(self.linear1(x)))


def test_nnx_model_named_by_parameter_path():
    model = NnxMLP(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    x = jax.random.normal(jax.random.key(2), (5, 8))

    def fn(state, x):
        return nnx.merge(graphdef, state)(x)

    qf = quantize(fn)
    qstate = qf.init(state, x)
    assert [s.name for s in qf.sites] == ["linear1/kernel/dot_general", "linear2/kernel/dot_general"]
    _, qstate = qf.apply(qstate, state, x, mode="calibrate")
    out, _ = qf.apply(qstate, state, x, mode="eval")

    w1, b1 = model.linear1.kernel[...], model.linear1.bias[...]
    w2, b2 = model.linear2.kernel[...], model.linear2.bias[...]
    hand = HandFakeQuant()

    def ref(x):
        h = jax.nn.silu(hand.dot(x, w1, (((1,), (0,)), ((), ()))) + b1)
        return hand.dot(h, w2, (((1,), (0,)), ((), ()))) + b2

    ref(x)
    hand.start("quant")
    np.testing.assert_array_equal(out, ref(x))


def attention(p, x):
    q, k, v = x @ p["wq"], x @ p["wk"], x @ p["wv"]
    scores = jnp.einsum("bqd,bkd->bqk", q, k) / np.float32(np.sqrt(q.shape[-1]))
    probs = jax.nn.softmax(scores, axis=-1)
    return jnp.einsum("bqk,bkd->bqd", probs, v) @ p["wo"] + x


def test_attention_block_quantizes_both_einsum_operands():
    keys = jax.random.split(jax.random.key(3), 5)
    p = {n: jax.random.normal(k, (8, 8)) * 0.3 for n, k in zip(["wq", "wk", "wv", "wo"], keys, strict=False)}
    x = jax.random.normal(keys[4], (2, 4, 8))
    qf = quantize(attention)
    qstate = qf.init(p, x)
    names = [s.name for s in qf.sites]
    assert names == [
        "wq/dot_general",
        "wk/dot_general",
        "wv/dot_general",
        "bqd,bkd->bqk/dot_general",
        "bqk,bkd->bqd/dot_general",
        "wo/dot_general",
    ]
    assert qf.sites[3].roles == ("input", "input")
    _, qstate = qf.apply(qstate, p, x, mode="calibrate")
    out, _ = qf.apply(qstate, p, x, mode="eval")

    hand = HandFakeQuant()

    def ref(x):
        proj = {n: hand.dot(x, p[n], (((2,), (0,)), ((), ()))) for n in ["wq", "wk", "wv"]}
        q, k, v = proj["wq"], proj["wk"], proj["wv"]
        scores = jnp.einsum("bqd,bkd->bqk", hand.lhs(q), hand.lhs(k)) / np.float32(np.sqrt(8))
        probs = jax.nn.softmax(scores, axis=-1)
        ctx = jnp.einsum("bqk,bkd->bqd", hand.lhs(probs), hand.lhs(v))
        return hand.dot(ctx, p["wo"], (((2,), (0,)), ((), ()))) + x

    ref(x)
    hand.start("quant")
    np.testing.assert_allclose(out, ref(x), rtol=1e-6, atol=1e-6)


class Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return jax.nn.relu(nn.Dense(8)(x)), None


class Stack(nn.Module):
    @nn.compact
    def __call__(self, x):
        scanned = nn.scan(Layer, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)
        return scanned()(x, None)[0]


def test_nn_scan_stack_gets_per_layer_statistics():
    x = jax.random.normal(jax.random.key(4), (4, 8))
    v = Stack().init(jax.random.key(5), x)
    qf = quantize(lambda v, x: Stack().apply(v, x))
    qstate = qf.init(v, x)
    (site,) = qf.sites
    assert site.name == "Stack/ScanLayer_0/Dense_0/dot_general" and site.stack == (3,)
    _, qstate = qf.apply(qstate, v, x, mode="calibrate")
    kernels = v["params"]["ScanLayer_0"]["Dense_0"]["kernel"]  # (3, 8, 8) stacked
    biases = v["params"]["ScanLayer_0"]["Dense_0"]["bias"]
    slot = qstate[site.name]
    h = x
    for layer in range(3):
        np.testing.assert_array_equal(slot["input"].observer.min_val[layer], h.min())
        np.testing.assert_array_equal(slot["weight"].observer.max_val[layer], kernels[layer].max(axis=0))
        h = jax.nn.relu(h @ kernels[layer] + biases[layer])
    assert len(set(np.asarray(slot["input"].scale).tolist())) == 3  # one scale per layer

    out, _ = qf.apply(qstate, v, x, mode="eval")
    hand, hs = HandFakeQuant(), [x]
    for layer in range(2):
        hs.append(jax.nn.relu(hs[-1] @ kernels[layer] + biases[layer]))
    hand.seen = [[float(t.min()), float(t.max())] for t in hs]
    hand.start("quant")
    h = x
    for layer in range(3):
        h = jax.nn.relu(hand.dot(h, kernels[layer], (((1,), (0,)), ((), ()))) + biases[layer])
    np.testing.assert_allclose(out, h, rtol=1e-6, atol=1e-6)
