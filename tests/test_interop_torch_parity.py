"""Issue 6 acceptance: a torch eager fake-quant model and the jquant fake-quant model built from its saved
checkpoint (weights through ``interop.torch_to_flax``, qparams through ``interop.import_qparams``) give the
same logits within float32 tolerance: a CNN with BatchNorm folded for QAT, and a small transformer block.

Why a tolerance and not bit equality: torch and XLA sum convolutions / matmuls in different orders and torch
folds BN with ``1/sqrt`` where jquant's ``ConvBN`` uses ``rsqrt``, so float values entering a fake quant may
differ by a few ulps. Nearly always both sides then round to the same integer and the difference vanishes;
in the rare element sitting on a rounding boundary the two sides round one step apart ("flip"). The tests
measure every fake-quant point on both sides: rows with no flip must agree to 1e-5 (float32 noise; measured
~2e-7 for the CNN, ~2e-6 for the transformer), flips must be exactly one step and rare, and argmax agrees.
"""

import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import interop
import jquant
from jquant.examples.digits import load_digits_split
from jquant.flax import ConvBN
from jquant.transform import Rule

torch = pytest.importorskip("torch")
from torch.ao import quantization as tq  # noqa: E402

warnings.filterwarnings("ignore", category=UserWarning)

ROW_TOL = 1e-5  # float32 noise on logits of O(1..10) for rows with no rounding flip upstream
D = 32  # transformer width


def _qconfig():
    """quint8 0..255 per-tensor affine activations, qint8 per-channel symmetric weights, moving-average observers."""
    return interop.torch_qat_qconfig()


def _train(model, x_train, y_train, steps):
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    order = np.random.default_rng(0)
    for _ in range(steps):
        idx = order.choice(len(x_train), 64, replace=False)
        logits = model(torch.from_numpy(x_train[idx]))
        loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(y_train[idx]).long())
        opt.zero_grad()
        loss.backward()
        opt.step()


def _record_fake_quants(model, names):
    """Forward hooks on ``<name>.activation_post_process``: {name: (float input, fake-quantized output, module)}."""
    seen = {}

    def hook(name):
        def fn(module, args, out):
            seen[name] = (args[0].detach().clone(), out.detach().clone(), module)

        return fn

    handles = [model.get_submodule(n).activation_post_process.register_forward_hook(hook(n)) for n in names]
    return seen, handles


def _flips(seen, jax_values):
    """Fake-quantize jquant's float value at every point with torch's own module and find the elements that land
    on a different grid point than torch's. Points are visited in forward order and only a row's first flipping
    point counts (later points of that row inherit its difference). Returns (rows with a flip,
    {point: (independent flips, their largest difference in steps)})."""
    flagged = None
    stats = {}
    for name, (_, torch_q, fq) in seen.items():  # hooks fired, so were recorded, in forward order
        with torch.no_grad():
            ours = fq(torch.from_numpy(np.ascontiguousarray(jax_values[name])))
        steps = ((ours - torch_q).abs() / float(fq.scale)).numpy()
        steps = steps.reshape(steps.shape[0], -1)
        if flagged is not None:
            steps[flagged] = 0.0
        flips = steps > 0.5
        stats[name] = (int(flips.sum()), float(steps.max()))
        rows = flips.any(1)
        flagged = rows if flagged is None else flagged | rows
    return flagged, stats


def _check_parity(torch_logits, jq_logits, flagged, stats, n_elements):
    diff = np.abs(jq_logits - torch_logits)
    flips = sum(count for count, _ in stats.values())
    print(
        f"max |diff| {diff.max():.3g}, rows with a flip {int(flagged.sum())}/{len(flagged)}, independent flips {flips}/"
        f"{n_elements}, per point (flips, max steps) {stats}, max |diff| without flips {diff[~flagged].max():.3g}"
    )
    agreement = (jq_logits.argmax(1) == torch_logits.argmax(1)).mean()
    print(f"argmax agreement {agreement:.4f}")
    np.testing.assert_allclose(jq_logits[~flagged], torch_logits[~flagged], rtol=ROW_TOL, atol=ROW_TOL)
    # a flip is one rounding step of an element sitting on a rounding boundary, never more
    assert all(steps <= 1.0001 for _, steps in stats.values()), stats
    assert flips <= 1e-4 * n_elements and flagged.mean() <= 0.01, stats
    assert agreement >= 0.995


# ----------------------------------------------------------------------------------------------- CNN with BN


class TorchCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = tq.QuantStub()
        self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.relu1 = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(16)
        self.relu2 = torch.nn.ReLU()
        self.fc = torch.nn.Linear(16 * 4 * 4, 10)
        self.dequant = tq.DeQuantStub()

    def forward(self, x):  # x: NHWC, like the Flax model
        x = self.quant(x.permute(0, 3, 1, 2))
        x = self.relu2(self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x))))))
        x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # flatten in Flax's NHWC order
        return self.dequant(self.fc(x))


class FlaxCNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        self.sow("intermediates", "quant_out", x)
        pad = ((1, 1), (1, 1))
        x = nn.relu(ConvBN(8, (3, 3), padding=pad, name="conv1")(x))
        self.sow("intermediates", "conv1_out", x)
        x = nn.relu(ConvBN(16, (3, 3), strides=(2, 2), padding=pad, name="conv2")(x))
        self.sow("intermediates", "conv2_out", x)
        return nn.Dense(10, name="fc")(x.reshape(x.shape[0], -1))


# torch ConvBnReLU2d keeps the conv weight and the BN as a submodule; ConvBN holds both in one Flax module
CONV_BN_RULES = [
    (r"^(conv\d)\.weight$", r"\1/kernel"),
    (r"^(conv\d)\.bn\.weight$", r"\1/scale"),
    (r"^(conv\d)\.bn\.bias$", r"\1/bias"),
    (r"^(conv\d)\.bn\.running_mean$", r"\1/mean"),
    (r"^(conv\d)\.bn\.running_var$", r"\1/var"),
]


def _float_tensors(state):
    return {k: v for k, v in state.items() if "fake_quant" not in k and "activation_post_process" not in k}


def test_conv_bn_template_needs_rules_for_its_two_torch_weights():
    # ConvBN's kernel and BN scale are both torch "weight": without a rule the alias is ambiguous, and says so
    template = {"params": FlaxCNN().init(jax.random.key(0), np.zeros((1, 8, 8, 1), np.float32))["params"]}
    conv_only = {"conv1.weight": np.zeros((8, 1, 3, 3), np.float32)}
    with pytest.raises(interop.MappingError, match=r"matches Flax paths .*conv1/kernel.*conv1/scale.*add a rule"):
        interop.torch_to_flax(conv_only, template, strict=False)
    mapped = interop.torch_to_flax(
        {"conv1.weight": np.ones((8, 1, 3, 3), np.float32)}, template, CONV_BN_RULES[:1], strict=False
    )
    assert np.all(mapped["params"]["conv1"]["kernel"] == 1) and np.all(mapped["params"]["conv1"]["scale"] == 1)
    assert np.all(np.asarray(mapped["params"]["conv1"]["bias"]) == 0)


def test_cnn_with_batchnorm_fake_quant_logits_match_torch(tmp_path):
    x_train, y_train, x_test, _ = load_digits_split()
    model = TorchCNN()
    model.qconfig = _qconfig()
    model = tq.fuse_modules_qat(model.train(), [["conv1", "bn1", "relu1"], ["conv2", "bn2", "relu2"]])
    tq.prepare_qat(model, inplace=True)
    assert isinstance(model.conv1, torch.ao.nn.intrinsic.qat.ConvBnReLU2d)
    _train(model, x_train, y_train, steps=25)
    model.apply(tq.disable_observer)
    model.apply(torch.ao.nn.intrinsic.qat.freeze_bn_stats)
    model.eval()
    # jquant has no site for the logits' own fake quant (fc output incl. bias): compare before it
    model.fc.activation_post_process.disable_fake_quant()
    path = tmp_path / "cnn_qat.pt"
    torch.save(model.state_dict(), path)

    seen, handles = _record_fake_quants(model, ["quant", "conv1", "conv2"])
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_test)).numpy()
    for h in handles:
        h.remove()

    fm = FlaxCNN()
    template = fm.init(jax.random.key(0), x_test[:2])
    template = {"params": template["params"], "batch_stats": template["batch_stats"]}
    variables, report = interop.torch_to_flax(
        _float_tensors(interop.load_torch_checkpoint(path)), template, CONV_BN_RULES, with_report=True
    )
    assert report.ok and report.ignored == ["conv1.bn.num_batches_tracked", "conv2.bn.num_batches_tracked"]

    table = interop.import_qparams(path, model=model)
    config = [
        Rule(
            weight=interop.spec_from_record(table["conv1"]["weight"]),
            inputs=interop.spec_from_record(table["quant"]["output"]),
        )
    ]
    qf = jquant.quantize(lambda v, x: fm.apply(v, x, mutable=["intermediates"]), config)
    qstate0 = qf.init(variables, x_test)
    links = interop.link_sites(table, qf.sites, qstate=qstate0)
    rows = {(lk.torch_module, lk.torch_role): (lk.site.split("/")[-2], lk.key) for lk in links}
    assert rows == {
        ("quant", "output"): ("conv1", "input"),
        ("conv1", "weight"): ("conv1", "weight"),  # the BN-folded kernel, per output channel
        ("conv1", "output"): ("conv2", "input"),
        ("conv2", "weight"): ("conv2", "weight"),
        ("conv2", "output"): ("fc", "input"),
        ("fc", "weight"): ("fc", "weight"),
    }
    qstate = interop.import_qparams(path, model=model, qstate=qstate0, sites=qf.sites, links=links)
    (out, state), _ = qf.apply(qstate, variables, x_test, mode="eval")
    jq_logits = np.asarray(out)
    nchw = {k.removesuffix("_out"): np.asarray(v[0]).transpose(0, 3, 1, 2) for k, v in state["intermediates"].items()}
    flagged, stats = _flips(seen, nchw)
    _check_parity(torch_logits, jq_logits, flagged, stats, sum(v.size for v in nchw.values()))

    # the test can fail: jquant's own (un-imported) qparams give clearly different logits
    (fresh, _), _ = qf.apply(qstate0, variables, x_test, mode="eval")
    assert np.abs(np.asarray(fresh) - torch_logits).max() > 1e-2


# ------------------------------------------------------------------------------------- small transformer


class TorchTransformer(torch.nn.Module):
    """Digits as 8 tokens of 8 pixels: embed, one pre-LN attention block + MLP, mean pool, head.

    torch eager QAT fake-quantizes module *outputs*; jquant quantizes the inputs of weight-carrying
    dot_generals. Each Linear therefore gets its quantized input from a QuantStub placed right before it
    (or, for fc2, from the fused fc1+ReLU output), and the outputs of Linears that feed float ops
    (attention matmuls, residual adds, logits) are not fake-quantized (see ``_float_outputs``).
    """

    def __init__(self):
        super().__init__()
        self.quant = tq.QuantStub()
        self.embed = torch.nn.Linear(8, D)
        self.ln1 = torch.nn.LayerNorm(D)
        self.q_quant = tq.QuantStub()
        self.q = torch.nn.Linear(D, D)
        self.k_quant = tq.QuantStub()
        self.k = torch.nn.Linear(D, D)
        self.v_quant = tq.QuantStub()
        self.v = torch.nn.Linear(D, D)
        self.attn_quant = tq.QuantStub()
        self.out = torch.nn.Linear(D, D)
        self.ln2 = torch.nn.LayerNorm(D)
        self.mlp_quant = tq.QuantStub()
        self.fc1 = torch.nn.Linear(D, 2 * D)
        self.relu = torch.nn.ReLU()
        self.fc2 = torch.nn.Linear(2 * D, D)
        self.head_quant = tq.QuantStub()
        self.head = torch.nn.Linear(D, 10)

    def forward(self, x):
        x = self.embed(self.quant(x.reshape(x.shape[0], 8, 8)))
        h = self.ln1(x)
        q, k, v = self.q(self.q_quant(h)), self.k(self.k_quant(h)), self.v(self.v_quant(h))
        attn = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / D**0.5, dim=-1)
        x = x + self.out(self.attn_quant(torch.matmul(attn, v)))
        x = x + self.fc2(self.relu(self.fc1(self.mlp_quant(self.ln2(x)))))
        return self.head(self.head_quant(x.mean(1)))


class FlaxTransformer(nn.Module):
    @nn.compact
    def __call__(self, x):
        def keep(name, value):
            self.sow("intermediates", f"{name}_out", value)  # "_out": not a submodule name
            return value

        # torch's LayerNorm: eps 1e-5, two-pass variance
        norm = dict(epsilon=1e-5, use_fast_variance=False)
        x = nn.Dense(D, name="embed")(keep("quant", x.reshape(x.shape[0], 8, 8)))
        h = keep("ln1", nn.LayerNorm(**norm, name="ln1")(x))
        q, k, v = (nn.Dense(D, name=n)(h) for n in ("q", "k", "v"))
        attn = jax.nn.softmax(jnp.einsum("btd,bsd->bts", q, k) / D**0.5, axis=-1)
        x = x + nn.Dense(D, name="out")(keep("attn_quant", jnp.einsum("bts,bsd->btd", attn, v)))
        h = nn.relu(nn.Dense(2 * D, name="fc1")(keep("mlp_quant", nn.LayerNorm(**norm, name="ln2")(x))))
        x = x + nn.Dense(D, name="fc2")(keep("fc1", h))
        return nn.Dense(10, name="head")(keep("head_quant", x.mean(1)))


_float_outputs = ("embed", "q", "k", "v", "out", "fc2", "head")


def test_small_transformer_fake_quant_logits_match_torch(tmp_path):
    x_train, y_train, x_test, _ = load_digits_split()
    model = TorchTransformer()
    model.qconfig = _qconfig()
    model.ln1.qconfig = None  # LayerNorm stays float
    model.ln2.qconfig = None
    model = tq.fuse_modules_qat(model.train(), [["fc1", "relu"]])
    tq.prepare_qat(model, inplace=True)
    assert not hasattr(model.ln1, "activation_post_process")
    for name in _float_outputs:
        getattr(model, name).activation_post_process.disable_fake_quant()
    _train(model, x_train, y_train, steps=40)
    model.apply(tq.disable_observer)
    model.eval()
    path = tmp_path / "transformer_qat.pt"
    torch.save(model.state_dict(), path)

    points = ["quant", "q_quant", "k_quant", "v_quant", "attn_quant", "mlp_quant", "fc1", "head_quant"]
    seen, handles = _record_fake_quants(model, points)
    with torch.no_grad():
        torch_logits = model(torch.from_numpy(x_test)).numpy()
    for h in handles:
        h.remove()

    fm = FlaxTransformer()
    template = {"params": fm.init(jax.random.key(0), x_test[:2])["params"]}
    variables = interop.torch_to_flax(_float_tensors(interop.load_torch_checkpoint(path)), template)

    table = interop.import_qparams(path, model=model)
    config = [
        Rule(pattern=r"->"),  # the attention einsums (sites named by their equation) stay float, as in torch
        Rule(
            weight=interop.spec_from_record(table["q"]["weight"]),
            inputs=interop.spec_from_record(table["quant"]["output"]),
        ),
    ]
    qf = jquant.quantize(lambda v, x: fm.apply(v, x, mutable=["intermediates"]), config)
    qstate0 = qf.init(variables, x_test)
    assert sorted(s.name.split("/")[-2] for s in qf.sites if s.quantized) == sorted(
        ["embed", "q", "k", "v", "out", "fc1", "fc2", "head"]
    )
    links = interop.link_sites(table, qf.sites, qstate=qstate0)
    inputs = {lk.site.split("/")[-2]: lk.torch_module for lk in links if lk.key == "input"}
    assert inputs == {
        "embed": "quant",
        "q": "q_quant",
        "k": "k_quant",
        "v": "v_quant",
        "out": "attn_quant",
        "fc1": "mlp_quant",
        "fc2": "fc1",  # the fused fc1+ReLU output
        "head": "head_quant",
    }
    assert sorted(m for m, _ in interop.unlinked_records(table, links)) == sorted(_float_outputs)
    qstate = interop.import_qparams(path, model=model, qstate=qstate0, sites=qf.sites, links=links)
    (out, state), _ = qf.apply(qstate, variables, x_test, mode="eval")
    jq_logits = np.asarray(out)
    values = {k.removesuffix("_out"): np.asarray(v[0]) for k, v in state["intermediates"].items()}
    values.update({"q_quant": values["ln1"], "k_quant": values["ln1"], "v_quant": values.pop("ln1")})
    flagged, stats = _flips(seen, values)
    _check_parity(torch_logits, jq_logits, flagged, stats, sum(v.size for v in values.values()))

    (fresh, _), _ = qf.apply(qstate0, variables, x_test, mode="eval")
    assert np.abs(np.asarray(fresh) - torch_logits).max() > 1e-2
