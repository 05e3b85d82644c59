"""``int_fn, int_params = jquant.convert(qf, qstate, *args)``: serve a quantized function with integer ops.

How it works: the weights each quantized ``dot_general`` / ``conv_general_dilated`` site sees are captured
once (one interpreter pass that records the site's weight operand, so reshapes, transposes and ``nn.scan``
stacking of the weights are already applied), quantized with the calibrated weight qparams of ``qstate``
into a ``QuantizedWeight`` and stored in ``int_params``. The float leaves that only fed those sites are
dropped from the weights (``int_params["params"]`` keeps every other leaf: biases, norms, float layers).
``int_fn`` runs the same jaxpr through the interpreter's site hook, executing each converted site with the
integer kernels:

- static activation spec (per-tensor int8/uint8, calibrated): ``int8_dot_general`` / ``int8_conv``;
- dynamic activation spec (per tensor): ``dynamic_int8_dot_general`` / ``dynamic_int8_conv``;
- no activation spec (weight-only int8 / int4): ``weight_only_dot_general`` (conv: dequantize + float conv).

A bias added after a site stays a separate float ``add`` (XLA fuses it into the rescale); the int32
bias of ``int8_dot_general(bias=...)`` is for hand-written integer models. Activations between sites stay
float32 and are re-quantized by the next site's kernel, which XLA fuses with the previous rescale, bias and
activation function into one elementwise pass.

Sites the kernels do not cover (other primitives, per-channel or float8 activation specs, output specs,
grouped convs with per-group weights, ...) run as in ``mode="eval"`` (fake-quant); if their weight is an
int8/int4 site weight it is still stored as integers and dequantized on the fly. Numerics equal the
``eval`` function up to float rounding of the rescale (and, for the dynamic CPU weight-only path, one
per-row activation rounding; pass ``weight_only_impl="dequantize"`` for the exact weight-only numerics).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jquant.kernels.conv import dynamic_int8_conv, int8_conv
from jquant.kernels.dot import DotLayout, dynamic_int8_dot_general, int8_dot_general, weight_only_dot_general
from jquant.kernels.weights import QuantizedWeight, canonical_matrix, tree_nbytes, weight_block_size
from jquant.numerics.affine import quantize_affine, reciprocal
from jquant.numerics.packing import pack_int4
from jquant.numerics.qschemes import is_symmetric
from jquant.transform.compat import used_inputs
from jquant.transform.handler import QuantizeHandler, layout_of
from jquant.transform.interpreter import bind_eqn, interpret
from jquant.transform.sites import Site, path_to_name
from jquant.transform.slots import slot_qparams
from jquant.transform.specs import QuantizationSpec
from jquant.transform.state import validate_qstate

DENSE = (((1,), (0,)), ((), ()))
INT_WEIGHT_DTYPES = ("int8", "int4")


@dataclasses.dataclass(frozen=True)
class SitePlan:
    """How one site runs after conversion: ``kind`` is "static", "dynamic", "weight_only" or "dequantize"."""

    kind: str
    weight_index: int
    input_index: int | None
    layout: str  # "dot" (canonical (K, N) weight) or "conv" (weight kept in its own layout)


def _weight_operand(site: Site):
    weights = [op for op in site.operands if op.role == "weight"]
    if len(weights) != 1 or not isinstance(weights[0].spec, QuantizationSpec):
        return None
    spec = weights[0].spec
    if spec.dtype not in INT_WEIGHT_DTYPES or spec.is_dynamic:
        return None
    return weights[0]


def _activation_kind(spec: Any) -> str | None:
    if spec is None:
        return "weight_only"
    if not isinstance(spec, QuantizationSpec) or spec.dtype not in ("int8", "uint8") or spec.per_channel:
        return None
    return "dynamic" if spec.is_dynamic else "static"


def plan_site(site: Site, eqn) -> SitePlan | None:
    """The integer execution of ``site`` (None: it stays as in eval mode, float weights kept)."""
    if site.primitive not in ("dot_general", "conv_general_dilated"):
        return None
    w_op = _weight_operand(site)
    if w_op is None:
        return None
    inputs = [op for op in site.operands if op.role == "input"]
    x_op = inputs[0] if len(inputs) == 1 else None
    if site.primitive == "dot_general":
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        contract = rc if w_op.index == 1 else lc
        if lb or rb or (w_op.spec.block_size and len(contract) != 1):
            return None
        layout = "dot"
    else:
        dn = eqn.params["dimension_numbers"]
        out_axis = dn.rhs_spec[0]
        if w_op.index != 1 or w_op.spec.block_size or not is_symmetric(w_op.spec.qscheme):
            return None
        if w_op.spec.per_channel and tuple(w_op.out_axes) != (out_axis,) and w_op.spec.ch_axis in (None,):
            return None
        if eqn.params.get("batch_group_count", 1) != 1:
            return None
        layout = "conv"
    kind = _activation_kind(x_op.spec) if x_op is not None else None
    if x_op is None or kind is None or site.output_spec is not None:
        kind = "dequantize"
    elif layout == "conv" and kind == "weight_only":
        kind = "dequantize"
    return SitePlan(kind, w_op.index, None if x_op is None else x_op.index, layout)


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


def _slot_qparams(slot: dict) -> tuple[jnp.ndarray, jnp.ndarray]:
    scale, zero_point = slot_qparams(slot)
    # LSQ keeps a float zero point; its forward rounds it half to even.
    return jnp.asarray(scale, jnp.float32), jnp.round(jnp.asarray(zero_point)).astype(jnp.int32)


def quantize_site_weight(site: Site, eqn, plan: SitePlan, w: jnp.ndarray, slot: dict) -> QuantizedWeight:
    """The site's weight operand ``w`` as integers with the site's calibrated weight qparams."""
    w_op = site.operands[plan.weight_index]
    spec = w_op.spec
    layout = layout_of(site, w_op.key, spec)
    scale, zero_point = _slot_qparams(slot)
    axis = None if layout.axis is None else (0 if layout.perm is not None else layout.axis)
    q = layout.from_view(
        quantize_affine(layout.to_view(w.astype(jnp.float32)), scale, zero_point, dtype=spec.dtype, axis=axis,
                        quant_min=spec.quant_min, quant_max=spec.quant_max)
    )
    symmetric = is_symmetric(spec.qscheme)
    if plan.layout == "conv":
        out_axis = eqn.params["dimension_numbers"].rhs_spec[0]
        per_channel = layout.axis is not None
        block = weight_block_size(w.shape, axis=out_axis if per_channel else None, group_size=None, group_axis=None)
        counts = tuple(n // b for n, b in zip(w.shape, block, strict=True))
        return QuantizedWeight(q, scale.reshape(counts), None, dtype=spec.dtype, shape=tuple(w.shape),
                               block_size=block, axis=out_axis if per_channel else None)
    (lc, rc), _ = eqn.params["dimension_numbers"]
    contract = tuple(rc if plan.weight_index == 1 else lc)
    free = tuple(a for a in range(w.ndim) if a not in contract)
    q2 = canonical_matrix(q, contract, free)
    k, n = q2.shape
    groups = k // spec.block_size if spec.block_size else 1
    gs = k // groups

    def per_group(values):
        full = canonical_matrix(_qparam_map(layout, values, w.shape), contract, free)
        return full.reshape(groups, gs, n)[:, 0, :]

    scale2 = per_group(scale)
    zp2 = None if symmetric else per_group(zero_point).astype(jnp.int32)
    x_spec = site.operands[plan.input_index].spec if plan.input_index is not None else None
    needs_sums = plan.kind == "static" or (plan.kind == "dynamic" and not is_symmetric(x_spec.qscheme))
    sums = jnp.sum(q2.astype(jnp.int32).reshape(groups, gs, n), axis=1) if needs_sums else None
    packed, packed_axis = False, None
    if spec.dtype == "int4" and (n % 2 == 0 or k % 2 == 0):
        packed_axis = 1 if n % 2 == 0 else 0
        q2, packed = pack_int4(q2, axis=packed_axis), True
    return QuantizedWeight(
        q2, scale2, zp2, sums, dtype=spec.dtype, shape=(k, n), block_size=(gs, 1), axis=1,
        group_size=gs if groups > 1 else None, group_axis=0 if groups > 1 else None, packed=packed,
        packed_axis=packed_axis, sum_axes=(0,) if needs_sums else None,
    )


def _original_layout_weight(qw: QuantizedWeight, plan: SitePlan, site: Site, eqn) -> jnp.ndarray:
    """Dequantized weight in the site operand's own layout (for sites that run in float)."""
    w = qw.dequantize()
    if plan.layout == "conv":
        return w
    shape = site.operands[plan.weight_index].shape
    (lc, rc), _ = eqn.params["dimension_numbers"]
    contract = tuple(rc if plan.weight_index == 1 else lc)
    perm = contract + tuple(a for a in range(len(shape)) if a not in contract)
    return jnp.transpose(w.reshape(tuple(shape[a] for a in perm)), tuple(np.argsort(perm)))


# -- the integer site handler ---------------------------------------------------------------------------------


class IntHandler:
    """Interpreter site hook running converted sites with integer kernels (others as ``mode="eval"``)."""

    def __init__(self, plans: dict[str, SitePlan], weight_only_impl: str = "auto", conv_impl: str = "auto",
                 pad_batch_one: bool | None = None):
        self.plans = plans
        self.weight_only_impl = weight_only_impl
        self.conv_impl = conv_impl
        self.pad = pad_batch_one
        self.eval = QuantizeHandler("eval")

    def __call__(self, site: Site, eqn, invals: list, state: dict, scope):
        plan = self.plans.get(site.name)
        if plan is None:
            return self.eval(site, eqn, invals, state, scope)
        qw = state["weight"]
        if plan.kind == "dequantize":
            values = list(invals)
            values[plan.weight_index] = _original_layout_weight(qw, plan, site, eqn)
            outs, _ = self.eval(site, eqn, values, state["eval"], scope)
            return outs, state
        x = invals[plan.input_index]
        x_op = site.operands[plan.input_index]
        y = self._conv(site, eqn, plan, x, qw, state) if plan.layout == "conv" else self._dot(
            site, eqn, plan, x, qw, state, x_op.spec)
        return [y], state

    def _dot(self, site, eqn, plan, x, qw, state, x_spec):
        side = "rhs" if plan.weight_index == 1 else "lhs"
        w_shape = site.operands[plan.weight_index].shape
        layout = DotLayout.of(x.ndim, len(w_shape), eqn.params["dimension_numbers"], side)
        x2 = layout.x_matrix(x)
        if plan.kind == "static":
            act = state["input"]
            y2 = int8_dot_general(x2, qw, DENSE, act_scale=act["scale"], act_zero_point=act["zero_point"],
                                  act_inv_scale=act["inv_scale"],
                                  act_dtype=x_spec.dtype, act_quant_min=x_spec.quant_min,
                                  act_quant_max=x_spec.quant_max, pad_batch_one=self.pad)
        elif plan.kind == "dynamic":
            y2 = dynamic_int8_dot_general(x2, qw, DENSE, per_token=False, symmetric=is_symmetric(x_spec.qscheme),
                                          act_dtype=x_spec.dtype, pad_batch_one=self.pad)
        else:
            y2 = weight_only_dot_general(x2, qw, DENSE, impl=self.weight_only_impl, pad_batch_one=self.pad)
        return layout.output(y2, x.shape, w_shape)

    def _conv(self, site, eqn, plan, x, qw, state):
        p = eqn.params
        x_spec = site.operands[plan.input_index].spec
        args = (x, qw, p["window_strides"], p["padding"], p["lhs_dilation"], p["rhs_dilation"],
                p["dimension_numbers"], p["feature_group_count"])
        if plan.kind == "static":
            act = state["input"]
            return int8_conv(*args, act_scale=act["scale"], act_zero_point=act["zero_point"],
                             act_inv_scale=act["inv_scale"], act_dtype=x_spec.dtype,
                             act_quant_min=x_spec.quant_min, act_quant_max=x_spec.quant_max, impl=self.conv_impl,
                             pad_batch_one=self.pad)
        return dynamic_int8_conv(*args, symmetric=is_symmetric(x_spec.qscheme), act_dtype=x_spec.dtype,
                                 impl=self.conv_impl, pad_batch_one=self.pad)


class _CaptureWeights:
    """Site hook that records each converted site's weight operand (and its equation) and runs it in float."""

    def __init__(self, plans_out: dict, eqns_out: dict):
        self.plans = plans_out
        self.eqns = eqns_out

    def __call__(self, site, eqn, invals, state, scope):
        self.eqns[site.name] = eqn
        plan = plan_site(site, eqn)
        if plan is not None:
            self.plans[site.name] = plan
            state = {"w": invals[plan.weight_index].astype(state["w"].dtype)}
        return bind_eqn(eqn, invals), state


def _stacked(fn: Callable, depth: int) -> Callable:
    for _ in range(depth):
        fn = jax.vmap(fn)
    return fn


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    """Bytes of the float weights vs ``int_params`` and which sites run how."""

    float_bytes: int
    int_bytes: int
    site_kinds: dict[str, str]

    @property
    def ratio(self) -> float:
        return self.float_bytes / max(self.int_bytes, 1)

    def __str__(self) -> str:
        kinds = ", ".join(f"{k}: {v}" for k, v in self.site_kinds.items())
        return f"weights {self.float_bytes} B -> int params {self.int_bytes} B ({self.ratio:.2f}x smaller); {kinds}"


def convert(qf, qstate: dict, *args, weight_only_impl: str = "auto", conv_impl: str = "auto",
            pad_batch_one: bool | None = None):
    """Convert a calibrated ``jquant.quantize`` function to integer execution.

    ``weight_only_impl`` / ``conv_impl`` / ``pad_batch_one``: kernel choices (see ``weight_only_dot_general``,
    ``int8_conv``, ``int8_matmul``; the defaults pick the fast path for the backend).

    Returns ``(int_fn, int_params)``: ``int_fn(int_params, *args_without_weights)`` (``int_params`` takes the
    place of the weights argument) is jitted and runs the integer kernels at the converted sites.
    ``int_fn.report`` is a ``ConversionReport`` (bytes before / after, execution kind per site).
    """
    if len(qf.params_argnums) != 1:
        raise ValueError(f"convert: needs a single weights argument, got params_argnums={qf.params_argnums}")
    argnum = qf.params_argnums[0]
    plan = qf.plan(*args)
    validate_qstate(qstate, plan)
    flat_args = jax.tree_util.tree_leaves(args)

    # 1. capture the weight operand of every convertible site (stacked for scans).
    plans: dict[str, SitePlan] = {}
    eqns: dict[str, Any] = {}
    capture_states = {}
    for site in plan.quantized_sites:
        w_op = _weight_operand(site)
        shape = w_op.shape if w_op is not None else ()
        capture_states[site.name] = {"w": jnp.zeros((*site.stack, *shape), jnp.float32)}
    captured = jax.jit(lambda st, fl: interpret(plan, _CaptureWeights(plans, eqns), st, *fl)[1])(
        capture_states, flat_args)

    # 2. quantize them with the calibrated qparams; keep what the other sites need for eval mode.
    sites = {s.name: s for s in plan.quantized_sites}
    site_states = {}
    for name, site in sites.items():
        sp = plans.get(name)
        if sp is None:
            site_states[name] = qstate[name]
            continue
        w_key = site.operands[sp.weight_index].key
        qw = _stacked(lambda w, slot, s=site, p=sp: quantize_site_weight(s, eqns[s.name], p, w, slot),
                      len(site.stack))(captured[name]["w"], qstate[name][w_key])
        entry = {"weight": qw}
        if sp.kind == "static":
            x_key = site.operands[sp.input_index].key
            scale, zp = _stacked(_slot_qparams, len(site.stack))(qstate[name][x_key])
            entry["input"] = {"scale": scale, "zero_point": zp, "inv_scale": reciprocal(scale)}
        elif sp.kind == "dequantize":
            entry["eval"] = dict(qstate[name])
        site_states[name] = entry

    # 3. drop the float weight leaves that only fed converted sites.
    weights = args[argnum]
    converted_paths = {sites[n].operands[p.weight_index].param_path for n, p in plans.items()}
    w_leaves, w_treedef = jax.tree_util.tree_flatten_with_path(weights)
    kept = [None if path_to_name(path) in converted_paths else leaf for path, leaf in w_leaves]
    out_tree = plan.out_tree
    handler = IntHandler(plans, weight_only_impl=weight_only_impl, conv_impl=conv_impl, pad_batch_one=pad_batch_one)
    placeholders = [jax.ShapeDtypeStruct(jnp.shape(leaf), jnp.result_type(leaf)) for _, leaf in w_leaves]

    def run(stored: list, sites_state: dict, *rest):
        # converted weights are only reshaped/transposed before their site, which ignores them: dead code.
        leaves = [jnp.zeros(ph.shape, ph.dtype) if v is None else v for v, ph in zip(stored, placeholders,
                                                                                       strict=True)]
        full = (*rest[:argnum], jax.tree_util.tree_unflatten(w_treedef, leaves), *rest[argnum:])
        outs, _ = interpret(plan, handler, sites_state, *jax.tree_util.tree_leaves(full))
        return jax.tree_util.tree_unflatten(out_tree, outs)

    def int_fn(int_params, *rest):
        stored = jax.tree_util.tree_leaves(int_params["params"], is_leaf=lambda v: v is None)
        if len(stored) != len(placeholders):
            raise ValueError(f"int_params['params']: expected {len(placeholders)} leaves (None for converted "
                             f"weights), got {len(stored)}")
        return run(stored, int_params["sites"], *rest)

    kept = _restore_used(run, kept, [leaf for _, leaf in w_leaves], site_states, args, argnum)
    int_params = {"params": jax.tree_util.tree_unflatten(w_treedef, kept), "sites": site_states}
    jitted = jax.jit(int_fn)
    report = ConversionReport(
        float_bytes=tree_nbytes(weights),
        int_bytes=tree_nbytes(int_params),
        site_kinds={n: (plans[n].kind if n in plans else "eval (fake-quant)") for n in sites},
    )
    wrapped = _with_report(jitted, report)
    return wrapped, int_params


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
