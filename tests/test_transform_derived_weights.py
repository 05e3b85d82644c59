"""Values computed only from weights and constants are weights (BN folding, masks); mixing in data is not."""

import jax
import jax.numpy as jnp
import numpy as np

import jquant
from jquant.examples.digits import DigitsCNN


def _roles(qf):
    return {site.name: {op.key: (op.role, op.param_path) for op in site.operands} for site in qf.sites}


def test_bn_folded_conv_kernel_is_a_weight_with_per_channel_qparams():
    model = DigitsCNN()
    x = jnp.zeros((4, 8, 8, 1))
    variables = model.init(jax.random.PRNGKey(0), x)
    qf = jquant.quantize(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))
    qstate = qf.init(variables, x)
    conv = next(s for s in qf.sites if s.name.endswith("ConvBN_0/conv_general_dilated"))
    weight = next(op for op in conv.operands if op.index == 1)
    assert weight.role == "weight" and "ConvBN_0/kernel" in weight.param_path
    assert weight.out_axes == (3,)  # HWIO: one scale per output channel
    _, qstate = qf.apply(qstate, variables, x + 1.0, mode="calibrate")
    scale = np.asarray(qstate[conv.name][weight.key].scale)
    assert scale.size == 16


def test_weight_times_constant_is_a_weight_and_weight_times_data_is_not():
    def fn(params, x):
        a = x @ (params["w"] * 0.5)  # weight
        b = (x * params["s"]) @ params["w"]  # x * s is an activation, w a weight
        return a + b

    params = {"w": jnp.ones((3, 4)), "s": jnp.ones(3)}
    qf = jquant.quantize(fn)
    qf.init(params, jnp.ones((2, 3)))
    roles = [sorted(r for r, _ in site.values()) for site in _roles(qf).values()]
    assert roles == [["input", "weight"], ["input", "weight"]]
