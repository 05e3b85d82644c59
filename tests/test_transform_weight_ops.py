"""An equation that only combines weights (and constants) is a weight op, never an activation site."""

import jax.numpy as jnp
from jax import lax

import jquant
from jquant.transform.specs import QuantizationSpec, Rule


def _bn_folded_conv(params, x):
    factor = params["gamma"] * lax.rsqrt(params["var"] + 1e-5)
    kernel = params["kernel"] * factor + 0.0  # an add of weight-derived values: still a weight
    y = lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return y + (params["beta"] - factor * params["mean"])


def test_rule_naming_add_keeps_a_bn_folded_kernel_a_weight():
    params = {
        "kernel": jnp.ones((3, 3, 2, 4)), "gamma": jnp.ones(4), "var": jnp.ones(4), "mean": jnp.zeros(4),
        "beta": jnp.zeros(4),
    }
    act = QuantizationSpec("uint8", observer="minmax")
    weight = QuantizationSpec("int8", "per_channel_symmetric")
    config = [Rule(primitives=("conv_general_dilated", "add"), weight=weight, inputs=act)]
    qf = jquant.quantize(_bn_folded_conv, config)
    qf.init(params, jnp.ones((1, 5, 5, 2)))
    conv = next(s for s in qf.sites if s.primitive == "conv_general_dilated")
    kernel = conv.operand("weight")
    assert kernel.role == "weight" and kernel.param_path == "kernel" and kernel.spec == weight
    # The only add site is the bias add (activation + folded bias); no add of two weights is a site.
    adds = [s for s in qf.sites if s.primitive == "add"]
    assert len(adds) == 1 and sorted(adds[0].roles) == ["input", "weight"]
