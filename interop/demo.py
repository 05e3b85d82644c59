"""End-to-end demo (``make demo``): float -> QAT int8 -> integer model -> PyTorch, on scikit-learn's digits.

1. Train a small CNN (ConvBN-ReLU x2, Dense x2) in float.
2. Quantization-aware training: ``jquant.quantize`` inserts observers and fake quant into the unchanged
   model; BN is folded into the conv weights; observers and BN statistics freeze near the end.
3. ``jquant.convert``: int8 weights stored once, int8 x int8 -> int32 dots and convs.
4. Export weights + qparams to PyTorch and run torch's own int8 kernels on the same images.
"""

from __future__ import annotations

import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jquant
from jquant.examples.digits import accuracy, batches, cross_entropy, load_digits_split, train_float
from jquant.flax import QATSchedule, QATTrainState, fold_conv_bn

# W8A8 with uint8 activations, which is what torch's x86 int8 kernels take.
QAT_CONFIG = jquant.presets.qat_int8(activation_dtype="uint8")


def qat(model, variables, x_train, y_train, *, epochs: int = 3, batch_size: int = 64):
    """QAT from the float weights; returns the final train state."""
    steps_per_epoch = len(x_train) // batch_size
    schedule = QATSchedule(fake_quant_start=steps_per_epoch // 2, observer_freeze=steps_per_epoch * (epochs - 1))
    bn_freeze = steps_per_epoch * (epochs - 1)

    def train_fn(variables, x, freeze_bn):
        return model.apply(variables, x, train=True, freeze_bn=freeze_bn, mutable=["batch_stats"])

    qf = jquant.quantize(train_fn, QAT_CONFIG)
    state = QATTrainState.create_qat(
        qfn=qf, params=variables, tx=optax.adam(1e-3), example_args=(x_train[:batch_size], False), schedule=schedule
    )

    @jax.jit
    def step(state, xb, yb):
        freeze_bn = state.step >= bn_freeze

        def loss_fn(variables):
            (logits, updates), qstate = state.scheduled_apply(variables, xb, freeze_bn)
            return cross_entropy(logits, yb), (updates, qstate)

        (_, (updates, qstate)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grads = {"params": grads["params"], "batch_stats": jax.tree.map(jnp.zeros_like, grads["batch_stats"])}
        state = state.apply_gradients(grads=grads, qstate=qstate)
        return state.replace(params={"params": state.params["params"], "batch_stats": updates["batch_stats"]})

    for epoch in range(epochs):
        for xb, yb in batches(x_train, y_train, batch_size, 100 + epoch):
            state = step(state, xb, yb)
    return state


# torch's notices about its own eager quantization API, which this demo uses on purpose as the int8 oracle
_TORCH_NOTICES = (
    (DeprecationWarning, r"torch\.ao\.quantization is deprecated"),
    (UserWarning, r"torch\.quantize_per_tensor, torch\.quantize_per_channel and other quantized tensor creation"),
    (UserWarning, r"Please use quant_min and quant_max to specify the range for observers"),
    (UserWarning, r"must run observer before calling calculate_qparams"),
)


def torch_int8_predictions(qf, qstate, variables, x_calibrate, x_test) -> tuple[np.ndarray, float]:
    """Export the fused weights + qparams to a torch eager QAT model, convert it with torch, run torch's int8.

    Returns torch's int8 logits and the scale of their output grid. torch's deprecation notices about
    ``torch.ao.quantization`` (expected here) are silenced for this call only.
    """
    with warnings.catch_warnings():
        for category, message in _TORCH_NOTICES:
            warnings.filterwarnings("ignore", message=message, category=category)
        return _torch_int8_predictions(qf, qstate, variables, x_calibrate, x_test)


def _torch_int8_predictions(qf, qstate, variables, x_calibrate, x_test) -> tuple[np.ndarray, float]:
    import copy

    import torch
    from torch.ao import quantization as tq

    import interop

    class TorchDigitsCNN(torch.nn.Module):
        """The same network in torch; module names follow the Flax ones so the link table matches by name."""

        def __init__(self):
            super().__init__()
            self.quant = tq.QuantStub()
            self.ConvBN_0 = torch.nn.Conv2d(1, 16, 3, padding=1)
            self.relu0 = torch.nn.ReLU()
            self.ConvBN_1 = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
            self.relu1 = torch.nn.ReLU()
            self.Dense_0 = torch.nn.Linear(512, 64)
            self.relu2 = torch.nn.ReLU()
            self.Dense_1 = torch.nn.Linear(64, 10)
            self.dequant = tq.DeQuantStub()

        def forward(self, x):  # x: NHWC like the Flax model
            x = self.quant(x.permute(0, 3, 1, 2))
            x = self.relu1(self.ConvBN_1(self.relu0(self.ConvBN_0(x))))
            x = x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)  # flatten in Flax's NHWC order
            return self.dequant(self.Dense_1(self.relu2(self.Dense_0(x))))

    model = TorchDigitsCNN()
    model.qconfig = interop.torch_qat_qconfig()  # QAT_CONFIG in torch's terms
    fuse = [["ConvBN_0", "relu0"], ["ConvBN_1", "relu1"], ["Dense_0", "relu2"]]
    model = tq.fuse_modules_qat(model.train(), fuse)
    tq.prepare_qat(model, inplace=True)

    params, stats = variables["params"], variables["batch_stats"]
    fused = {name: fold_conv_bn(params[name], stats[name]) for name in ("ConvBN_0", "ConvBN_1")}
    fused.update({name: params[name] for name in ("Dense_0", "Dense_1")})
    table = interop.read_torch_qparams(model.state_dict(), model=model)
    links = interop.link_sites(table, qf.sites, qstate=qstate)
    state_dict = interop.export_qparams(qstate, model, sites=qf.sites, links=links)
    state_dict.update(interop.flax_to_torch(fused, model.state_dict(), strict=False))
    model.load_state_dict(state_dict, strict=True)
    # jquant leaves the logits in float; torch quantizes them, so it observes their range itself
    model.apply(tq.disable_observer)
    model.Dense_1.activation_post_process.enable_observer()
    with torch.no_grad():
        model(torch.from_numpy(x_calibrate))
    int8_model = tq.convert(copy.deepcopy(model.eval()))
    with torch.no_grad():
        logits = int8_model(torch.from_numpy(x_test)).numpy()
    return logits, float(int8_model.Dense_1.scale)


def _nbytes(tree) -> int:
    return sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(tree))


def run() -> dict:
    """Run every stage; returns the accuracies, sizes and agreements that ``main`` prints."""
    started = time.perf_counter()
    x_train, y_train, x_test, y_test = load_digits_split()
    model, float_vars, _ = train_float(epochs=6)
    float_acc = accuracy(model.apply(float_vars, x_test), y_test)

    state = qat(model, float_vars, x_train, y_train)
    qat_vars = state.params
    eval_fn = lambda variables, x: model.apply(variables, x)  # noqa: E731  (inference graph: BN folded)
    qf = jquant.quantize(eval_fn, QAT_CONFIG)
    fake_logits, _ = qf.apply(state.qstate, qat_vars, x_test, mode="eval")
    fake_acc = accuracy(fake_logits, y_test)

    from jquant import convert

    int_fn, int_params = convert(qf, state.qstate, qat_vars, x_test)
    int_logits = int_fn(int_params, x_test)
    int_acc = accuracy(int_logits, y_test)
    agree = float((np.asarray(jnp.argmax(int_logits, -1)) == np.asarray(jnp.argmax(fake_logits, -1))).mean())

    torch_logits, out_step = torch_int8_predictions(qf, state.qstate, qat_vars, x_train, x_test)
    torch_acc = accuracy(torch_logits, y_test)
    torch_agree = float((torch_logits.argmax(1) == np.asarray(jnp.argmax(int_logits, -1))).mean())

    return {
        "rows": [
            ("float32", float_acc, _nbytes(float_vars)),
            ("fake-quant (QAT, eval)", fake_acc, _nbytes(qat_vars)),
            ("int8 (jquant.convert)", int_acc, _nbytes(int_params)),
            ("int8 (torch x86 kernels)", torch_acc, None),
        ],
        "float_acc": float_acc,
        "int_acc": int_acc,
        "int_vs_fake_agreement": agree,
        "torch_vs_int_agreement": torch_agree,
        "torch_step": out_step,
        "n_test": len(x_test),
        "seconds": time.perf_counter() - started,
    }


def main() -> dict:
    """Run the demo and print its report; returns the results of :func:`run`."""
    results = run()
    print(f"\njquant demo: digits CNN (scikit-learn digits, 8x8 images, {results['n_test']} test images)\n")
    print(f"| {'model':<24} | {'accuracy':>8} | {'weights':>11} |")
    print(f"|{'-' * 26}|{'-' * 10}|{'-' * 13}|")
    for name, acc, size in results["rows"]:
        shown = f"{size / 1024:7.1f} KiB" if size is not None else "exported"
        print(f"| {name:<24} | {acc * 100:7.2f}% | {shown:>11} |")
    print(f"\njquant int8 vs fake-quant argmax agreement: {results['int_vs_fake_agreement'] * 100:.2f}%")
    print(
        f"torch int8 vs jquant int8 argmax agreement: {results['torch_vs_int_agreement'] * 100:.2f}% "
        f"(torch logit step {results['torch_step']:.3f})"
    )
    print(f"accuracy change float -> int8: {(results['int_acc'] - results['float_acc']) * 100:+.2f} points")
    print(f"total time: {results['seconds']:.1f} s")
    print(
        "\nthe code: interop/demo.py (this script: QAT, convert, torch export) and jquant/examples/digits.py "
        "(model and float training)\n"
        "try next:\n"
        "  - deploy the int8 function: jquant.save_int_params / jquant.export_int_fn (README.md)\n"
        "  - your own JAX/Flax function: README.md, 'Usage tour' (jquant.quantize, calibrate, jquant.convert)\n"
        "  - torch checkpoints: jquant-convert --help (torch <-> Flax checkpoint conversion)"
    )
    return results


if __name__ == "__main__":
    main()
