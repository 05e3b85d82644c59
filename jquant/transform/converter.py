"""``int_fn, int_params = jquant.convert(qf, qstate, *args)``: serve a quantized function with integer kernels.

How it works: one interpreter pass records the weight operand each quantized ``dot_general`` /
``conv_general_dilated`` site sees (reshapes, transposes and ``nn.scan`` stacking already applied); each is
quantized once with the calibrated weight qparams of ``qstate`` by the kernels' ``quantize_weight`` (and packed
for the native CPU kernels by ``pack_weight``) into a ``QuantizedWeight`` stored in ``int_params``. Float
leaves that only fed those sites are dropped (``int_params["params"]`` keeps every other leaf: biases, norms,
float layers, a tied embedding still read by a gather). ``int_fn`` runs the function's jaxpr through the
interpreter's site hook, each converted site on the integer kernels:

- static activation spec (per-tensor int8/uint8, calibrated): ``int8_dot_general`` / ``int8_conv``;
- dynamic activation spec (per tensor): ``dynamic_int8_dot_general`` / ``dynamic_int8_conv``;
- no activation spec (weight-only int8 / int4): ``weight_only_dot_general`` (conv: dequantize + float conv);
- an embedding lookup (a ``gather`` of a weight table, when a Rule names ``gather``): weight-only, the integer
  table is gathered and only the gathered rows are dequantized (``jquant.kernels.embedding.quantized_gather``).

Weight qschemes: per-tensor / per-channel / per-group, symmetric or affine, int8 / int4 / uint8 / uint4.
Unsigned weights are stored as their signed equivalent (``q - 2**(bits - 1)``, the zero point shifted alike:
exact), so they run the same kernels (W8A8 with a weight zero point runs the XLA integer path, not the native
GEMM). ``per_channel_affine_float_qparams`` (torch's embedding scheme: float zero points added before rounding)
keeps its float zero points: weight-only sites dequantize the weight exactly as eval does; static / dynamic sites
run as "dequantize". Asymmetric conv weights are stored as integers and dequantized (float conv).

Embeddings are not quantized by the presets (``int8_weight_only()`` etc. name dot_general / conv only); a Rule
enables them, e.g. torch's ``float_qparams_weight_only_qconfig`` (uint8, one scale and float zero point per
embedding vector)::

    config = [Rule(primitives=("gather",), weight=QuantizationSpec("uint8", "per_channel_affine_float_qparams")),
              *jquant.presets.int8_weight_only()]

(``QuantizationSpec("int8", "per_channel_symmetric")`` or int4 per row work too.) A gather's per-channel qparams
follow the indexed axis of the table (its rows).

``int_fn`` is a function of its inputs' shapes like ``qf.apply``: it is traced (and compiled) once per input
signature, so one conversion serves every batch size, ``vmap`` and ``jax.export`` with symbolic dimensions.
What is fixed at conversion: the weights, the qparams, and the site structure (the function must have the same
quantized sites at the new shapes).

Integer domain (torch's converted graph): values quantized with a static per-tensor uint8/int8 slot (a site's
output, a fused pattern's tail, a shared max-pool / reshape / concatenate) also travel as integers
(``int_domain.QValue``). A static conv / dense whose output is quantized requantizes in its kernel's epilogue
(bias and ReLU of its fused pattern included: the pattern's bias add is routed here as a ``FusedStep``); the next
static site reads the integers when they carry its own input qparams; value-preserving views run on integers. The
float copy of each such value is dead code unless a float op or the output reads it, so XLA keeps 8-bit buffers.

Sites the kernels do not cover (other primitives, per-channel or float8 activation specs, ...) run as in
``mode="eval"`` (fake quant; a quantized add reads dequantized integers and XLA fuses it into one 8-bit pass);
their integer weight is still stored as integers and dequantized on the fly. ``int_fn.report`` says, per site,
which kernel runs and why a site was not converted.

Numerics: the ``eval`` function's up to float rounding of the rescale. Weight qparams of observers that never
ran are computed from the weights; static activation sites whose observers never ran are an error (calibrate
first). Rows holding NaN give NaN rows, as in ``eval`` (the integer kernels would make up finite values).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Literal

from jquant.kernels.conv import dynamic_int8_conv, int8_conv, pack_conv_weight
from jquant.kernels.dot import DotLayout, dynamic_int8_dot_general, int8_dot_general, weight_only_dot_general
from jquant.kernels.embedding import quantized_gather
from jquant.kernels.native import backend
from jquant.kernels.pooling import quantized_average
from jquant.kernels.weights import (
    QuantizedWeight,
    canonical_matrix,
    pack_weight,
    quantize_weight,
    tree_nbytes,
    unsigned_offset,
)
from jquant.numerics.affine import reciprocal
from jquant.numerics.qparams import choose_qparams
from jquant.numerics.qschemes import canonical_qscheme, is_symmetric
from jquant.text_table import format_table
from jquant.transform import int_domain, slots
from jquant.transform.compat import used_inputs
from jquant.transform.handler import QuantizeHandler, layout_of, stateful
from jquant.transform.int_domain import QParamsRef, QValue, Shadows
from jquant.transform.interpreter import bind_eqn, interpret
from jquant.transform.patterns import average_sum_of, clamp_chain, clamp_input, is_relu
from jquant.transform.sites import Site, View, path_to_name
from jquant.transform.specs import (
    DerivedQuantizationSpec,
    FixedQParamsSpec,
    QuantizationSpec,
    SharedQuantizationSpec,
)
from jquant.transform.state import unobserved_activations, validate_qstate

DENSE = (((1,), (0,)), ((), ()))
INT_WEIGHT_DTYPES = ("int8", "int4", "uint8", "uint4")
WEIGHT_PRIMITIVES = ("dot_general", "conv_general_dilated", "gather")


class StaticInput(NamedTuple):
    """Calibrated per-tensor activation qparams of a static W8A8 site (``inv_scale`` = ``1 / scale``)."""

    scale: jax.Array
    zero_point: jax.Array
    inv_scale: jax.Array


class ConvertedSite(NamedTuple):
    """``int_params["sites"][name]``: the integer weight, static activation qparams, or the qparams of a site
    that runs as fake quant (``eval``: role key -> ``QParams``)."""

    weight: QuantizedWeight | None = None
    input: StaticInput | None = None
    eval: dict | None = None


@dataclasses.dataclass(frozen=True)
class SitePlan:
    """How one site runs after conversion: ``kind`` is "static", "dynamic", "weight_only" or "dequantize"."""

    kind: str
    weight_index: int
    input_index: int | None
    layout: str  # "dot" (canonical (K, N) weight), "conv" or "gather" (weight kept in its own layout)
    reason: str = ""  # why a "dequantize" site does not run an integer kernel


def _weight_operand(site: Site):
    weights = [op for op in site.operands if op.role == "weight"]
    if len(weights) != 1 or not isinstance(weights[0].spec, QuantizationSpec):
        return None
    spec = weights[0].spec
    if spec.dtype not in INT_WEIGHT_DTYPES or spec.is_dynamic:
        return None
    return weights[0]


def float_qparams(spec: QuantizationSpec) -> bool:
    """Whether the spec's zero points are floats (``per_channel_affine_float_qparams``, torch's embeddings)."""
    return canonical_qscheme(spec.qscheme) == "per_channel_affine_float_qparams"


def stored_symmetric(spec: QuantizationSpec) -> bool:
    """Whether the weight is stored with zero point 0: signed symmetric, or unsigned symmetric whose zero point is
    the middle of the range (torch's uint8 symmetric 128), which the signed storage shifts to 0."""
    if not is_symmetric(spec.qscheme):
        return False
    offset = unsigned_offset(spec.dtype)
    if not offset:
        return True
    with jax.ensure_compile_time_eval():
        _, zp = choose_qparams(np.float32(-1.0), np.float32(1.0), dtype=spec.dtype, qscheme=spec.qscheme,
                               quant_min=spec.quant_min, quant_max=spec.quant_max)
        return int(np.asarray(zp)) == offset


def activation_spec(spec: Any) -> Any:
    """The spec an activation is quantized with: a cross-site ``SharedQuantizationSpec`` (an input already
    quantized by an earlier site, e.g. after a shared max-pool / flatten) stands for the target's spec."""
    if isinstance(spec, SharedQuantizationSpec) and spec.site is not None and isinstance(spec.spec, QuantizationSpec):
        return spec.spec
    return spec


def _activation_kind(spec: Any) -> tuple[str | None, str]:
    spec = activation_spec(spec)
    if spec is None:
        return "weight_only", ""
    if isinstance(spec, FixedQParamsSpec) and spec.dtype in ("int8", "uint8"):
        return "static", ""  # constant qparams (the output of a sigmoid before this site)
    if not isinstance(spec, QuantizationSpec):
        return None, f"activation spec {type(spec).__name__}"
    if spec.dtype not in ("int8", "uint8"):
        return None, f"{spec.dtype} activations"
    if spec.per_channel:
        return None, "per-channel activations"
    return ("dynamic" if spec.is_dynamic else "static"), ""


def not_converted_reason(site: Site, eqn) -> str:
    """Why ``site`` keeps no integer weight ("" when it has one)."""
    if site.primitive not in WEIGHT_PRIMITIVES:
        return f"{site.primitive}: no integer kernel"
    weights = [op for op in site.operands if op.role == "weight"]
    if not weights:
        return "no weight operand (activation x activation)"
    if len(weights) > 1:
        return "two weight operands"
    if site.primitive == "gather" and weights[0].index != 0:
        return "gather: the weight is not the gathered table"
    spec = weights[0].spec
    if not isinstance(spec, QuantizationSpec):
        return "weight not quantized" if spec is None else f"weight spec {type(spec).__name__}"
    if spec.dtype not in INT_WEIGHT_DTYPES:
        return f"{spec.dtype} weights"
    if spec.is_dynamic:
        return "dynamic weight spec"
    return ""


def plan_site(site: Site, eqn) -> SitePlan | None:
    """The integer execution of ``site`` (None: it stays as in eval mode, float weights kept)."""
    if not_converted_reason(site, eqn):
        return None
    w_op = _weight_operand(site)
    inputs = [op for op in site.operands if op.role == "input"]
    x_op = inputs[0] if len(inputs) == 1 else None
    if site.primitive == "gather":
        # Weight-only embedding lookup: the integer table is gathered, the gathered rows dequantized.
        if w_op.spec.block_size or (w_op.spec.per_channel and len(w_op.out_axes) != 1):
            return None
        if site.output_spec is not None or any(op.spec is not None for op in inputs):
            return SitePlan("dequantize", w_op.index, None, "gather", "activation / output quantization (runs "
                                                                         "as fake quant)")
        return SitePlan("weight_only", w_op.index, None, "gather")
    if site.primitive == "dot_general":
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        contract = tuple(rc if w_op.index == 1 else lc)
        if lb or rb:
            return None
        if w_op.spec.block_size and tuple(contract) != tuple(sorted(contract)):
            return None  # groups run along the flattened contraction in ascending-axis order
        layout = "dot"
    else:
        dn = eqn.params["dimension_numbers"]
        out_axis = dn.rhs_spec[0]
        if w_op.index != 1 or w_op.spec.block_size:
            return None
        if w_op.spec.per_channel and tuple(w_op.out_axes) != (out_axis,) and w_op.spec.ch_axis in (None,):
            return None
        if eqn.params.get("batch_group_count", 1) != 1:
            return None
        layout = "conv"
    kind, why = _activation_kind(x_op.spec) if x_op is not None else (None, "no single activation input")
    if kind is not None and float_qparams(w_op.spec) and kind != "weight_only":
        kind, why = None, "float zero points (float qparams weight): no integer kernel"
    elif kind is not None and layout == "conv" and not stored_symmetric(w_op.spec):
        kind, why = None, "asymmetric conv weight (dequantized weight, float conv)"
    if site.output_spec is not None and not site.fused and not (kind == "static"
                                                                and int_domain.integer_spec(site.output_spec)):
        kind, why = None, "output quantization (runs as fake quant)"
    elif layout == "conv" and kind == "weight_only":
        kind, why = None, "weight-only conv (dequantized weight, float conv)"
    if kind is None:
        return SitePlan("dequantize", w_op.index, None if x_op is None else x_op.index, layout, why)
    return SitePlan(kind, w_op.index, x_op.index, layout)


def _plan_reason(site: Site, eqn) -> str:
    """Reason shown in the report for a quantized site without an integer kernel plan."""
    why = not_converted_reason(site, eqn)
    if why:
        return why
    if site.primitive == "dot_general":
        (_, _), (lb, rb) = eqn.params["dimension_numbers"]
        if lb or rb:
            return "weight with batch dims"
        return "per-group weight on a non-ascending contraction"
    if site.primitive == "gather":
        return "gather table qparams per group or over several axes"
    return "conv weight layout (per-group or lhs weight)"


# -- weights ------------------------------------------------------------------------------------------------


def _qparam_map(layout, values: jnp.ndarray, shape) -> jnp.ndarray:
    """Per-element map (shape of the weight) of per-tensor / per-row qparams given in the slot layout."""
    values = jnp.asarray(values)
    if layout.axis is None:
        return jnp.broadcast_to(values.reshape(()), shape)
    view_shape = layout.view_shape
    axis = 0 if layout.perm is not None else layout.axis
    expand = [1] * len(view_shape)
    expand[axis] = view_shape[axis]
    return layout.from_view(jnp.broadcast_to(values.reshape(expand), view_shape))


def _slot_qparams(slot, keep_float: bool = False) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(float32 scale, int32 zero point) of a slot; ``keep_float``: float32 zero points of float qparams."""
    scale, zero_point = slots.slot_qparams(slot)
    if keep_float:
        return jnp.asarray(scale, jnp.float32), jnp.asarray(zero_point, jnp.float32)
    # LSQ keeps a float zero point; its forward rounds it half to even.
    return jnp.asarray(scale, jnp.float32), jnp.round(jnp.asarray(zero_point)).astype(jnp.int32)


def _fixed_qparams(spec: FixedQParamsSpec, stack: tuple[int, ...]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Constant qparams as a slot's would be stored (one per iteration of the enclosing scans)."""
    return (jnp.full(stack, spec.scale, jnp.float32), jnp.full(stack, int(spec.zero_point), jnp.int32))


def quantize_site_weight(site: Site, eqn, plan: SitePlan, w: jnp.ndarray, slot) -> QuantizedWeight:
    """The site's weight operand ``w`` as integers with the site's calibrated weight qparams.

    Dot weights are stored in the canonical ``(K, N)`` layout (contraction x output features), conv kernels and
    gather tables in their own layout; all through the kernels' ``quantize_weight`` (and ``pack_weight`` for the
    native GEMMs). uint8 / uint4 weights are stored as their signed equivalent, float zero points as floats.
    """
    w_op = site.operands[plan.weight_index]
    spec = w_op.spec
    layout = layout_of(site, w_op.key, spec)
    scale, zero_point = _slot_qparams(slot, keep_float=float_qparams(spec))
    symmetric = stored_symmetric(spec)
    per_channel = layout.axis is not None
    w = w.astype(jnp.float32)
    if plan.layout in ("conv", "gather"):
        axis = layout.axis if per_channel else None
        if plan.layout == "conv" and per_channel:
            axis = eqn.params["dimension_numbers"].rhs_spec[0]
        count = () if axis is None else (w.shape[axis],)
        qw = quantize_weight(w, dtype=spec.dtype, axis=axis, symmetric=symmetric, scale=scale.reshape(count),
                             zero_point=None if symmetric else zero_point.reshape(count), contracting_axes=None,
                             quant_min=spec.quant_min, quant_max=spec.quant_max)
        if plan.layout == "gather":
            return qw  # int8 values (int4: packed bytes) gathered as they are
        if plan.kind == "dequantize":
            return qw
        return pack_conv_weight(qw, eqn.params["dimension_numbers"], keep_values=False)
    (lc, rc), _ = eqn.params["dimension_numbers"]
    contract = tuple(rc if plan.weight_index == 1 else lc)
    free = tuple(a for a in range(w.ndim) if a not in contract)
    w2 = canonical_matrix(w, contract, free)
    k, n = w2.shape
    groups = k // spec.block_size if spec.block_size else 1

    def per_group(values):  # slot-layout qparams -> (G, N) in the canonical layout
        full = canonical_matrix(_qparam_map(layout, values, w.shape), contract, free)
        return full.reshape(groups, k // groups, n)[:, 0, :]

    if not per_channel and groups == 1:
        scale2, zp2, axis = scale.reshape(1, 1), zero_point.reshape(1, 1), None
    else:
        scale2, zp2, axis = per_group(scale), per_group(zero_point), 1
    qw = quantize_weight(
        w2, dtype=spec.dtype, axis=axis, group_size=k // groups if groups > 1 else None,
        group_axis=0 if groups > 1 else None, symmetric=symmetric, scale=scale2,
        zero_point=None if symmetric else zp2, quant_min=spec.quant_min,
        contracting_axes=(0,) if plan.kind in ("static", "dynamic") else None,
        quant_max=spec.quant_max,
    )
    if qw.float_zero_point is None:  # float qparams are dequantized: no native packing
        qw = pack_weight(qw, (0,), keep_values=False)
    if plan.kind in ("weight_only", "dequantize"):
        qw = dataclasses.replace(qw, w_sums=None)  # no activation zero point to correct for
    return qw


def _original_layout_weight(qw: QuantizedWeight, plan: SitePlan, site: Site, eqn) -> jnp.ndarray:
    """Dequantized weight in the site operand's own layout (for sites that run in float)."""
    w = qw.dequantize()
    if plan.layout in ("conv", "gather"):
        return w
    shape = site.operands[plan.weight_index].shape
    (lc, rc), _ = eqn.params["dimension_numbers"]
    contract = tuple(rc if plan.weight_index == 1 else lc)
    perm = contract + tuple(a for a in range(len(shape)) if a not in contract)
    return jnp.transpose(w.reshape(tuple(shape[a] for a in perm)), tuple(np.argsort(perm)))


# -- the integer site handler ---------------------------------------------------------------------------------


def _nan_rows(y: jnp.ndarray, x2: jnp.ndarray) -> jnp.ndarray:
    """NaN in the rows of ``y`` whose ``(M, K)`` activation row holds a NaN (as the fake-quant function gives)."""
    return jnp.where(jnp.any(jnp.isnan(x2), axis=1, keepdims=True), jnp.nan, y)


class IntHandler:
    """Interpreter site hook running converted sites with integer kernels (others as ``mode="eval"``).

    Values quantized at a site or view also travel as integers (``int_domain.Shadows``, fresh per traced call):
    a static site reads its input's integers when they were quantized with its own input qparams, and
    value-preserving views (max-pool, reshape, concatenate, ...) run on integers.
    """

    def __init__(self, plans: dict[str, SitePlan], weight_only_impl: str = "auto", conv_impl: str = "auto",
                 pad_batch_one: bool | None = None, integer_domain: bool = True):
        self.plans = plans
        self.weight_only_impl = weight_only_impl
        self.conv_impl = conv_impl
        self.pad = pad_batch_one
        self.integer_domain = integer_domain
        self.eval = QuantizeHandler("eval")
        self.shadows = Shadows()
        self.pending: dict = {}  # anchor / bias-add output var -> Pending (fused patterns awaiting their tail)
        self.producers: dict = {}

    def for_call(self, plan) -> tuple[IntHandler, Any]:
        """A copy with empty integer-value tables for one trace of the converted function, and the plan it runs:
        ``plan`` plus the inner equations of fused patterns (their bias add), routed to this handler."""
        fresh = copy.copy(self)
        fresh.shadows = Shadows()
        fresh.pending = {}
        fresh.producers = int_domain.producers(plan.closed_jaxpr.jaxpr) if self.integer_domain else {}
        if not self.integer_domain:
            return fresh, plan
        steps = {id(e): int_domain.FusedStep(name, e.primitive.name)
                 for name, eqns in plan.fused_eqns.items() if name in self.plans for e in eqns[:-1]}
        return fresh, dataclasses.replace(plan, by_eqn={**plan.by_eqn, **steps})

    def __call__(self, site: Site | View, eqn, invals: list, state: ConvertedSite, scope):
        if isinstance(site, int_domain.FusedStep):
            return self._fused_step(eqn, invals), state
        if isinstance(site, View):
            return self._view(site, eqn, invals, state, scope), state
        plan = self.plans.get(site.name)
        if plan is None or plan.kind == "dequantize":
            # Fake quant with the stored qparams: sites without an integer kernel (a quantized add: its inputs
            # are dequantized integers, XLA fuses the whole add into one pass over 8-bit buffers) and sites whose
            # weight is dequantized on the fly.
            values = list(invals)
            if plan is not None:
                values[plan.weight_index] = _original_layout_weight(state.weight, plan, site, eqn)
            outs, _ = self.eval(site, eqn, values, _eval_slots(state.eval), _EvalScope(scope))
            if self._own_output(site):
                qp = state.eval["output"]
                ref = int_domain.reference(site.name, "output", site.output_spec)
                outs[0] = self.shadows.set(eqn.outvars[0], int_domain.quantize_value(outs[0], *qp, ref))
            return outs, state
        if plan.layout == "gather":  # weight-only embedding lookup: gather integers, dequantize the rows
            p = eqn.params
            y = quantized_gather(state.weight, invals[1], dimension_numbers=p["dimension_numbers"],
                                 slice_sizes=p["slice_sizes"], mode=p["mode"], fill_value=p["fill_value"],
                                 indices_are_sorted=p["indices_are_sorted"], unique_indices=p["unique_indices"],
                                 dtype=eqn.outvars[0].aval.dtype)
            return [y], state
        x = invals[plan.input_index]
        x_spec = activation_spec(site.operands[plan.input_index].spec)
        if plan.kind == "static" and self.integer_domain:
            given = self.shadows.get(eqn.invars[plan.input_index], input_reference(site, plan))
            if given is not None:
                x = given.q  # already quantized with this site's input qparams: no float round trip
        if plan.kind == "static" and self._fusable(site, eqn, plan):
            # The requantized output is computed at the pattern's tail, with the bias and ReLU in the kernel's
            # epilogue; this float result stays for other readers (none in a matched pattern: XLA drops it).
            self.pending[eqn.outvars[0]] = int_domain.Pending(site, eqn, x)
        out = None
        if plan.kind == "static" and self._own_output(site):
            qp = state.eval["output"]
            out = int_domain.reference(site.name, "output", site.output_spec), qp
        if plan.layout == "conv":
            y = self._conv(site, eqn, plan, x, state, x_spec, out)
        else:
            y = self._dot(site, eqn, plan, x, state, x_spec, out)
        if out is not None:
            ref, (scale, zero_point) = out
            y = self.shadows.set(eqn.outvars[0], QValue(y, scale, zero_point, ref))
        return [y], state

    def _own_output(self, site: Site) -> bool:
        """Whether the site quantizes its own output (not at a fused tail) with integer-capable qparams."""
        return self.integer_domain and not site.fused and int_domain.integer_spec(site.output_spec)

    def _fusable(self, site: Site, eqn, plan: SitePlan) -> bool:
        """Whether a static site's fused bias add / ReLU can run in its kernel's epilogue (output channels on
        the last axis, the output quantized per tensor at the tail)."""
        if not (self.integer_domain and site.fused and int_domain.integer_spec(site.output_spec)):
            return False
        if plan.layout == "conv":
            return eqn.params["dimension_numbers"].out_spec[1] == len(site.output_shape) - 1
        w_op = site.operands[plan.weight_index]
        return plan.weight_index == 1 and len(w_op.shape) - len(w_op.contract_axes) == 1

    def _fused_step(self, eqn, invals: list) -> list:
        """A bias add inside a fused pattern: carried into the pending epilogue when its bias is per channel."""
        outs = bind_eqn(eqn, invals)
        for var in eqn.invars:
            pending = self.pending.get(var) if not isinstance(var, Literal) else None
            if pending is not None:
                bias = int_domain.channel_bias(eqn, var, invals, self.producers)
                if bias is not None and pending.bias is None:
                    self.pending[eqn.outvars[0]] = pending._replace(bias=bias)
                break
        return outs

    def _tail(self, view: View, eqn, invals: list, state: ConvertedSite):
        """The pattern's requantized output from one kernel call (bias and ReLU in its epilogue), or None when
        this tail does not continue a pending pattern."""
        for var in eqn.invars:
            pending = self.pending.get(var) if not isinstance(var, Literal) else None
            if pending is None:
                continue
            if is_relu(eqn):
                pending = pending._replace(relu=True)
            else:
                bias = int_domain.channel_bias(eqn, var, invals, self.producers)
                if bias is None or pending.bias is not None:
                    return None
                pending = pending._replace(bias=bias)
            site, anchor = pending.site, pending.eqn
            plan = self.plans[site.name]
            x_spec = activation_spec(site.operands[plan.input_index].spec)
            ref = int_domain.reference(view.name, view.key, view.spec)
            scale, zero_point = state.eval[view.key]
            extra = dict(bias=pending.bias, bias_int32=False, relu=pending.relu)
            run = self._conv if plan.layout == "conv" else self._dot
            q = run(site, anchor, plan, pending.x, state, x_spec, (ref, (scale, zero_point)), extra)
            return self.shadows.set(eqn.outvars[0], QValue(q, scale, zero_point, ref))
        return None

    def _view(self, view: View, eqn, invals: list, state: ConvertedSite, scope) -> list:
        """A view of a site's slot: integers in, integers out for value-preserving ops; else eval's fake quant
        (a fused ReLU tail, a bias add), whose quantized output is recorded as integers."""
        if not (self.integer_domain and int_domain.integer_spec(view.spec) and view.output):
            outs, _ = self.eval(view, eqn, invals, _eval_slots(state.eval), _EvalScope(scope))
            return outs
        if view.key == "output" and self.pending:
            fused = self._tail(view, eqn, invals, state)
            if fused is not None:
                return [fused]
        scale, zero_point = state.eval[view.key]
        ref = int_domain.reference(view.name, view.key, view.spec)
        if view.primitive in ("avg_pool", "mean"):
            average = self._average(eqn, invals, ref)
            if average is not None:
                return [self.shadows.set(eqn.outvars[0], average)]
        if view.primitive in ("relu", "clamp"):  # on the grid: the same max / min by the quantized bounds
            given = self.shadows.get(clamp_input(eqn), ref)
            if given is not None:
                q = given.q
                for op, bound in clamp_chain(eqn):
                    q_bound = int_domain.quantize_value(jnp.float32(bound), given.scale, given.zero_point, ref).q
                    q = (jnp.maximum if op == "max" else jnp.minimum)(q, q_bound)
                return [self.shadows.set(eqn.outvars[0], given._replace(q=q))]
        if eqn.primitive.name in int_domain.INTEGER_OPS:
            ints = []
            for i, (var, x) in enumerate(zip(eqn.invars, invals, strict=True)):
                given = (int_domain.quantize_value(x, scale, zero_point, ref) if i in view.inputs
                         else self.shadows.get(var, ref))
                if given is None:
                    break
                ints.append(given.q)
            else:
                q = bind_eqn(eqn, ints)[0]
                return [self.shadows.set(eqn.outvars[0], QValue(q, given.scale, given.zero_point, ref))]
        outs, _ = self.eval(view, eqn, invals, _eval_slots(state.eval), _EvalScope(scope))
        outs[0] = self.shadows.set(eqn.outvars[0], int_domain.quantize_value(outs[0], scale, zero_point, ref))
        return outs

    def _average(self, eqn, invals: list, ref: QParamsRef) -> QValue | None:
        """An average pool / mean (``div`` of a sum by its counts) on the integers of the summed value, rounded
        as torch's quantized avg_pool2d / mean; None when that value has no integers with ``ref``'s qparams."""
        sum_eqn = average_sum_of(eqn, self.producers)
        given = None if sum_eqn is None else self.shadows.get(sum_eqn.invars[0], ref)
        if given is None:
            return None
        q = quantized_average(given.q, given.zero_point, invals[1], sum_eqn.primitive.name, sum_eqn.params,
                              shape=tuple(eqn.invars[0].aval.shape))
        return QValue(q, given.scale, given.zero_point, ref)

    def _out_kwargs(self, out) -> dict:
        if out is None:
            return {}
        ref, (scale, zero_point) = out
        return dict(out_scale=scale, out_zero_point=zero_point, out_dtype=ref.dtype, out_quant_min=ref.quant_min,
                    out_quant_max=ref.quant_max)

    def _dot(self, site, eqn, plan, x, state: ConvertedSite, x_spec, out=None, extra=None):
        qw = state.weight
        side = "rhs" if plan.weight_index == 1 else "lhs"
        w_shape = site.operands[plan.weight_index].shape
        layout = DotLayout.of(x.ndim, len(w_shape), eqn.params["dimension_numbers"], side)
        x2 = layout.x_matrix(x)
        is_float = jnp.issubdtype(x2.dtype, jnp.floating)
        if plan.kind == "static":
            act = state.input
            y2 = int8_dot_general(x2, qw, DENSE, act_scale=act.scale, act_zero_point=act.zero_point,
                                  act_inv_scale=act.inv_scale, act_dtype=x_spec.dtype,
                                  act_quant_min=x_spec.quant_min, act_quant_max=x_spec.quant_max,
                                  pad_batch_one=self.pad, **self._out_kwargs(out), **(extra or {}))
            if is_float and out is None:
                y2 = _nan_rows(y2, x2)
        elif plan.kind == "dynamic":
            y2 = dynamic_int8_dot_general(x2, qw, DENSE, per_token=False, symmetric=is_symmetric(x_spec.qscheme),
                                          act_dtype=x_spec.dtype, pad_batch_one=self.pad)
            y2 = _nan_rows(y2, x2)
        else:
            y2 = weight_only_dot_general(x2, qw, DENSE, impl=self.weight_only_impl, pad_batch_one=self.pad)
        return layout.output(y2, x.shape, w_shape)

    def _conv(self, site, eqn, plan, x, state: ConvertedSite, x_spec, out=None, extra=None):
        p = eqn.params
        qw = state.weight
        args = (x, qw, p["window_strides"], p["padding"], p["lhs_dilation"], p["rhs_dilation"],
                p["dimension_numbers"], p["feature_group_count"])
        if plan.kind == "static":
            act = state.input
            return int8_conv(*args, act_scale=act.scale, act_zero_point=act.zero_point,
                             act_inv_scale=act.inv_scale, act_dtype=x_spec.dtype,
                             act_quant_min=x_spec.quant_min, act_quant_max=x_spec.quant_max, impl=self.conv_impl,
                             pad_batch_one=self.pad, **self._out_kwargs(out), **(extra or {}))
        return dynamic_int8_conv(*args, symmetric=is_symmetric(x_spec.qscheme), act_dtype=x_spec.dtype,
                                 impl=self.conv_impl, pad_batch_one=self.pad)


def input_reference(site: Site, plan: SitePlan) -> QParamsRef:
    """The slot whose qparams quantize a static site's activation input (a shared spec names another site's)."""
    x_op = site.operands[plan.input_index]
    spec = activation_spec(x_op.spec)
    if isinstance(x_op.spec, SharedQuantizationSpec) and x_op.spec.site is not None:
        return int_domain.reference(x_op.spec.site, x_op.spec.target, spec)
    return int_domain.reference(site.name, x_op.key, spec)


class _EvalScope(Mapping):
    """The scope as eval mode reads it (site name -> role -> slot), from the converted sites' stored qparams."""

    def __init__(self, scope: Mapping[str, ConvertedSite]):
        self.scope = scope

    def __getitem__(self, name: str) -> dict:
        return _eval_slots(self.scope[name].eval)

    def __iter__(self):
        return iter(self.scope)

    def __len__(self) -> int:
        return len(self.scope)


def _eval_slots(qparams: dict | None) -> dict:
    """The eval-mode site state rebuilt from stored qparams (observers are not needed after calibration)."""
    return {key: slots.ObservedSlot(None, qp.scale, qp.zero_point) for key, qp in (qparams or {}).items()}


class _CaptureWeights:
    """Site hook that records each converted site's weight operand (and its equation) and runs it in float."""

    def __init__(self, plans_out: dict, eqns_out: dict):
        self.plans = plans_out
        self.eqns = eqns_out

    def __call__(self, site, eqn, invals, state, scope):
        if not isinstance(site, Site):  # a view of a site (fused ReLU, shared max-pool...): runs unchanged
            return bind_eqn(eqn, invals), state
        self.eqns[site.name] = eqn
        plan = plan_site(site, eqn)
        if plan is not None:
            self.plans[site.name] = plan
        w_op = _any_weight_operand(site)
        if w_op is not None:
            state = {"w": invals[w_op.index].astype(state["w"].dtype)}
        return bind_eqn(eqn, invals), state


def _any_weight_operand(site: Site):
    weights = [op for op in site.operands if op.role == "weight"]
    return weights[0] if len(weights) == 1 else None


def _stacked(fn: Callable, depth: int) -> Callable:
    for _ in range(depth):
        fn = jax.vmap(fn)
    return fn


# -- the report -----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SiteReport:
    """One row of ``ConversionReport``: how a site runs and what its weight costs."""

    site: str
    kind: str  # "static", "dynamic", "weight_only", "dequantize" or "eval (fake-quant)"
    kernel: str
    weight_dtype: str
    bytes_before: int
    bytes_after: int
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """Per-site table of the conversion (``print(int_fn.report)``) and byte totals of weights vs ``int_params``."""

    float_bytes: int
    int_bytes: int
    sites: tuple[SiteReport, ...]
    backend: str = "xla"

    @property
    def ratio(self) -> float:
        return self.float_bytes / max(self.int_bytes, 1)

    @property
    def site_kinds(self) -> dict[str, str]:
        return {s.site: s.kind for s in self.sites}

    def __str__(self) -> str:
        rows = [(s.site, s.kernel, s.weight_dtype, s.bytes_before, s.bytes_after, s.reason) for s in self.sites]
        footer = ("total (all params)", f"backend {self.backend}", "", self.float_bytes, self.int_bytes,
                  f"{self.ratio:.2f}x smaller")
        return format_table(("site", "kernel", "weight", "bytes before", "bytes after", "note"), rows, footer)


_KERNEL_NAMES = {
    ("static", "dot"): "int8 W8A8 dot (static)",
    ("dynamic", "dot"): "int8 W8A8 dot (dynamic)",
    ("weight_only", "dot"): "weight-only dot",
    ("static", "conv"): "int8 W8A8 conv (static)",
    ("dynamic", "conv"): "int8 W8A8 conv (dynamic)",
    ("weight_only", "gather"): "embedding gather (dequantize rows)",
}


def _site_report(site: Site, plan: SitePlan | None, entry: ConvertedSite, eqn, weight_bytes: int) -> SiteReport:
    w_op = _any_weight_operand(site)
    w_dtype = w_op.spec.dtype if w_op is not None and isinstance(w_op.spec, QuantizationSpec) else "float"
    if plan is None:
        return SiteReport(site.name, "eval (fake-quant)", "fake quant (eval)", w_dtype if w_op else "-",
                          weight_bytes, weight_bytes, _plan_reason(site, eqn))
    after = entry.weight.nbytes if entry.weight is not None else 0
    if plan.kind == "dequantize":
        return SiteReport(site.name, "dequantize", "dequantize + float op", w_dtype, weight_bytes, after,
                          "; ".join(n for n in (plan.reason, site.note) if n))
    return SiteReport(site.name, plan.kind, _KERNEL_NAMES[(plan.kind, plan.layout)], w_dtype, weight_bytes, after,
                      site.note)


# -- convert -------------------------------------------------------------------------------------------------


def convert(qf, qstate: dict, *args, weight_only_impl: str = "auto", conv_impl: str = "auto",
            pad_batch_one: bool | None = None):
    """Convert a calibrated ``jquant.quantize`` function to integer execution.

    ``args``: example arguments (weights at ``qf``'s ``params_argnums``); any batch size works later.
    ``weight_only_impl`` / ``conv_impl`` / ``pad_batch_one``: kernel choices (see ``weight_only_dot_general``,
    ``int8_conv``, ``int8_matmul``; the defaults pick the fast, exact path for the backend).

    Returns ``(int_fn, int_params)``: ``int_fn(int_params, *args_without_weights)`` (``int_params`` takes the
    place of the weights argument) is jitted and traced once per input signature. ``print(int_fn.report)``
    shows per site which kernel runs, the weight bytes before / after, and why a site was not converted.
    Raises ValueError listing static activation sites whose observers never ran (calibrate first).
    """
    if len(qf.params_argnums) != 1:
        raise ValueError(f"convert: needs a single weights argument, got params_argnums={qf.params_argnums}")
    argnum = qf.params_argnums[0]
    plan = qf.plan(*args)
    validate_qstate(qstate, plan)
    flat_args = jax.tree_util.tree_leaves(args)
    sites = {s.name: s for s in plan.quantized_sites}

    # 1. capture the weight operand of every site (stacked for scans) and each site's equation.
    plans: dict[str, SitePlan] = {}
    eqns: dict[str, Any] = {}
    capture_shapes = {}
    for site in plan.quantized_sites:
        w_op = _any_weight_operand(site)
        capture_shapes[site.name] = (*site.stack, *(w_op.shape if w_op is not None else ()))

    def capture(fl):
        # The zero states are made inside the jit: outside, they would hold one more f32 copy of every weight.
        states = {name: {"w": jnp.zeros(shape, jnp.float32)} for name, shape in capture_shapes.items()}
        return interpret(plan, _CaptureWeights(plans, eqns), states, *fl)[1]

    captured = jax.jit(capture)(flat_args)

    # 2. weight slots whose observers never ran take their qparams from the weights; static activation
    #    slots that never ran cannot be made up.
    qstate = _fill_unobserved_weights(qstate, sites, captured)
    missing = unobserved_activations(qstate, plan)
    if missing:
        raise ValueError(
            "convert: static activation observers never ran at these sites, so their qparams would be made up: "
            f"{', '.join(missing)}. Calibrate first (qf.apply(qstate, ..., mode='calibrate') on representative "
            "data), or use a dynamic / weight-only preset for them."
        )

    # 3. quantize the weights with the calibrated qparams; keep what the other sites need for eval mode.
    derives = any(isinstance(spec, DerivedQuantizationSpec) for site in sites.values() for spec in site.specs.values())
    site_states = {}
    quantizers: dict = {}
    for name, site in sites.items():
        sp = plans.get(name)
        eval_qparams = {key: slots.slot_qparams(slot) for key, slot in qstate[name].items()}
        if sp is None:
            site_states[name] = ConvertedSite(eval=eval_qparams)
            continue
        w_key = site.operands[sp.weight_index].key
        qw = _weight_quantizer(site, eqns[name], sp, quantizers)(captured[name]["w"], qstate[name][w_key])
        # Every site keeps its qparams for the equations that view it (a fused output, a shared max-pool); the
        # weight's only when a derived spec may read them (an int32 bias: input scale x weight scale).
        if not derives and sp.kind != "dequantize":
            eval_qparams = {key: qp for key, qp in eval_qparams.items() if key != w_key}
        if sp.kind == "static":
            x_op = site.operands[sp.input_index]
            shared = x_op.spec if isinstance(x_op.spec, SharedQuantizationSpec) else None
            if isinstance(x_op.spec, FixedQParamsSpec):
                scale, zp = _fixed_qparams(x_op.spec, site.stack)
            else:
                x_slot = qstate[shared.site][shared.target] if shared is not None else qstate[name][x_op.key]
                scale, zp = _stacked(_slot_qparams, len(site.stack))(x_slot)
            site_states[name] = ConvertedSite(weight=qw, input=StaticInput(scale, zp, reciprocal(scale)),
                                              eval=eval_qparams)
        else:
            site_states[name] = ConvertedSite(weight=qw, eval=eval_qparams)

    # 4. drop the float weight leaves that only fed converted sites.
    weights = args[argnum]
    converted_paths = {sites[n].operands[p.weight_index].param_path for n, p in plans.items()}
    w_leaves, w_treedef = jax.tree_util.tree_flatten_with_path(weights)
    kept = [None if path_to_name(path) in converted_paths else leaf for path, leaf in w_leaves]
    handler = IntHandler(plans, weight_only_impl=weight_only_impl, conv_impl=conv_impl, pad_batch_one=pad_batch_one)
    placeholders = [jax.ShapeDtypeStruct(jnp.shape(leaf), jnp.result_type(leaf)) for _, leaf in w_leaves]
    converted_names = set(sites)

    def run(stored: list, sites_state: dict, *rest):
        # converted weights are only reshaped/transposed before their site, which ignores them: dead code.
        leaves = [jnp.zeros(ph.shape, ph.dtype) if v is None else v for v, ph in zip(stored, placeholders,
                                                                                       strict=True)]
        full = (*rest[:argnum], jax.tree_util.tree_unflatten(w_treedef, leaves), *rest[argnum:])
        call_plan = qf.plan(*full)  # traced once per input signature
        names = {s.name for s in call_plan.quantized_sites}
        if names != converted_names:
            raise ValueError(
                "int_fn: at these input shapes the function has other quantized sites than at conversion "
                f"(new: {sorted(names - converted_names)}, missing: {sorted(converted_names - names)}); "
                "convert again with example inputs of this structure"
            )
        call_handler, call_plan = handler.for_call(call_plan)
        outs, _ = interpret(call_plan, call_handler, sites_state, *jax.tree_util.tree_leaves(full))
        return jax.tree_util.tree_unflatten(call_plan.out_tree, outs)

    def int_fn(int_params, *rest):
        if not isinstance(int_params, dict) or set(int_params) != {"params", "sites"}:
            raise TypeError("int_params: expected the dict returned by jquant.convert ({'params', 'sites'})")
        stored = jax.tree_util.tree_leaves(int_params["params"], is_leaf=lambda v: v is None)
        if len(stored) != len(placeholders):
            raise ValueError(f"int_params['params']: expected {len(placeholders)} leaves (None for converted "
                             f"weights), got {len(stored)}")
        return run(stored, int_params["sites"], *rest)

    kept = _restore_used(run, kept, [leaf for _, leaf in w_leaves], site_states, args, argnum)
    int_params = {"params": jax.tree_util.tree_unflatten(w_treedef, kept), "sites": site_states}
    rows = []
    for name, site in sites.items():
        w_op = _any_weight_operand(site)
        before = 0
        if w_op is not None:
            before = int(np.prod(captured[name]["w"].shape)) * np.dtype(w_op.dtype).itemsize
        rows.append(_site_report(site, plans.get(name), site_states[name], eqns.get(name), before))
    # Float weight matrices that stay float are listed too, with the reason (nothing is left float silently).
    site_paths = {op.param_path for site in sites.values() for op in site.operands if op.role == "weight"}
    for (path, leaf), stored in zip(w_leaves, kept, strict=True):
        name = path_to_name(path)
        if stored is None or jnp.ndim(leaf) - plan.stacked.get(name, 0) < 2:  # biases, norms (per layer)
            continue
        why = ("also read outside its quantized site (e.g. a tied embedding): kept float" if name in converted_paths
               else "weight of a quantized site without an integer kernel" if name in site_paths
               else "read by no quantized site (e.g. an embedding gather without a gather Rule, or excluded): "
                    "stays float")
        nbytes = tree_nbytes(leaf)
        rows.append(SiteReport(f"param {name}", "float", "float (kept)", str(jnp.result_type(leaf)), nbytes, nbytes,
                               why))
    report = ConversionReport(
        float_bytes=tree_nbytes(weights),
        int_bytes=tree_nbytes(int_params),
        sites=tuple(rows),
        backend=backend(),
    )
    return _with_report(jax.jit(int_fn), report), int_params


def _weight_quantizer(site: Site, eqn, plan: SitePlan, cache: dict) -> Callable:
    """``quantize_site_weight`` for ``site``, jitted once per distinct weight signature (one compilation serves
    every layer of that shape instead of an eager dispatch per operation)."""
    w_op = site.operands[plan.weight_index]
    dn = eqn.params.get("dimension_numbers")
    key = (w_op.spec, w_op.shape, w_op.dtype, w_op.out_axes, w_op.contract_axes, w_op.role, w_op.key, plan,
           repr(dn), site.stack, site.output_shape)
    if key not in cache:
        cache[key] = jax.jit(_stacked(lambda w, slot: quantize_site_weight(site, eqn, plan, w, slot),
                                      len(site.stack)))
    return cache[key]


def _weight_observer(spec, layout, depth: int, cache: dict) -> Callable:
    """The slot observed on the weight, jitted once per (spec, layout, scan depth)."""
    key = (spec, layout, depth)
    if key not in cache:
        cache[key] = jax.jit(_stacked(lambda w, s: slots.observe(spec, layout, s, [w], set_learnable=True), depth))
    return cache[key]


def _fill_unobserved_weights(qstate: dict, sites: dict[str, Site], captured: dict) -> dict:
    """A copy of ``qstate`` where weight slots whose observers never ran hold qparams observed on the weight."""
    filled = {name: dict(site_slots) for name, site_slots in qstate.items()}
    observers: dict = {}
    for name, site in sites.items():
        for op in site.operands:
            if op.role != "weight" or not stateful(op.spec):
                continue
            layout = layout_of(site, op.key, op.spec)
            slot = qstate[name][op.key]
            empty = np.asarray(slots.unobserved(op.spec, layout, slot))
            if not empty.any():
                continue
            fresh = _weight_observer(op.spec, layout, len(site.stack), observers)(captured[name]["w"], slot)
            filled[name][op.key] = jax.tree_util.tree_map(
                lambda new, old, e=empty: jnp.where(jnp.reshape(e, e.shape + (1,) * (jnp.ndim(new) - e.ndim)),
                                                    new, old),
                fresh, slot,
            )
    return filled


def _restore_used(run, kept, originals, site_states, args, argnum):
    """Put back float leaves still read outside converted sites (e.g. a tied embedding also used by a gather)."""
    dropped = [i for i, v in enumerate(kept) if v is None]
    if not dropped:
        return kept
    rest = tuple(a for i, a in enumerate(args) if i != argnum)

    def probe(dropped_values, params_kept, sites, *rest_args):
        stored = list(params_kept)
        for i, v in zip(dropped, dropped_values, strict=True):
            stored[i] = v
        return run(stored, sites, *rest_args)

    closed = jax.make_jaxpr(probe)([originals[i] for i in dropped], kept, site_states, *rest)
    used = used_inputs(closed.jaxpr)
    restored = list(kept)
    for i, is_used in zip(dropped, used[: len(dropped)], strict=True):
        if is_used:
            restored[i] = originals[i]
    return restored


def _with_report(fn, report):
    def int_fn(int_params, *args):
        return fn(int_params, *args)

    int_fn.report = report
    int_fn.__doc__ = "Integer execution of the converted function: int_fn(int_params, *args_without_weights)."
    return int_fn

