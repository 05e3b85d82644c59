"""``jquant.quantize(fn, config)``: a function transform that quantizes any JAX function.

Usage::

    qf = jquant.quantize(fn, config, params_argnums=0)   # config=None: int8 static preset; []: nothing
    qstate = qf.init(*args)                                # observers + qparams per site (see state.py)
    out, qstate = qf.apply(qstate, *args, mode="calibrate")  # float function; observers updated
    out, qstate = qf.apply(qstate, *args, mode="qat")        # fake-quant (STE or LSQ); observers updated
    out, qstate = qf.apply(qstate, *args, mode="eval")       # fake-quant with frozen qparams; qstate unchanged
    qf.sites                                               # Site records of the last traced signature

``fn`` is traced once per input signature (pytree structure, shapes, dtypes) with ``jax.make_jaxpr`` on
abstract arguments, so the weights are jaxpr inputs, never baked-in constants. Arguments must be pytrees of
arrays (close over static options). ``apply`` is jitted per mode; it also works inside your own
``jit``, ``grad`` (STE gradients w.r.t. weights and inputs; LSQ qparams via ``learnable_params``),
``vmap`` and on sharded inputs (observer statistics are computed on the global arrays).

Rules that match no site produce a warning, or a ValueError with ``strict=True``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import jax
from jax.extend import source_info_util

from jquant import presets
from jquant.transform.fold_bn import fold_batchnorm
from jquant.transform.handler import QuantizeHandler, check_mode
from jquant.transform.int8_qat import Int8QATHandler
from jquant.transform.interpreter import interpret
from jquant.transform.plan import Plan, build_plan
from jquant.transform.quantizer import as_quantizer
from jquant.transform.sites import Site, path_to_name
from jquant.transform.state import init_qstate, unobserved_activations, validate_qstate


class QuantizedFunction:
    """The result of ``jquant.quantize``: ``init``, ``apply`` and ``sites`` (see module docstring)."""

    def __init__(self, fn: Callable, config: Any = None, params_argnums: int | Sequence[int] = 0, strict: bool = False):
        if not callable(fn):
            raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
        self.fn = fn
        self.quantizer = as_quantizer(presets.int8_static() if config is None else config, strict)
        self.rules = tuple(getattr(self.quantizer, "rules", ()))
        argnums = (params_argnums,) if isinstance(params_argnums, int) else tuple(params_argnums)
        if not argnums or not all(isinstance(a, int) and a >= 0 for a in argnums):
            raise ValueError(f"params_argnums: expected non-negative ints, got {params_argnums!r}")
        self.params_argnums = argnums
        self.strict = strict
        self._plans: dict[Any, tuple[Plan, Any]] = {}
        self._last: Plan | None = None
        self._warned_unobserved = False
        self._apply = {mode: jax.jit(partial(self._apply_impl, mode=mode)) for mode in ("calibrate", "qat", "eval")}
        for backward in (False, True):
            self._apply[("qat_int8", backward)] = jax.jit(
                partial(self._apply_impl, mode="qat", int8_forward=True, int8_backward=backward)
            )

    # -- tracing -------------------------------------------------------------------------------------------
    def _weight_paths(self, args: tuple) -> list[str | None]:
        if len(args) <= max(self.params_argnums):
            raise TypeError(
                f"quantize: params_argnums={self.params_argnums} but the function got {len(args)} positional "
                "argument(s); pass the weights at that position (or set params_argnums)"
            )
        paths = []
        found = {a: False for a in self.params_argnums}
        for path, leaf in jax.tree_util.tree_flatten_with_path(args)[0]:
            argnum = path[0].idx
            if argnum in found:
                found[argnum] = found[argnum] or jax.numpy.issubdtype(jax.numpy.result_type(leaf), jax.numpy.floating)
                name = path_to_name(path[1:]) or f"arg{argnum}"
                paths.append(name if len(self.params_argnums) == 1 else f"arg{argnum}/{name}")
            else:
                paths.append(None)
        empty = [a for a, ok in found.items() if not ok]
        if empty:
            raise ValueError(
                f"quantize: argument(s) {empty} (params_argnums) hold no floating-point arrays; pass the weights "
                "there"
            )
        return paths

    def plan(self, *args) -> Plan:
        """Trace ``fn`` for the signature of ``args`` (cached) and return its ``Plan``."""
        return self._trace(args)[0]

    def _trace(self, args: tuple) -> tuple[Plan, Any]:
        leaves, treedef = jax.tree_util.tree_flatten(args)
        avals = tuple(jax.typeof(x) for x in leaves)
        key = (treedef, tuple((a.shape, a.dtype, getattr(a, "weak_type", False)) for a in avals))
        cached = self._plans.get(key)
        if cached is None:
            paths = self._weight_paths(args)
            out_tree = []

            def flat_fn(*flat):
                out = self.fn(*jax.tree_util.tree_unflatten(treedef, flat))
                out_leaves, tree = jax.tree_util.tree_flatten(out)
                out_tree.append(tree)
                return out_leaves

            specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=getattr(a, "weak_type", False)) for a in avals]
            with source_info_util.reset_name_stack():
                closed = jax.make_jaxpr(flat_fn)(*specs)
            if self.quantizer.fold_batchnorm:
                closed = fold_batchnorm(closed, [p is not None for p in paths])
            plan = build_plan(closed, paths, self.quantizer)
            plan.out_tree = out_tree[0]
            cached = (plan, out_tree[0])
            self._plans[key] = cached
        self._last = cached[0]
        return cached

    # -- user API ------------------------------------------------------------------------------------------
    @property
    def sites(self) -> list[Site]:
        """Every site (quantized or not) of the most recently traced signature; call ``init`` first."""
        if self._last is None:
            raise RuntimeError("qf.sites: the function has not been traced yet; call qf.init(*args) first")
        return list(self._last.sites)

    def init(self, *args) -> dict:
        """A fresh qstate for ``args``' signature: empty observers, scale 1, zero point 0."""
        plan = self._trace(args)[0]
        return jax.jit(partial(init_qstate, plan))()  # one compile instead of many eager ops

    def apply(
        self, qstate: dict, *args, mode: str = "eval", int8_forward: bool = False, int8_backward: bool = False
    ) -> tuple[Any, dict]:
        """Run the quantized function; returns ``(output, new_qstate)``. ``mode``: calibrate | qat | eval.

        ``int8_forward=True`` (``mode="qat"`` only) runs eligible ``dot_general`` sites as int8 x int8 -> int32
        dots with straight-through float gradients (``jquant.transform.int8_qat``): the same values as fake
        quant up to float rounding (the integer sums are exact), the same observer updates.
        ``int8_backward=True`` (with ``int8_forward``) also runs the input-gradient dots in int8: the output
        gradient is quantized per row (adds gradient rounding noise; weight gradients stay float32).
        """
        check_mode(mode)
        if int8_forward and mode != "qat":
            raise ValueError(f"int8_forward: only applies to mode='qat', got mode={mode!r}")
        if int8_backward and not int8_forward:
            raise ValueError("int8_backward: needs int8_forward=True (the int8 input-gradient dot belongs to it)")
        plan, _ = self._trace(args)
        validate_qstate(qstate, plan)
        if mode == "eval" and not self._warned_unobserved and _is_concrete(qstate):
            try:
                missing = unobserved_activations(qstate, plan)
            except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
                    jax.errors.TracerBoolConversionError):  # inside someone's jit / grad trace: cannot tell here
                missing = []
            if missing:
                self._warned_unobserved = True
                warnings.warn(
                    f"eval: static activation observers never ran at {', '.join(missing)}; their qparams are "
                    "the initial ones (scale 1, zero point 0). Calibrate first (mode='calibrate').",
                    stacklevel=2,
                )
        out, new_qstate = self._apply[("qat_int8", int8_backward) if int8_forward else mode](qstate, *args)
        return out, (qstate if mode == "eval" else new_qstate)

    def _apply_impl(self, qstate: dict, *args, mode: str, int8_forward: bool = False, int8_backward: bool = False):
        plan, out_tree = self._trace(args)
        handler = Int8QATHandler(int8_backward) if int8_forward else QuantizeHandler(mode)
        outs, new_states = interpret(plan, handler, qstate, *jax.tree_util.tree_leaves(args))
        # eval leaves the qstate unchanged: do not make the compiled program copy it out.
        return jax.tree_util.tree_unflatten(out_tree, outs), (None if mode == "eval" else new_states)

    def __repr__(self) -> str:
        policy = f"{len(self.rules)} rule(s)" if type(self.quantizer).__name__ == "RuleQuantizer" else self.quantizer
        lines = [f"QuantizedFunction({getattr(self.fn, '__name__', self.fn)!r}, {policy})"]
        if self._last is not None:
            lines += [f"  {site}" for site in self._last.sites]
        return "\n".join(lines)


def _is_concrete(tree: Any) -> bool:
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(tree))


def quantize(
    fn: Callable, config: Any = None, *, params_argnums: int | Sequence[int] = 0, strict: bool = False
) -> QuantizedFunction:
    """Quantize ``fn`` (any JAX function: Flax linen/nnx, equinox, plain jax.numpy) without editing it.

    Args:
      fn: the function; its argument(s) at ``params_argnums`` hold the weights (a pytree of arrays).
      config: None (the int8 static preset), ``[]`` (quantize nothing: exact original outputs and gradients),
        a ``Rule`` or an ordered list of ``Rule`` (first match wins; see ``jquant.presets``), or a
        ``jquant.Quantizer`` (a backend policy object, e.g. ``jquant.presets.torch_x86()``).
      params_argnums: position(s) of the weights argument(s); weight vs activation is decided by data flow.
      strict: raise instead of warning when a rule matches no site.
    """
    return QuantizedFunction(fn, config, params_argnums=params_argnums, strict=strict)
