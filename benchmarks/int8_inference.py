"""int8 inference: jquant.convert vs JAX f32 / bf16 and PyTorch's own int8 CPU runtime.

Models: MLP 784-1024-1024-10 and a small CNN (conv32-pool-conv64-pool-fc128-fc10 on 28x28x1), batch 1 and 256.
Rows: JAX f32, JAX bf16, jquant int8 static (calibrated W8A8, converted), jquant int8 dynamic, torch f32,
torch int8 static (eager ``prepare``/``convert``, x86 engine, fused conv/linear+relu), torch int8 dynamic
(``quantize_dynamic``; Linear layers only). Ratios are "times faster than JAX f32" measured in the same run:
median of several repetitions after warm-up, ``time.perf_counter`` + ``block_until_ready``.

Run: ``.venv/bin/python benchmarks/int8_inference.py [--reps N] [--quick]``. The machine may be shared:
run it a few times and keep the table of a quiet run.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import cpu_name, dense_params, median_ms, mlp, mlp_params  # first: sets OMP_WAIT_POLICY
from jax import lax

import jquant
from jquant import presets

# -- models (plain JAX; weights in the Flax layouts) ----------------------------------------------------------


def _conv(x, w, b):
    return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")) + b


def _pool(x):
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def cnn(params, x):
    h = _pool(jax.nn.relu(_conv(x, params["c1"]["w"], params["c1"]["b"])))
    h = _pool(jax.nn.relu(_conv(h, params["c2"]["w"], params["c2"]["b"])))
    h = h.reshape(h.shape[0], -1)
    h = jax.nn.relu(h @ params["fc1"]["w"] + params["fc1"]["b"])
    return h @ params["fc2"]["w"] + params["fc2"]["b"]


def _conv_params(rng, kh, kw, c_in, c_out):
    return {
        "w": jnp.asarray(rng.standard_normal((kh, kw, c_in, c_out)) / np.sqrt(kh * kw * c_in), jnp.float32),
        "b": jnp.asarray(rng.standard_normal(c_out) * 0.01, jnp.float32),
    }


def make_model(name: str, rng):
    if name == "mlp":
        params = mlp_params(rng)
        return mlp, params, (784,)
    params = {
        "c1": _conv_params(rng, 3, 3, 1, 32),
        "c2": _conv_params(rng, 3, 3, 32, 64),
        "fc1": dense_params(rng, 7 * 7 * 64, 128),
        "fc2": dense_params(rng, 128, 10),
    }
    return cnn, params, (28, 28, 1)


# -- torch counterparts ---------------------------------------------------------------------------------------


def torch_models(name: str):
    import torch
    from torch import nn
    from torch.ao import quantization as tq

    class TorchMLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
            self.fc1, self.relu1 = nn.Linear(784, 1024), nn.ReLU()
            self.fc2, self.relu2 = nn.Linear(1024, 1024), nn.ReLU()
            self.fc3 = nn.Linear(1024, 10)

        def forward(self, x):
            x = self.quant(x)
            x = self.relu2(self.fc2(self.relu1(self.fc1(x))))
            return self.dequant(self.fc3(x))

    class TorchCNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
            self.c1, self.r1 = nn.Conv2d(1, 32, 3, padding=1), nn.ReLU()
            self.c2, self.r2 = nn.Conv2d(32, 64, 3, padding=1), nn.ReLU()
            self.pool = nn.MaxPool2d(2)
            self.fc1, self.r3 = nn.Linear(7 * 7 * 64, 128), nn.ReLU()
            self.fc2 = nn.Linear(128, 10)

        def forward(self, x):
            x = self.quant(x)
            x = self.pool(self.r2(self.c2(self.pool(self.r1(self.c1(x))))))
            x = self.r3(self.fc1(torch.flatten(x, 1)))
            return self.dequant(self.fc2(x))

    torch.manual_seed(0)
    if name == "mlp":
        model, fuse, shape = TorchMLP().eval(), [["fc1", "relu1"], ["fc2", "relu2"]], (784,)
    else:
        model, fuse, shape = TorchCNN().eval(), [["c1", "r1"], ["c2", "r2"], ["fc1", "r3"]], (1, 28, 28)
    torch.backends.quantized.engine = "x86"
    dynamic = tq.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    static = tq.fuse_modules(model, fuse)
    static.qconfig = tq.get_default_qconfig("x86")
    prepared = tq.prepare(static)
    with torch.inference_mode():
        for _ in range(4):
            prepared(torch.randn(64, *shape))
    return model, tq.convert(prepared), dynamic, shape


# -- the benchmark --------------------------------------------------------------------------------------------


def run(reps_big: int, reps_small: int, batches, models) -> list[tuple]:
    import torch

    torch.set_num_threads(2)
    rng = np.random.default_rng(0)
    rows = []
    for name in models:
        fn, params, in_shape = make_model(name, rng)
        calib = jnp.asarray(rng.standard_normal((64, *in_shape)), jnp.float32)
        converted = {}
        configs = (("static", presets.int8_static()), ("static torch_x86, uint8 between ops", presets.torch_x86()),
                   ("dynamic", presets.int8_dynamic()))
        for label, config in configs:
            qf = jquant.quantize(fn, config)
            qstate = qf.init(params, calib)
            _, qstate = qf.apply(qstate, params, calib, mode="calibrate")
            converted[label] = (qf, qstate)
        t_float, t_static, t_dynamic, t_shape = torch_models(name)
        f32 = jax.jit(fn)
        bf16 = jax.jit(lambda p, x, fn=fn: fn(p, x.astype(jnp.bfloat16)))
        params_bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
        for batch in batches:
            reps = reps_big if batch > 8 else reps_small
            x = jnp.asarray(rng.standard_normal((batch, *in_shape)), jnp.float32)
            tx = torch.randn(batch, *t_shape)
            fns = {
                "JAX f32": lambda f=f32, p=params, x=x: f(p, x).block_until_ready(),
                "JAX bf16": lambda f=bf16, p=params_bf16, x=x: f(p, x).block_until_ready(),
            }
            for label, (qf, qstate) in converted.items():
                int_fn, int_params = jquant.convert(qf, qstate, params, x)
                fns[f"jquant int8 {label}"] = lambda f=int_fn, p=int_params, x=x: f(p, x).block_until_ready()
                if batch == 1 and label == "static":
                    nopad_fn, nopad_params = jquant.convert(qf, qstate, params, x, pad_batch_one=False)
                    fns["jquant int8 static, no batch-1 padding"] = lambda f=nopad_fn, p=nopad_params, x=x: f(
                        p, x
                    ).block_until_ready()
                if label == "static":
                    report = int_fn.report

            def in_inference_mode(model, tx=tx):
                def call():
                    with torch.inference_mode():
                        model(tx)

                return call

            # Frameworks are timed separately: torch's OpenMP workers spin after each call and would slow JAX.
            results = median_ms(fns, reps)
            results.update(
                median_ms(
                    {
                        "torch f32": in_inference_mode(t_float),
                        "torch int8 static (x86)": in_inference_mode(t_static),
                        "torch int8 dynamic": in_inference_mode(t_dynamic),
                    },
                    reps,
                )
            )
            for impl, ms in results.items():
                rows.append((name, batch, impl, ms, results["JAX f32"] / ms))
        rows.append(
            (
                name,
                "-",
                f"weights: {report.float_bytes / 1e6:.2f} MB f32 -> "
                f"{report.int_bytes / 1e6:.2f} MB int8 ({report.ratio:.2f}x smaller)",
                float("nan"),
                float("nan"),
            )
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=30, help="repetitions at batch 256 (batch 1: 10x)")
    parser.add_argument("--quick", action="store_true", help="few repetitions (smoke run)")
    parser.add_argument("--models", default="mlp,cnn")
    args = parser.parse_args()
    reps = 3 if args.quick else args.reps
    rows = run(reps, reps * 10, (1, 256), args.models.split(","))
    import os

    import torch

    print(f"\nMachine: {cpu_name()}, {os.cpu_count()} CPUs; jax {jax.__version__}, torch {torch.__version__}; "
          f"jquant kernels: {jquant.kernels.backend()}\n")
    print("| model | batch | implementation | median ms | x faster than JAX f32 |")
    print("|---|---|---|---|---|")
    for name, batch, impl, ms, ratio in rows:
        if np.isnan(ms):
            print(f"| {name} | | {impl} | | |")
        else:
            print(f"| {name} | {batch} | {impl} | {ms:.3f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
