"""Numeric suite: per-site SQNR of the quantized model against the float model, to find the layers that hurt.

``report = jquant.compare(qf, qstate, *args)`` runs the float function and the ``eval``-mode quantized
function on the same inputs, records the output of every quantized site in both, and reports
``SQNR = 10 log10(sum(float^2) / sum((float - quant)^2))`` in dB (higher is better; ``inf`` = identical).
The quantized side includes the error of every earlier site, as in deployment. Sites inside a scan get
one row per iteration (``name[i]``); sites in a while loop report the last iteration.

``report.rows`` is a list of dicts (site, primitive, sqnr_db), ``str(report)`` a table, and
``report.save_png(path)`` (or ``png_path=``) writes a bar chart when matplotlib is installed.
"""

from __future__ import annotations

import dataclasses
import math
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jquant.text_table import format_table
from jquant.transform.handler import QuantizeHandler
from jquant.transform.interpreter import bind_eqn, interpret
from jquant.transform.state import validate_qstate


class _Recorder:
    """Wraps a site handler (None: the float computation) and stores each site's output in its state."""

    def __init__(self, inner: QuantizeHandler | None):
        self.inner = inner

    def __call__(self, site, eqn, invals, state, scope):
        if self.inner is None:
            outs, new_q = bind_eqn(eqn, invals), state["q"]
        else:
            unwrapped = MappingProxyType({name: s["q"] for name, s in scope.items()})
            outs, new_q = self.inner(site, eqn, invals, state["q"], unwrapped)
        return outs, {"q": new_q, "out": jnp.asarray(outs[0], jnp.float32)}


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB (inf when identical)."""
    reference = np.asarray(reference, np.float64)
    noise = np.sum((reference - np.asarray(approx, np.float64)) ** 2)
    signal = np.sum(reference**2)
    if noise == 0:
        return math.inf
    return float(10 * np.log10(max(signal, 1e-300) / noise))


SQNR_HELP = (
    "sqnr_db: signal-to-quantization-noise ratio of each site's output, 10*log10(|float|^2 / |quantized - float|^2)"
    ", higher is better. Each 6 dB is about one bit: >= 30 dB is usually harmless, < 20 dB is where accuracy goes;"
    " start with the lowest rows (exclude them, or give them a finer spec)."
)


@dataclasses.dataclass
class CompareReport:
    rows: list[dict[str, Any]]

    def __str__(self) -> str:
        rows = [(r["site"], r["primitive"], f"{r['sqnr_db']:7.2f}") for r in self.rows]
        return format_table(("site", "primitive", "sqnr_db"), rows) + "\n" + SQNR_HELP

    def worst(self, n: int = 5) -> list[dict[str, Any]]:
        return sorted(self.rows, key=lambda r: r["sqnr_db"])[:n]

    def save_png(self, path: str) -> bool:
        """Write a horizontal bar chart of SQNR per site; returns False when matplotlib is not installed."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return False
        values = [min(r["sqnr_db"], 100.0) for r in self.rows]
        fig, ax = plt.subplots(figsize=(8, 0.35 * len(self.rows) + 1.2))
        ax.barh([r["site"] for r in self.rows], values)
        ax.invert_yaxis()
        ax.set_xlabel("SQNR (dB, higher is better; capped at 100)")
        ax.set_title("jquant: quantized vs float, per site")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return True


def compare(qf, qstate: dict, *args, png_path: str | None = None) -> CompareReport:
    """Per-site SQNR (dB) of ``qf`` in eval mode with ``qstate`` vs the float function, on ``args``."""
    plan = qf.plan(*args)
    validate_qstate(qstate, plan)
    leaves = jax.tree_util.tree_leaves(args)
    states = {
        site.name: {"q": qstate[site.name], "out": jnp.zeros((*site.stack, *site.output_shape), jnp.float32)}
        for site in plan.quantized_sites
    }

    @jax.jit
    def run(states, leaves):
        _, floats = interpret(plan, _Recorder(None), states, *leaves)
        _, quants = interpret(plan, _Recorder(QuantizeHandler("eval")), states, *leaves)
        return {n: s["out"] for n, s in floats.items()}, {n: s["out"] for n, s in quants.items()}

    floats, quants = run(states, leaves)
    rows = []
    for site in plan.quantized_sites:
        f, q = np.asarray(floats[site.name]), np.asarray(quants[site.name])
        if site.stack:
            for index in np.ndindex(*site.stack):
                label = f"{site.name}[{','.join(map(str, index))}]"
                rows.append({"site": label, "primitive": site.primitive, "sqnr_db": sqnr_db(f[index], q[index])})
        else:
            rows.append({"site": site.name, "primitive": site.primitive, "sqnr_db": sqnr_db(f, q)})
    report = CompareReport(rows)
    if png_path is not None:
        report.save_png(png_path)
    return report
