"""The qstate pytree: layout, creation, validation and the learnable (LSQ) part.

Layout (nested dicts keyed by site name and role, typed slots as leaves' containers; it jits, checkpoints
and prints well)::

    qstate = {
        "<site name>": {                      # every quantized site, even one without state ({})
            "<role key>": ObservedSlot(       # role keys: "weight", "input", "input0", ..., "output"
                observer=<observer state>,    # e.g. MinMaxState(min_val, max_val)
                scale=f32[...],               # qparams from the last calibrate/qat call
                zero_point=i32[...],
            ),
            "<LSQ role key>": LearnableSlot(observer=..., scale=f32[...], zero_point=f32[...]),  # trained
        },
    }

Only stateful slots appear (static ``QuantizationSpec``); dynamic, fixed, shared and derived specs have none.
Per-channel qparams have one entry per output feature (weights) or per ``ch_axis`` entry; per-group and
multi-dim per-channel weights use the 2-D row view described in ``slots.py``. Sites inside ``scan`` bodies
have every leaf stacked with the enclosing trip counts as leading dims (one state per iteration/layer).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jquant.transform.handler import init_site_state, layout_of, stateful
from jquant.transform.plan import Plan
from jquant.transform.slots import LearnableSlot, QParams, unobserved


def init_qstate(plan: Plan) -> dict:
    """Fresh qstate for every quantized site of ``plan`` (observers empty, scale 1, zero point 0)."""
    qstate = {}
    for site in plan.quantized_sites:
        state = init_site_state(site)
        if site.stack:
            state = jax.tree_util.tree_map(lambda x, s=site.stack: jnp.broadcast_to(x, (*s, *jnp.shape(x))), state)
        qstate[site.name] = state
    return qstate


def validate_qstate(qstate: Any, plan: Plan) -> None:
    """Raise a ValueError naming the mismatched sites when ``qstate`` was not made for this function."""
    if not isinstance(qstate, dict):
        raise TypeError(f"qstate: expected the dict returned by qf.init, got {type(qstate).__name__}")
    expected = {s.name for s in plan.quantized_sites}
    missing = sorted(expected - set(qstate))
    unexpected = sorted(set(qstate) - expected)
    if missing or unexpected:
        raise ValueError(
            "qstate does not belong to this quantized function (or to these input shapes): "
            f"missing sites {missing}, unexpected sites {unexpected}. Create it with qf.init(*args)."
        )
    reference = getattr(plan, "_qstate_shapes", None)
    if reference is None:  # computed once per traced signature
        reference = plan._qstate_shapes = jax.eval_shape(lambda: init_qstate(plan))
    for name in sorted(expected):
        got = jax.tree_util.tree_structure(qstate[name])
        want = jax.tree_util.tree_structure(reference[name])
        if got != want:
            raise ValueError(f"qstate[{name!r}]: structure {got} does not match the site's expected {want}")
        for leaf, ref in zip(jax.tree_util.tree_leaves(qstate[name]), jax.tree_util.tree_leaves(reference[name]),
                             strict=True):
            if jnp.shape(leaf) != ref.shape:
                raise ValueError(
                    f"qstate[{name!r}]: a leaf has shape {jnp.shape(leaf)}, expected {ref.shape} for this site"
                )


def learnable_params(qstate: dict) -> dict:
    """The LSQ qparams of ``qstate``: ``{site: {key: QParams(scale, zero_point)}}`` (float; differentiate these).

    Typical QAT step::

        def loss(params, learn):
            out, new_qs = qf.apply(merge_learnable(qstate, learn), params, x, mode="qat")
            return loss_fn(out), new_qs
        (l, new_qs), (g_params, g_learn) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            params, learnable_params(qstate))
    """
    out = {}
    for site, site_slots in qstate.items():
        learn = {
            key: QParams(slot.scale, slot.zero_point)
            for key, slot in site_slots.items()
            if isinstance(slot, LearnableSlot)
        }
        if learn:
            out[site] = learn
    return out


def merge_learnable(qstate: dict, learnable: dict) -> dict:
    """A copy of ``qstate`` with the LSQ qparams replaced by ``learnable`` (as from ``learnable_params``)."""
    merged = {site: dict(site_slots) for site, site_slots in qstate.items()}
    for site, site_slots in learnable.items():
        if site not in merged:
            raise ValueError(f"merge_learnable: site {site!r} is not in qstate")
        for key, value in site_slots.items():
            slot = merged[site].get(key)
            if not isinstance(slot, LearnableSlot):
                raise ValueError(f"merge_learnable: qstate[{site!r}][{key!r}] has no learnable qparams")
            scale, zero_point = value
            merged[site][key] = slot._replace(scale=scale, zero_point=zero_point)
    return merged


def unobserved_activations(qstate: dict, plan: Plan) -> list[str]:
    """``"site (key)"`` for every static activation / output slot whose observer never ran (concrete qstate)."""
    missing = []
    for site in plan.quantized_sites:
        for key, spec in site.specs.items():
            if key == "weight" or not stateful(spec):
                continue
            if key != "output" and site.operand(key).role == "weight":
                continue
            if bool(np.asarray(unobserved(spec, layout_of(site, key, spec), qstate[site.name][key])).any()):
                missing.append(f"{site.name} ({key})")
    return missing
