"""Side-by-side int8 inference against the peers that install from PyPI (the ``bench`` extra): qwix and torchao.

MLP 784-1024-1024-10, batch 1 and 256, dynamic W8A8 (activation scales computed at run time) and static
where the peer has it. Every ratio is against JAX f32 (or torch f32 for torch rows) measured in the same run,
timed round-robin so machine load hits all variants alike. Peers that are not installed are skipped.

    python benchmarks/peers.py [--reps 30]
"""

from __future__ import annotations

import argparse

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from bench_common import median_ms  # first: sets OMP_WAIT_POLICY

import jquant


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Dense(1024)(x))
        x = nn.relu(nn.Dense(1024)(x))
        return nn.Dense(10)(x)


def jax_variants(batch: int) -> tuple[dict, str]:
    model = MLP()
    x = jnp.asarray(np.random.default_rng(0).standard_normal((batch, 784)), jnp.float32)
    params = model.init(jax.random.PRNGKey(0), x)
    f32 = jax.jit(model.apply)
    fns = {"JAX f32": lambda: f32(params, x).block_until_ready()}
    for name, preset in (
        ("jquant int8 dynamic", jquant.presets.int8_dynamic()),
        ("jquant int8 static", jquant.presets.int8_static()),
    ):
        qf = jquant.quantize(model.apply, preset)
        qstate = qf.init(params, x)
        _, qstate = qf.apply(qstate, params, x, mode="calibrate")
        int_fn, int_params = jquant.convert(qf, qstate, params, x)
        fns[name] = lambda int_fn=int_fn, int_params=int_params: int_fn(int_params, x).block_until_ready()
    note = ""
    try:
        import qwix

        rules = [qwix.QuantizationRule(module_path=".*", weight_qtype=jnp.int8, act_qtype=jnp.int8)]
        ptq_model = qwix.quantize_model(model, qwix.PtqProvider(rules))
        abstract = jax.eval_shape(ptq_model.init, jax.random.PRNGKey(0), x)
        qparams = qwix.quantize_params(params["params"], abstract["params"])
        qwix_fn = jax.jit(ptq_model.apply)
        fns["qwix w8a8 dynamic (PTQ)"] = lambda: qwix_fn({"params": qparams}, x).block_until_ready()
    except ImportError:
        note = "qwix not installed: skipped"
    return fns, note


def torch_variants(batch: int) -> tuple[dict, str]:
    try:
        import torch
    except ImportError:
        return {}, "torch not installed: skipped"
    torch.set_num_threads(2)
    torch.manual_seed(0)
    make = lambda: torch.nn.Sequential(  # noqa: E731
        torch.nn.Linear(784, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 1024),
        torch.nn.ReLU(),
        torch.nn.Linear(1024, 10),
    ).eval()
    x = torch.randn(batch, 784)
    f32 = make()
    fns = {"torch f32": lambda: f32(x)}
    dynamic = torch.ao.quantization.quantize_dynamic(make(), {torch.nn.Linear}, dtype=torch.qint8)
    fns["torch.ao int8 dynamic"] = lambda: dynamic(x)
    note = ""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        ao_model = make()
        quantize_(ao_model, Int8DynamicActivationInt8WeightConfig())
        fns["torchao int8 dynamic (Int8DynamicActivationInt8WeightConfig)"] = lambda: ao_model(x)
    except ImportError:
        note = "torchao not installed: skipped"
    return fns, note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    print("| batch | implementation | median ms | x faster than same-framework f32 |")
    print("|---|---|---|---|")
    notes = set()
    for batch in (1, 256):
        for variants, baseline in (jax_variants(batch), "JAX f32"), (torch_variants(batch), "torch f32"):
            fns, note = variants
            if note:
                notes.add(note)
            if not fns:
                continue
            with __import__("torch").inference_mode() if baseline == "torch f32" else _null():
                times = median_ms(fns, args.reps)
            for name, ms in times.items():
                print(f"| {batch} | {name} | {ms:.3f} | {times[baseline] / ms:.2f}x |")
    for note in sorted(notes):
        print(f"\n{note}")


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
