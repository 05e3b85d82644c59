"""Run by test_flax_data_parallel.py in a subprocess with 8 simulated CPU devices."""

import json
import sys

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import jquant
from jquant.examples.digits import cross_entropy, load_digits_split
from jquant.flax import QATSchedule, QATTrainState


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape((x.shape[0], -1))
        return nn.Dense(10)(nn.relu(nn.Dense(32)(x)))


def main():
    assert jax.device_count() == 8, jax.devices()
    x_train, y_train, _, _ = load_digits_split()
    model = MLP()
    params = model.init(jax.random.PRNGKey(0), x_train[:2])
    qf = jquant.quantize(model.apply, jquant.presets.qat_int8())

    def new_state():
        return QATTrainState.create_qat(
            qfn=qf,
            params=params,
            tx=optax.sgd(0.05),
            example_args=(x_train[:64],),
            schedule=QATSchedule(fake_quant_start=2),
        )

    @jax.jit
    def step(state, xb, yb):
        def loss_fn(p):
            logits, qstate = state.scheduled_apply(p, xb)
            return cross_entropy(logits, yb), qstate

        (_, qstate), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads, qstate=qstate)

    mesh = Mesh(np.array(jax.devices()), ("data",))
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    single, sharded = new_state(), jax.device_put(new_state(), replicated)
    for i in range(4):
        xb, yb = x_train[i * 64 : (i + 1) * 64], y_train[i * 64 : (i + 1) * 64]
        single = step(single, xb, yb)
        sharded = step(sharded, jax.device_put(xb, batch_sharding), jax.device_put(yb, batch_sharding))
    leaves = lambda t: [np.asarray(a) for a in jax.tree.leaves(t)]

    def max_rel_diff(a, b):
        return max(
            float(np.max(np.abs(x - y) / (np.abs(x) + 1e-6)))
            for x, y in zip(leaves(a), leaves(b), strict=True)
            if x.dtype.kind == "f"
        )

    # what per-shard statistics would give: calibrate on the first shard's rows only
    shard_only = new_state()
    _, shard_qstate = qf.apply(shard_only.qstate, params, x_train[:8], mode="calibrate")
    _, global_qstate = qf.apply(shard_only.qstate, params, x_train[:64], mode="calibrate")
    report = {
        "qstate_max_rel_diff": max_rel_diff(single.qstate, sharded.qstate),
        "params_max_abs_diff": max(
            float(np.abs(a - b).max()) for a, b in zip(leaves(single.params), leaves(sharded.params), strict=True)
        ),
        "per_shard_vs_global_rel_diff": max_rel_diff(shard_qstate, global_qstate),
        "qstate_sharding": str(jax.tree.leaves(sharded.qstate)[0].sharding),
    }
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
