"""One quantized tensor ("slot") of a site: observer, qparams layout, observe and fake-quantize.

Layouts. Per-tensor and single-axis per-channel qparams apply to the tensor as it is. A weight whose
output features span several dims (an einsum kernel ``(d, heads, head_dim)``) or that has per-group
qparams is viewed as a 2-D matrix first: output-feature dims moved to the front and flattened into rows,
contraction dims into columns, then split into groups of ``block_size`` columns (one row per group). The
observer and fake quant then run per row (``ch_axis=0``), so any per-channel observer works unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jquant.numerics.affine import fake_quantize_affine
from jquant.numerics.lsq import (
    fake_quantize_learnable_per_channel_affine,
    fake_quantize_learnable_per_tensor_affine,
)
from jquant.numerics.qtypes import qrange
from jquant.observers import get_observer
from jquant.transform.specs import QuantizationSpec


class QParams(NamedTuple):
    """A scale and zero point (per tensor, or one entry per channel / row of the layout)."""

    scale: jax.Array
    zero_point: jax.Array


class ObservedSlot(NamedTuple):
    """State of one observed tensor: the observer's state and the qparams computed from it."""

    observer: Any
    scale: jax.Array
    zero_point: jax.Array


class LearnableSlot(NamedTuple):
    """State of one LSQ tensor: the observer's state and trainable float32 qparams (see ``learnable_params``)."""

    observer: Any
    scale: jax.Array
    zero_point: jax.Array


Slot = ObservedSlot | LearnableSlot


@dataclasses.dataclass(frozen=True)
class Layout:
    """How qparams map onto a tensor of ``shape``: ``axis`` None = per tensor; ``perm``/``rows`` = 2-D view."""

    shape: tuple[int, ...]
    axis: int | None = None
    perm: tuple[int, ...] | None = None
    rows: int = 0
    group: int = 0

    @property
    def view_shape(self) -> tuple[int, ...]:
        if self.perm is None:
            return self.shape
        cols = math.prod(self.shape) // self.rows
        return (self.rows * cols // self.group, self.group) if self.group else (self.rows, cols)

    def to_view(self, x: jnp.ndarray) -> jnp.ndarray:
        if self.perm is None:
            return x
        return jnp.transpose(x, self.perm).reshape(self.view_shape)

    def from_view(self, v: jnp.ndarray) -> jnp.ndarray:
        if self.perm is None:
            return v
        permuted = tuple(self.shape[d] for d in self.perm)
        inverse = tuple(sorted(range(len(self.perm)), key=lambda i: self.perm[i]))
        return jnp.transpose(v.reshape(permuted), inverse)


def layout_for(spec: QuantizationSpec, shape: tuple[int, ...], out_axes: tuple[int, ...], role: str) -> Layout:
    """Layout of ``spec`` on an operand; ``out_axes`` are its per-channel dims (weights: output features)."""
    if not spec.per_channel:
        return Layout(shape)
    if spec.ch_axis is not None:
        return Layout(shape, axis=spec.ch_axis % len(shape))
    if len(out_axes) == 1 and not spec.block_size:
        return Layout(shape, axis=out_axes[0])
    contract = tuple(d for d in range(len(shape)) if d not in out_axes)
    rows = math.prod(shape[d] for d in out_axes)
    return Layout(shape, axis=0, perm=tuple(out_axes) + contract, rows=rows, group=spec.block_size or 0)


def observer_for(spec: QuantizationSpec, layout: Layout) -> Any:
    """The observer instance for ``spec`` (short name, instance, or the default for its qscheme)."""
    observer = spec.observer
    per_channel = layout.axis is not None
    if observer is not None and not isinstance(observer, str):
        if per_channel and hasattr(observer, "ch_axis"):
            observer = dataclasses.replace(observer, ch_axis=layout.axis if layout.perm is None else 0)
        return observer
    name = observer or ("per_channel_minmax" if per_channel else "minmax")
    kwargs = dict(spec.observer_kwargs)
    kwargs.update(dtype=spec.dtype, qscheme=spec.qscheme)
    if spec.quant_min is not None:
        kwargs.update(quant_min=spec.quant_min, quant_max=spec.quant_max)
    if per_channel:
        kwargs["ch_axis"] = layout.axis if layout.perm is None else 0
    return get_observer(name, **kwargs)


def _qparam_axis(layout: Layout) -> int | None:
    return None if layout.axis is None else (0 if layout.perm is not None else layout.axis)


def init_slot(spec: QuantizationSpec, layout: Layout, dtype: Any) -> Slot:
    """Empty observer state and the qparams of an unobserved tensor (scale 1, zero point 0).

    LSQ specs get a ``LearnableSlot`` (float32 scale and zero point, trained by the caller).
    """
    observer = observer_for(spec, layout)
    state = observer.init(jnp.zeros(layout.view_shape, dtype))
    scale, zero_point = observer.calculate_qparams(state)
    if spec.fake_quant == "lsq":
        return LearnableSlot(state, jnp.asarray(scale, jnp.float32), jnp.asarray(zero_point, jnp.float32))
    return ObservedSlot(state, scale, zero_point)


def slot_qparams(slot: Slot) -> QParams:
    return QParams(slot.scale, slot.zero_point)


def observe(spec: QuantizationSpec, layout: Layout, slot: Slot, xs: list, set_learnable: bool) -> Slot:
    """Update the observer with every tensor in ``xs`` (no gradient) and refresh the qparams.

    LSQ qparams are only overwritten when ``set_learnable`` (calibration); during QAT they are trained.
    """
    observer = observer_for(spec, layout)
    state = slot.observer
    for x in xs:
        state = observer.update(state, jax.lax.stop_gradient(layout.to_view(x)))
    return with_observer_state(spec, layout, slot, state, set_learnable)


def with_observer_state(spec: QuantizationSpec, layout: Layout, slot: Slot, state: Any, set_learnable: bool) -> Slot:
    """``slot`` with observer state ``state`` and the qparams recomputed from it (LSQ: only if ``set_learnable``)."""
    scale, zero_point = observer_for(spec, layout).calculate_qparams(state)
    if isinstance(slot, LearnableSlot):
        if set_learnable:
            return LearnableSlot(state, scale.astype(jnp.float32), zero_point.astype(jnp.float32))
        return slot._replace(observer=state)
    return ObservedSlot(state, scale, zero_point)


def dynamic_qparams(spec: QuantizationSpec, layout: Layout, x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Qparams of ``x`` itself (dynamic quantization), without gradient."""
    observer = observer_for(spec, layout)
    view = jax.lax.stop_gradient(layout.to_view(x))
    return observer.calculate_qparams(observer.update(observer.init(view), view))


def fake_quant(
    spec: QuantizationSpec, layout: Layout, x: jnp.ndarray, scale: jnp.ndarray, zero_point: jnp.ndarray, lsq: bool
) -> jnp.ndarray:
    """Fake-quantize ``x`` with ``spec``: straight-through, or LSQ when ``lsq`` (grad to scale/zero point)."""
    if x.size == 0:  # an empty batch: nothing to round (plain JAX returns the empty result too)
        return x
    view = layout.to_view(x)
    axis = _qparam_axis(layout)
    if lsq:
        qmin, qmax = qrange(spec.dtype, spec.quant_min, spec.quant_max)
        # LSQ gradient scaling 1/sqrt(numel * qmax), as torch's _LearnableFakeQuantize(use_grad_scaling=True).
        grad_factor = 1.0 / math.sqrt(view.size * qmax)
        if axis is None:
            out = fake_quantize_learnable_per_tensor_affine(view, scale, zero_point, qmin, qmax, grad_factor)
        else:
            out = fake_quantize_learnable_per_channel_affine(view, scale, zero_point, axis, qmin, qmax, grad_factor)
    else:
        out = fake_quantize_affine(
            view,
            scale,
            zero_point,
            dtype=spec.dtype,
            axis=axis,
            quant_min=spec.quant_min,
            quant_max=spec.quant_max,
        )
    return layout.from_view(out)


def unobserved(spec: QuantizationSpec, layout: Layout, slot: Slot) -> jax.Array:
    """True (a bool array, one per scan iteration when stacked) where the slot's observer never saw a tensor:
    its state still equals the observer's initial state. Observers without state count as observed."""
    observer = observer_for(spec, layout)
    fresh = jax.tree_util.tree_leaves(observer.init(jnp.zeros(layout.view_shape, jnp.float32)))
    leaves = jax.tree_util.tree_leaves(slot.observer)
    if not fresh or not leaves:  # no observer state (or qparams given without one): nothing to fill in
        return jnp.zeros((), bool)
    stack = jnp.ndim(leaves[0]) - jnp.ndim(fresh[0])
    same = [
        jnp.all(jnp.asarray(a) == jnp.asarray(b), axis=tuple(range(stack, jnp.ndim(a))))
        for a, b in zip(leaves, fresh, strict=True)
    ]
    return jnp.all(jnp.stack(same), axis=0)


def filled_from_weight(spec: QuantizationSpec, layout: Layout, slot: Slot, w: jax.Array) -> Slot:
    """``slot``, or where its observer never ran, the slot observed on the weight ``w`` itself (a weight's
    qparams never depend on data, so ``int8_dynamic`` / weight-only presets work straight after ``init``)."""
    if not jax.tree_util.tree_leaves(slot.observer):  # qparams given without an observer state
        return slot
    # A cond, not a select: calibrated slots (the usual case, on every eval call) skip the pass over the weight.
    return jax.lax.cond(
        unobserved(spec, layout, slot), lambda: observe(spec, layout, slot, [w], set_learnable=True), lambda: slot
    )
