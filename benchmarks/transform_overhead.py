"""Cost of ``jquant.quantize`` vs a hand-written fake-quant MLP (784-1024-1024-10), measured in the same run.

Prints step time (median of N runs) and compile time for:
- eval forward: stored qparams, fake-quant activations and per-channel weights;
- QAT train step: observers updated (min/max), fake quant with the new qparams, grad w.r.t. the weights;
and plain float ``jax.jit`` compile time for reference. Ratios = jquant / hand-written.

Run: ``.venv/bin/python benchmarks/transform_overhead.py [--batch 256] [--iters 30]``
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from functools import partial

import jax
import jax.numpy as jnp

from jquant.numerics.affine import fake_quantize_affine
from jquant.observers import MinMaxObserver, PerChannelMinMaxObserver
from jquant.transform import quantize

SIZES = (784, 1024, 1024, 10)


def init_params(key):
    keys = jax.random.split(key, len(SIZES))
    return [
        {"w": jax.random.normal(k, (i, o)) / jnp.sqrt(i), "b": jnp.zeros(o)}
        for k, i, o in zip(keys, SIZES[:-1], SIZES[1:], strict=False)
    ]


def mlp(params, x):
    for i, layer in enumerate(params):
        x = x @ layer["w"] + layer["b"]
        if i < len(params) - 1:
            x = jax.nn.relu(x)
    return x


def loss_fn(out, y):
    return -jnp.mean(jnp.sum(jax.nn.log_softmax(out) * jax.nn.one_hot(y, 10), axis=-1))


# -- hand-written fake quant --------------------------------------------------------------------------------
ACT_OBS = MinMaxObserver(dtype="int8", qscheme="per_tensor_affine")
W_OBS = PerChannelMinMaxObserver(ch_axis=1, dtype="int8", qscheme="per_channel_symmetric")


def hand_state(params, x):
    """Observer states and qparams per layer, written by hand with the same observers as the preset."""
    state = []
    for layer in params:
        act, w = ACT_OBS.init(x), W_OBS.init(layer["w"])
        state.append({"act": act, "w": w, "qp": ACT_OBS.calculate_qparams(act), "wqp": W_OBS.calculate_qparams(w)})
        x = jnp.zeros((x.shape[0], layer["w"].shape[1]))
    return state


def hand_forward(params, state, x, observe):
    """Hand-written int8 static fake quant: observe (optional), qparams from the state, fake quant."""
    new_state = []
    for i, (layer, st) in enumerate(zip(params, state, strict=True)):
        w = layer["w"]
        if observe:
            act = ACT_OBS.update(st["act"], jax.lax.stop_gradient(x))
            wst = W_OBS.update(st["w"], jax.lax.stop_gradient(w))
            st = {"act": act, "w": wst, "qp": ACT_OBS.calculate_qparams(act), "wqp": W_OBS.calculate_qparams(wst)}
        (s, z), (ws, wz) = st["qp"], st["wqp"]
        x = fake_quantize_affine(x, s, z) @ fake_quantize_affine(w, ws, wz, axis=1) + layer["b"]
        if i < len(params) - 1:
            x = jax.nn.relu(x)
        new_state.append(st)
    return x, new_state


def compile_timed(fn, *args):
    """(compiled executable, compile seconds including tracing)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - start
    jax.block_until_ready(compiled(*args))
    return compiled, seconds


def alternating_medians(calls: list, iters: int) -> list[float]:
    """Median seconds per call, calling the candidates in turn so they share the machine's noise."""
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(iters):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            jax.block_until_ready(call())
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def hlo_ops(text: str) -> list[str]:
    """Sorted instruction opcodes of an optimized HLO module (names, layouts and metadata ignored)."""
    ops = []
    for line in text.splitlines():
        if " = " in line:
            match = re.search(r"\b([a-z][a-z0-9-]*)\(", line.split(" = ", 1)[1])
            if match:
                ops.append(match.group(1))
    return sorted(ops)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--iters", type=int, default=30)
    args = parser.parse_args()
    params = init_params(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (args.batch, 784))
    y = jax.random.randint(jax.random.key(2), (args.batch,), 0, 10)

    qf = quantize(mlp)
    qstate = qf.init(params, x)
    _, qstate = qf.apply(qstate, params, x, mode="calibrate")
    hstate = hand_forward(params, hand_state(params, x), x, observe=True)[1]

    def jq_eval(qs, p, x):
        return qf.apply(qs, p, x, mode="eval")[0]

    def hand_eval(hs, p, x):
        return hand_forward(p, hs, x, observe=False)[0]

    def jq_step(qs, p, x, y):
        def loss(p):
            out, new = qf.apply(qs, p, x, mode="qat")
            return loss_fn(out, y), new

        (value, new), grads = jax.value_and_grad(loss, has_aux=True)(p)
        return value, grads, new

    def hand_step(hs, p, x, y):
        def loss(p):
            out, new = hand_forward(p, hs, x, observe=True)
            return loss_fn(out, y), new

        (value, new), grads = jax.value_and_grad(loss, has_aux=True)(p)
        return value, grads, new

    def float_step(p, x, y):
        return jax.value_and_grad(lambda p: loss_fn(mlp(p, x), y))(p)

    rows = []
    for label, jq, hand, jargs, hargs in [
        ("eval forward", jq_eval, hand_eval, (qstate, params, x), (hstate, params, x)),
        ("QAT train step", jq_step, hand_step, (qstate, params, x, y), (hstate, params, x, y)),
    ]:
        hand_exe, hand_c = compile_timed(hand, *hargs)
        jq_exe, jq_c = compile_timed(jq, *jargs)  # includes tracing through the interpreter
        same_hlo = hlo_ops(jq_exe.as_text()) == hlo_ops(hand_exe.as_text())
        calls = [partial(jq_exe, *jargs), partial(hand_exe, *hargs)]
        jq_t, hand_t = alternating_medians(calls, args.iters)
        rows.append((label, jq_t, hand_t, jq_c, hand_c, same_hlo))
    float_exe, float_c = compile_timed(float_step, params, x, y)
    (float_t,) = alternating_medians([partial(float_exe, params, x, y)], args.iters)

    print(f"MLP {'-'.join(map(str, SIZES))}, batch {args.batch}, {jax.devices()[0].device_kind}")
    header = f"{'':16} {'jquant ms':>10} {'hand ms':>9} {'ratio':>6} | {'jq compile s':>12} {'hand compile s':>14}"
    print(header + " | same HLO ops")
    for label, jq_t, hand_t, jq_c, hand_c, same in rows:
        print(
            f"{label:16} {jq_t * 1e3:10.3f} {hand_t * 1e3:9.3f} {jq_t / hand_t:6.3f} | {jq_c:12.3f} "
            f"{hand_c:14.3f} | {same}"
        )
    print(f"float train step: {float_t * 1e3:.3f} ms, compile {float_c:.3f} s (plain jax.jit)")


if __name__ == "__main__":
    main()
