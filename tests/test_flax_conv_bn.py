"""ConvBN (BN folded into the conv weight) trains like torch's Conv2d + BatchNorm2d and fuses exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import torch

from jquant.flax import ConvBN


def _pair(rng):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    bn = torch.nn.BatchNorm2d(8, momentum=0.1, eps=1e-5)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor(rng.uniform(0.5, 1.5, 8), dtype=torch.float32))
        bn.bias.copy_(torch.tensor(rng.normal(0, 0.1, 8), dtype=torch.float32))
        bn.running_mean.copy_(torch.tensor(rng.normal(0, 0.2, 8), dtype=torch.float32))
        bn.running_var.copy_(torch.tensor(rng.uniform(0.5, 2.0, 8), dtype=torch.float32))
    variables = {
        "params": {
            "kernel": jnp.asarray(conv.weight.detach().numpy().transpose(2, 3, 1, 0)),
            "scale": jnp.asarray(bn.weight.detach().numpy()),
            "bias": jnp.asarray(bn.bias.detach().numpy()),
        },
        "batch_stats": {"mean": jnp.asarray(bn.running_mean.numpy()), "var": jnp.asarray(bn.running_var.numpy())},
    }
    return conv, bn, variables


def test_training_forward_and_running_stats_match_torch(rng):
    conv, bn, variables = _pair(rng)
    x = rng.standard_normal((4, 6, 6, 3)).astype(np.float32)
    module = ConvBN(8, (3, 3))
    out, updates = module.apply(variables, x, train=True, mutable=["batch_stats"])
    bn.train()
    want = bn(conv(torch.tensor(x.transpose(0, 3, 1, 2)))).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5)
    np.testing.assert_allclose(np.asarray(updates["batch_stats"]["mean"]), bn.running_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(np.asarray(updates["batch_stats"]["var"]), bn.running_var.numpy(), rtol=1e-5)


def test_inference_is_the_fused_conv_and_frozen_bn_uses_running_stats(rng):
    conv, bn, variables = _pair(rng)
    x = rng.standard_normal((2, 5, 5, 3)).astype(np.float32)
    module = ConvBN(8, (3, 3))
    bn.eval()
    want = bn(conv(torch.tensor(x.transpose(0, 3, 1, 2)))).detach().numpy().transpose(0, 2, 3, 1)
    np.testing.assert_allclose(np.asarray(module.apply(variables, x)), want, atol=2e-5)
    frozen, updates = jax.jit(
        lambda v, x, f: module.apply(v, x, train=True, freeze_bn=f, mutable=["batch_stats"])
    )(variables, x, True)
    np.testing.assert_allclose(np.asarray(frozen), want, atol=2e-5)
    assert np.array_equal(np.asarray(updates["batch_stats"]["var"]), np.asarray(variables["batch_stats"]["var"]))
