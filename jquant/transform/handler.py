"""The site handler of ``jquant.quantize``: observe and fake-quantize a site's operands and output.

Modes (per stateful slot, i.e. a ``QuantizationSpec`` that is not dynamic):
- ``"calibrate"``: observers see the float tensors, qparams are refreshed, the site computes in float.
- ``"qat"``: observers are updated and the tensors fake-quantized with the refreshed qparams (STE); LSQ
  slots fake-quantize with their learnable qparams (observer still updated, qparams left to training).
- ``"eval"``: fake-quantize with the stored qparams; the state is returned unchanged.
Dynamic specs compute qparams from the tensor at every call (float in calibrate); fixed, shared and derived
specs have no state of their own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from jquant.numerics.affine import fake_quantize_affine
from jquant.transform import slots
from jquant.transform.interpreter import bind_eqn
from jquant.transform.sites import Site, View
from jquant.transform.specs import (
    DerivedQuantizationSpec,
    FixedQParamsSpec,
    QuantizationSpec,
    SharedQuantizationSpec,
)

MODES = ("calibrate", "qat", "eval")


def check_mode(mode: Any) -> str:
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    return mode


def stateful(spec: Any) -> bool:
    return isinstance(spec, QuantizationSpec) and not spec.is_dynamic


def layout_of(site: Site, key: str, spec: QuantizationSpec) -> slots.Layout:
    if key == "output":
        return slots.layout_for(spec, site.output_shape, (), "output")
    op = site.operand(key)
    return slots.layout_for(spec, op.shape, op.out_axes, op.role)


def init_site_state(site: Site) -> dict:
    """Unstacked initial state of one site: ``{key: slot}`` for every stateful slot."""
    state = {}
    for key, spec in site.specs.items():
        if stateful(spec):
            dtype = site.output_dtype if key == "output" else site.operand(key).dtype
            state[key] = slots.init_slot(spec, layout_of(site, key, spec), dtype)
    return state


def _fixed(spec: FixedQParamsSpec, x):
    if spec is None:
        return x
    return fake_quantize_affine(
        x, spec.scale, spec.zero_point, dtype=spec.dtype, quant_min=spec.quant_min, quant_max=spec.quant_max
    )


def _derived_axis(site: Site, key: str, shape: tuple[int, ...], size: int) -> int | None:
    if size == 1:
        return None
    candidates = site.operand(key).out_axes if key != "output" else ()
    for axis in (*candidates, len(shape) - 1):
        if shape[axis] == size:
            return axis
    raise ValueError(
        f"site {site.name!r}, {key!r}: derived qparams of size {size} do not match any axis of shape {shape}"
    )


def _shares_output(spec: Any) -> bool:
    return isinstance(spec, SharedQuantizationSpec) and spec.site is None and spec.target == "output"


class QuantizeHandler:
    """Site handler for one mode (see module docstring)."""

    def __init__(self, mode: str):
        self.mode = check_mode(mode)

    def __call__(self, site: Site | View, eqn, invals: list, state: dict, scope: Mapping[str, Any]):
        if isinstance(site, View):
            return self._view(site, eqn, invals, state)
        mode = self.mode
        state = dict(state)
        quantize = mode != "calibrate"
        qparams: dict[str, tuple[Any, Any]] = {}
        values = list(invals)
        specs = site.specs
        shared_from = {
            op.spec.target: op.key
            for op in site.operands
            if isinstance(op.spec, SharedQuantizationSpec) and op.spec.site is None and op.spec.target != "output"
        }

        # Observed / dynamic operands first; shared ones feed their target's observer too.
        for op in site.operands:
            spec = op.spec
            if not isinstance(spec, QuantizationSpec):
                continue
            x = invals[op.index]
            layout = layout_of(site, op.key, spec)
            if spec.is_dynamic:
                qparams[op.key] = slots.dynamic_qparams(spec, layout, x)
            else:
                if mode != "eval":
                    seen = [x] + ([invals[site.operand(shared_from[op.key]).index]] if op.key in shared_from else [])
                    state[op.key] = slots.observe(spec, layout, state[op.key], seen, set_learnable=mode == "calibrate")
                    qparams[op.key] = slots.slot_qparams(state[op.key])
                elif op.role == "weight":  # a weight's qparams need no calibration data
                    qparams[op.key] = slots.slot_qparams(slots.filled_from_weight(spec, layout, state[op.key], x))
                else:
                    qparams[op.key] = slots.slot_qparams(state[op.key])
            if quantize:
                lsq = spec.fake_quant == "lsq"
                values[op.index] = slots.fake_quant(spec, layout, x, *qparams[op.key], lsq)

        joining = [op for op in site.operands if _shares_output(op.spec)]
        if joining:  # a concatenate group owned by this site: its inputs are observed before its output
            values = self._observe_group(site.output_spec, "output", joining, invals, values, state)
        for op in site.operands:
            spec = op.spec
            if _shares_output(spec):
                continue
            if isinstance(spec, SharedQuantizationSpec) and spec.site is not None:
                if quantize:  # already quantized by another site: its qparams, no observer here
                    slot = scope[spec.site][spec.target]
                    layout = slots.layout_for(spec.spec, op.shape, (), "input")
                    values[op.index] = slots.fake_quant(spec.spec, layout, invals[op.index], *slots.slot_qparams(slot),
                                                        False)
            elif isinstance(spec, SharedQuantizationSpec) and quantize:
                target = site.operand(spec.target)
                layout = layout_of(site, spec.target, target.spec)
                lsq = target.spec.fake_quant == "lsq"
                values[op.index] = slots.fake_quant(target.spec, layout, invals[op.index], *qparams[spec.target], lsq)
            elif isinstance(spec, FixedQParamsSpec) and quantize:
                values[op.index] = _fixed(spec, invals[op.index])
            elif isinstance(spec, DerivedQuantizationSpec) and quantize:
                values[op.index] = self._derived(site, op.key, spec, invals[op.index], qparams, scope)

        outs = bind_eqn(eqn, values)
        out_spec = specs.get("output")
        if out_spec is not None and not site.fused:  # a fused pattern's output is observed at its tail (a View)
            outs[0] = self._output(site, out_spec, outs[0], state, qparams, scope)
        return outs, state

    def _observe_group(self, spec, key, ops, invals, values, state) -> list:
        """Observe each operand of ``ops`` into slot ``key`` (in order), fake-quantizing it with the result."""
        values = list(values)
        for op in ops:
            index = op.index if hasattr(op, "index") else op
            x = invals[index]
            layout = slots.layout_for(spec, tuple(jnp.shape(x)), (), "input")
            if self.mode != "eval":
                state[key] = slots.observe(spec, layout, state[key], [x], self.mode == "calibrate")
            if self.mode != "calibrate":
                values[index] = slots.fake_quant(spec, layout, x, *slots.slot_qparams(state[key]), False)
        return values

    def _view(self, view: View, eqn, invals: list, state: dict):
        """Another equation using a site's slot: a fused tail, a value-preserving op, a concatenate group."""
        state = dict(state)
        values = self._observe_group(view.spec, view.key, view.inputs, invals, invals, state)
        outs = bind_eqn(eqn, values)
        if view.output:
            y = outs[0]
            layout = slots.layout_for(view.spec, tuple(jnp.shape(y)), (), "output")
            if self.mode != "eval":
                state[view.key] = slots.observe(view.spec, layout, state[view.key], [y], self.mode == "calibrate")
            if self.mode != "calibrate":
                lsq = view.spec.fake_quant == "lsq"
                outs[0] = slots.fake_quant(view.spec, layout, y, *slots.slot_qparams(state[view.key]), lsq)
        return outs, state

    def merge(self, site: Site, state: dict, previous: dict, axis_names: tuple) -> dict:
        """Inside ``shard_map``: combine each slot's per-shard observer state with the observer's ``merge``
        (``previous``: the replicated state every shard started from), then recompute the qparams."""
        if self.mode == "eval":
            return state
        state = dict(state)
        for key, spec in site.specs.items():
            if stateful(spec):
                layout = layout_of(site, key, spec)
                observer = slots.observer_for(spec, layout)
                merged = observer.merge(state[key].observer, axis_names, previous[key].observer)
                state[key] = slots.with_observer_state(spec, layout, state[key], merged, self.mode == "calibrate")
        return state

    def _derived(self, site, key, spec: DerivedQuantizationSpec, x, qparams, scope):
        sources = []
        for ref in spec.derived_from:
            if ref.startswith("producer:"):
                producer = next(o.producer for o in site.operands if o.role == "input" and o.producer)
                slot = scope[producer].get(ref.split(":", 1)[1])
                if slot is None:
                    raise ValueError(
                        f"site {site.name!r}: {ref!r} has no stored qparams (it must use a static QuantizationSpec)"
                    )
                sources.append(slots.slot_qparams(slot))
            elif ":" in ref:  # "<site name>:<role>" of another site
                other, key = ref.rsplit(":", 1)
                sources.append(slots.slot_qparams(scope[other][key]))
            else:
                sources.append(qparams[ref])
        scale, zero_point = spec.derive_fn(*sources)
        scale = jnp.asarray(scale, jnp.float32)
        axis = _derived_axis(site, key, jnp.shape(x), scale.size)
        return fake_quantize_affine(
            x,
            scale.reshape(-1) if axis is not None else scale.reshape(()),
            jnp.asarray(zero_point).reshape(-1) if axis is not None else jnp.asarray(zero_point).reshape(()),
            dtype=spec.dtype,
            axis=axis,
            quant_min=spec.quant_min,
            quant_max=spec.quant_max,
        )

    def _output(self, site, spec, y, state, qparams, scope):
        quantize = self.mode != "calibrate"
        if isinstance(spec, FixedQParamsSpec):
            return _fixed(spec, y) if quantize else y
        if isinstance(spec, DerivedQuantizationSpec):
            return self._derived(site, "output", spec, y, qparams, scope) if quantize else y
        layout = layout_of(site, "output", spec)
        if spec.is_dynamic:
            scale, zero_point = slots.dynamic_qparams(spec, layout, y)
        else:
            if self.mode != "eval":
                state["output"] = slots.observe(spec, layout, state["output"], [y], self.mode == "calibrate")
            scale, zero_point = slots.slot_qparams(state["output"])
        return slots.fake_quant(spec, layout, y, scale, zero_point, spec.fake_quant == "lsq") if quantize else y
