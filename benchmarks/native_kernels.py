"""jquant's native CPU kernels (XLA FFI) vs JAX f32, XLA's own int8 path and torch, ratios in one run.

Rows (each states the kernel backend):
1. int8 GEMM ``M x 1024 x 1024`` (M = 256, 1): JAX f32, XLA s8 x s8 -> s32, the native GEMM (weight packed once),
   torch f32 (``torch._int_mm`` is left out: ~100x slower than f32 on this CPU build).
2. MLP 784-1024-1024-10 static int8 (per-tensor uint8 activations, per-channel int8 weights), batch 256 and 1:
   the layers chained on the kernels directly (ReLU + requantize to uint8 fused into each GEMM), and through
   ``jquant.convert`` (static preset; its weights are not prepacked yet, so it packs per call; and with
   ``pack_weight`` applied to its int params, what the converter will do); JAX f32; torch
   f32 and torch x86 int8 static (fused linear+relu).
3. Weight-only decode, batch 1, ``1 x 4096 x 11008`` (weights above L3 as f32) and ``1 x 4096 x 4096``: JAX f32,
   int8 per-channel and int4 group-128 weights on the native kernel (activations not quantized), the XLA
   ``dequantize`` form, torch f32 Linear and torch's dynamic int8 Linear.
Timing: round-robin repetitions after warm-up, median and minimum (the least disturbed run on a shared machine);
torch is timed in its own round (its OpenMP workers would otherwise take the cores from XLA). Ratios: "x faster
than JAX f32" from the medians and from the minima.

Run: ``.venv/bin/python benchmarks/native_kernels.py [--reps N] [--quick]``.
"""

from __future__ import annotations

import argparse
import datetime
import os

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import cpu_name, mlp, mlp_params, round_robin_ms  # first: sets OMP_WAIT_POLICY
from jax import lax

import jquant
from jquant import presets
from jquant.kernels import (
    QuantizedWeight,
    backend,
    int8_dot_general,
    pack_weight,
    packing,
    quantize_weight,
    weight_only_dot_general,
)
from jquant.kernels import native as native_kernels
from jquant.numerics.qparams import choose_qparams

DENSE = (((1,), (0,)), ((), ()))
# Per-variant timings of the last ``median_ms`` call: (median, min) ms. On a shared machine the minimum over
# round-robin repetitions is the least disturbed run; both are printed.
_LAST: dict = {}


def median_ms(fns: dict, reps: int, warmup: int = 3) -> dict:
    """Round-robin medians (``bench_common.round_robin_ms``); records (median, min) in ``_LAST``."""
    for name, t in round_robin_ms(fns, reps, warmup).items():
        _LAST[name] = (float(np.median(t)), float(np.min(t)))
    return {name: _LAST[name][0] for name in fns}


def _ready(fn, *args):
    return lambda: jax.block_until_ready(fn(*args))


def _torch_call(fn, *args):
    import torch

    def call():
        with torch.inference_mode():
            fn(*args)

    return call


def _rows(case: str, res: dict) -> list[tuple]:
    base_med, base_min = _LAST[("JAX f32", "xla")]
    return [(case, impl, be, *_LAST[(impl, be)], base_med / _LAST[(impl, be)][0], base_min / _LAST[(impl, be)][1])
            for impl, be in res]


def gemm_rows(rng, reps) -> list[tuple]:
    import torch

    rows = []
    for m in (256, 1):
        k = n = 1024
        x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((k, n)), jnp.float32)
        a8 = jnp.asarray(rng.integers(-128, 128, (m, k)), jnp.int8)
        w8 = jnp.asarray(rng.integers(-128, 128, (k, n)), jnp.int8)
        fns = {
            ("JAX f32", "xla"): _ready(jax.jit(jnp.dot), x, w),
            ("XLA int8 s8 x s8 -> s32", "xla"): _ready(
                jax.jit(lambda a, b: lax.dot(a, b, preferred_element_type=jnp.int32)), a8, w8),
        }
        if native_kernels.use_native():
            packed, colsum = packing.pack_s8_k4(w8), jnp.sum(w8.astype(jnp.int32), axis=0)
            gemm = jax.jit(lambda a, p, s, n=n: native_kernels.gemm_s8(a, p, s, n=n))
            np.testing.assert_array_equal(gemm(a8, packed, colsum), lax.dot(a8, w8, preferred_element_type=jnp.int32))
            fns[("jquant native int8 GEMM (packed once)", backend())] = _ready(gemm, a8, packed, colsum)
        res = median_ms(fns, reps)
        tx, tw = torch.randn(m, k), torch.randn(k, n)
        tfns = {("torch f32", "torch"): _torch_call(torch.matmul, tx, tw)}
        res.update(median_ms(tfns, reps))
        rows += _rows(f"int8 GEMM {m}x{k}x{n}", res)
    return rows


def _static_int8_mlp(params, calib):
    """Per-tensor uint8 activation qparams from min/max over ``calib``; weights per-channel int8, packed once."""

    def act_qparams(v):
        s, z = choose_qparams(v.min(), v.max(), dtype="uint8")
        return jnp.asarray(s, jnp.float32).reshape(()), jnp.asarray(z, jnp.int32).reshape(())

    h1 = jax.nn.relu(calib @ params["fc1"]["w"] + params["fc1"]["b"])
    h2 = jax.nn.relu(h1 @ params["fc2"]["w"] + params["fc2"]["b"])
    qp = [act_qparams(v) for v in (calib, h1, h2)]
    int_params = {name: {"w": pack_weight(quantize_weight(params[name]["w"], axis=-1, contracting_axes=(0,))),
                         "b": params[name]["b"]} for name in ("fc1", "fc2", "fc3")}

    def fn(p, x):
        (s0, z0), (s1, z1), (s2, z2) = qp
        h = int8_dot_general(x, p["fc1"]["w"], DENSE, act_scale=s0, act_zero_point=z0, bias=p["fc1"]["b"], relu=True,
                             out_scale=s1, out_zero_point=z1)
        h = int8_dot_general(h, p["fc2"]["w"], DENSE, act_scale=s1, act_zero_point=z1, bias=p["fc2"]["b"], relu=True,
                             out_scale=s2, out_zero_point=z2)
        return int8_dot_general(h, p["fc3"]["w"], DENSE, act_scale=s2, act_zero_point=z2, bias=p["fc3"]["b"])

    return jax.jit(fn), int_params


def _torch_mlp():
    import torch
    import torch.ao.quantization as tq
    from torch import nn

    class TorchMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
            self.fc1, self.relu1 = nn.Linear(784, 1024), nn.ReLU()
            self.fc2, self.relu2 = nn.Linear(1024, 1024), nn.ReLU()
            self.fc3 = nn.Linear(1024, 10)

        def forward(self, x):
            x = self.quant(x)
            return self.dequant(self.fc3(self.relu2(self.fc2(self.relu1(self.fc1(x))))))

    torch.manual_seed(0)
    model = TorchMLP().eval()
    torch.backends.quantized.engine = "x86"
    static = tq.fuse_modules(model, [["fc1", "relu1"], ["fc2", "relu2"]])
    static.qconfig = tq.get_default_qconfig("x86")
    prepared = tq.prepare(static)
    with torch.inference_mode():
        for _ in range(4):
            prepared(torch.randn(64, 784))
    return model, tq.convert(prepared)


def mlp_rows(rng, reps) -> list[tuple]:
    import torch

    params = mlp_params(rng)
    calib = jnp.asarray(rng.standard_normal((256, 784)), jnp.float32)
    kernels_fn, kernels_params = _static_int8_mlp(params, calib)
    qf = jquant.quantize(mlp, presets.int8_static())
    qstate = qf.init(params, calib[:64])
    _, qstate = qf.apply(qstate, params, calib[:64], mode="calibrate")
    t_float, t_static = _torch_mlp()
    f32 = jax.jit(mlp)
    rows = []
    for batch in (256, 1):
        x = jnp.asarray(rng.standard_normal((batch, 784)), jnp.float32)
        ref = f32(params, x)
        err = float(jnp.max(jnp.abs(kernels_fn(kernels_params, x) - ref)))
        # Converted per batch: today an int_fn converted at batch 256 does not accept batch 1 (converter issue).
        conv_fn, conv_params = jquant.convert(qf, qstate, params, x)
        packed_params = jax.tree.map(lambda v: pack_weight(v, (0,)) if isinstance(v, QuantizedWeight) else v,
                                     conv_params, is_leaf=lambda v: isinstance(v, QuantizedWeight))
        fns = {
            ("JAX f32", "xla"): _ready(f32, params, x),
            (f"jquant int8 static, kernels chained (fused relu+requant; max |err| vs f32 {err:.3f})", backend()):
                _ready(kernels_fn, kernels_params, x),
            ("jquant int8 static, jquant.convert", backend()): _ready(conv_fn, conv_params, x),
            ("jquant int8 static, jquant.convert + pack_weight on its weights", backend()):
                _ready(conv_fn, packed_params, x),
        }
        with native_kernels.xla_kernels():
            xla_fn, _ = _static_int8_mlp(params, calib)
            xla_fn(kernels_params, x)  # trace with the XLA kernels now
        fns[("jquant int8 static, kernels chained", "xla")] = _ready(xla_fn, kernels_params, x)
        res = median_ms(fns, reps if batch > 8 else 10 * reps)
        tx = torch.randn(batch, 784)
        res.update(median_ms({("torch f32", "torch"): _torch_call(t_float, tx),
                              ("torch int8 static (x86, fused linear+relu)", "torch"): _torch_call(t_static, tx)},
                             reps if batch > 8 else 10 * reps))
        rows += _rows(f"MLP 784-1024-1024-10 batch {batch}", res)
    return rows


def decode_rows(rng, reps) -> list[tuple]:
    import torch

    rows = []
    for k, n in ((4096, 11008), (4096, 4096)):
        x = jnp.asarray(rng.standard_normal((1, k)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((k, n)) / np.sqrt(k), jnp.float32)
        q8 = pack_weight(quantize_weight(w, axis=-1), (0,))
        q4 = pack_weight(quantize_weight(w, dtype="int4", axis=-1, group_size=128, group_axis=0), (0,))
        wo = jax.jit(lambda x, q: weight_only_dot_general(x, q, DENSE))
        fns = {("JAX f32", "xla"): _ready(jax.jit(jnp.dot), x, w)}
        if native_kernels.use_native():
            fns[("jquant weight-only int8 (per channel)", backend())] = _ready(wo, x, q8)
            fns[("jquant weight-only int4 (group 128)", backend())] = _ready(wo, x, q4)
        with native_kernels.xla_kernels():
            wo_xla = jax.jit(lambda x, q: weight_only_dot_general(x, q, DENSE))
            wo_xla(x, q8), wo_xla(x, q4)
        fns[("jquant weight-only int8, dequantize form", "xla")] = _ready(wo_xla, x, q8)
        fns[("jquant weight-only int4, dequantize form", "xla")] = _ready(wo_xla, x, q4)
        res = median_ms(fns, reps)
        lin = torch.nn.Linear(k, n, bias=False).eval()
        dyn = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8)
        tx = torch.randn(1, k)
        res.update(median_ms({("torch f32 Linear", "torch"): _torch_call(lin, tx),
                              ("torch dynamic int8 Linear (torch.ao)", "torch"): _torch_call(dyn, tx)}, reps))
        rows += _rows(f"weight-only decode 1x{k}x{n}", res)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="few repetitions (smoke run)")
    parser.add_argument("--only", default="gemm,mlp,decode")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    reps = 3 if args.quick else args.reps
    rng = np.random.default_rng(0)
    parts = {"gemm": gemm_rows, "mlp": mlp_rows, "decode": decode_rows}
    rows = [row for name in args.only.split(",") for row in parts[name](rng, reps)]
    print(f"\n{datetime.date.today()}; machine: {cpu_name()}, {os.cpu_count()} CPUs; kernels backend: {backend()}; "
          f"jax {jax.__version__}, torch {torch.__version__}; load average {os.getloadavg()[0]:.1f}\n")
    print("| case | implementation | backend | median ms | min ms | x JAX f32 (median) | x JAX f32 (min) |")
    print("|---|---|---|---|---|---|---|")
    for case, impl, be, med, mn, r_med, r_min in rows:
        print(f"| {case} | {impl} | {be} | {med:.3f} | {mn:.3f} | {r_med:.2f}x | {r_min:.2f}x |")


if __name__ == "__main__":
    main()
