"""QAT train step vs the float train step of the same model (jit, optax adam), MLP 784-1024-1024-10.

Rows: float step; jquant fake-quant QAT (``qf.apply(..., mode="qat")``, int8 W8A8, STE); jquant QAT with the
int8 fast path (``qf.apply(..., mode="qat", int8_forward=True)``: int8 x int8 -> int32 forward, f32 straight-through
backward), and with ``int8_backward=True`` (the input-gradient dots in int8 too); torch eager float and QAT
(``prepare_qat``, x86 qconfig) steps for reference. Ratios are step time / float step time of the same
framework, measured in the same run (median after warm-up, round-robin).

Run: ``.venv/bin/python benchmarks/qat_step.py [--batch 256] [--reps 30]``.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import optax
from bench_common import median_ms, mlp, mlp_params  # first: sets OMP_WAIT_POLICY

import jquant
from jquant import presets


def jax_steps(batch: int, reps: int) -> dict[str, float]:
    rng = np.random.default_rng(0)
    params = mlp_params(rng)
    x = jnp.asarray(rng.standard_normal((batch, 784)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, batch))
    opt = optax.adam(1e-3)
    opt_state = opt.init(params)

    def xent(logits):
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def float_step(params, opt_state, x):
        loss, grads = jax.value_and_grad(lambda p: xent(mlp(p, x)))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    qf = jquant.quantize(mlp, presets.qat_int8())
    qstate = qf.init(params, x)
    _, qstate = qf.apply(qstate, params, x, mode="calibrate")

    def make_qat_step(apply):
        @jax.jit
        def step(params, opt_state, qstate, x):
            def loss_fn(p):
                logits, new_qstate = apply(qstate, p, x)
                return xent(logits), new_qstate

            (loss, new_qstate), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, new_qstate, loss

        return step

    fake_step = make_qat_step(lambda qs, p, v: qf.apply(qs, p, v, mode="qat"))
    fast_step = make_qat_step(lambda qs, p, v: qf.apply(qs, p, v, mode="qat", int8_forward=True))
    fast8_step = make_qat_step(lambda qs, p, v: qf.apply(qs, p, v, mode="qat", int8_forward=True, int8_backward=True))
    return median_ms(
        {
            "JAX float step": lambda: jax.block_until_ready(float_step(params, opt_state, x)),
            "jquant QAT, fake-quant": lambda: jax.block_until_ready(fake_step(params, opt_state, qstate, x)),
            "jquant QAT, int8 fast path": lambda: jax.block_until_ready(fast_step(params, opt_state, qstate, x)),
            "jquant QAT, int8 fast path + int8 dx": lambda: jax.block_until_ready(
                fast8_step(params, opt_state, qstate, x)
            ),
        },
        reps,
    )


def torch_steps(batch: int, reps: int) -> dict[str, float]:
    import torch
    from torch import nn
    from torch.ao import quantization as tq

    torch.set_num_threads(2)
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant, self.dequant = tq.QuantStub(), tq.DeQuantStub()
            self.fc1, self.fc2, self.fc3 = nn.Linear(784, 1024), nn.Linear(1024, 1024), nn.Linear(1024, 10)

        def forward(self, x):
            x = self.quant(x)
            x = torch.relu(self.fc2(torch.relu(self.fc1(x))))
            return self.dequant(self.fc3(x))

    x, y = torch.randn(batch, 784), torch.randint(0, 10, (batch,))

    def step_fn(model):
        opt = torch.optim.Adam(model.parameters(), 1e-3)

        def step():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()

        return step

    qat = Net().train()
    qat.qconfig = tq.get_default_qat_qconfig("x86")
    return median_ms(
        {
            "torch float step": step_fn(Net().train()),
            "torch eager QAT (prepare_qat, x86)": step_fn(tq.prepare_qat(qat)),
        },
        reps,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--reps", type=int, default=30)
    parser.add_argument("--no-torch", action="store_true")
    args = parser.parse_args()
    jax_results = jax_steps(args.batch, args.reps)
    torch_results = {} if args.no_torch else torch_steps(args.batch, args.reps)
    print(f"\nQAT train step, MLP 784-1024-1024-10, batch {args.batch}, adam\n")
    print("| implementation | median ms | x float step (same framework) |")
    print("|---|---|---|")
    for name, ms in jax_results.items():
        print(f"| {name} | {ms:.2f} | {ms / jax_results['JAX float step']:.2f}x |")
    for name, ms in torch_results.items():
        print(f"| {name} | {ms:.2f} | {ms / torch_results['torch float step']:.2f}x |")


if __name__ == "__main__":
    main()
