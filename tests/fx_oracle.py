"""Shared checks of a jquant function against torch FX's x86 flow (prepare_fx / reference model / convert_fx)."""

import copy
import warnings

import jax.numpy as jnp
import numpy as np

import jquant


def fx_x86(model, x):
    """torch FX with the x86 qconfig mapping on a copy of ``model``, calibrated on ``x``: ``(prepared, reference
    model, int8 model)`` (``convert_to_reference_fx`` / ``convert_fx`` of their own copies; torch's deprecation
    notices silenced)."""
    import torch
    from torch.ao.quantization import quantize_fx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mapping = torch.ao.quantization.get_default_qconfig_mapping("x86")
        prepared = quantize_fx.prepare_fx(copy.deepcopy(model), mapping, (x,))
        prepared(x)
        reference = quantize_fx.convert_to_reference_fx(copy.deepcopy(prepared))
        return prepared, reference, quantize_fx.convert_fx(copy.deepcopy(prepared))


def distinct_observers(prepared) -> list:
    """The activation observers of a prepared FX model, one per instance (shared ones appear once), in order."""
    found = {id(m): m for n, m in prepared._modules.items() if n.startswith("activation_post_process")}
    return list(found.values())


def nhwc(t) -> jnp.ndarray:
    """A torch NCHW batch as the NHWC array the JAX models take."""
    return jnp.asarray(t.detach().numpy().astype(np.float32).transpose(0, 2, 3, 1))


def assert_slots_hold_fx_qparams(slots: list, observers: list) -> None:
    """Each jquant slot holds its torch observer's range (to float rounding) and qparams."""
    assert len(slots) == len(observers)
    for index, (slot, obs) in enumerate(zip(slots, observers, strict=True)):
        if hasattr(slot.observer, "min_val") and hasattr(obs, "min_val"):
            got = np.float32([slot.observer.min_val, slot.observer.max_val])
            np.testing.assert_allclose(got, np.float32([obs.min_val.item(), obs.max_val.item()]), rtol=1e-6)
        scale, zero_point = obs.calculate_qparams()
        assert int(slot.zero_point) == zero_point.item(), index
        np.testing.assert_allclose(np.float32(slot.scale), np.float32(scale.item()), rtol=1e-6, err_msg=index)


def assert_eval_and_convert_match_fx(qf, qstate, params, x, reference, int8: dict, step: float):
    """``eval`` equals torch's reference model (within one output ``step`` at ties, float rounding elsewhere);
    the converted function equals ``convert_fx`` on every batch of ``int8`` (``name -> (torch input, output)``)
    within one step on >= 99.9% of the elements. Returns the converted function and its params."""
    out, _ = qf.apply(qstate, params, x, mode="eval")
    error = np.abs(np.asarray(out) - reference)
    assert error.max() <= step * 1.001 and (error <= 1e-5).mean() >= 0.99, error.max() / step
    int_fn, int_params = jquant.convert(qf, qstate, params, x)
    for batch, (inputs, expected) in int8.items():
        error = np.abs(np.asarray(int_fn(int_params, nhwc(inputs))) - expected)
        assert (error <= step * 1.001).mean() >= 0.999, (batch, error.max() / step)
        assert error.max() <= 3 * step * 1.001, batch
    return int_fn, int_params
