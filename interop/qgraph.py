"""The torch side of qparam linking: which torch op produced the tensor a record quantizes, and which ops use it.

The graph is the FX graph of the torch model: the ``GraphModule`` itself when the user quantized with
``prepare_fx`` / ``prepare_qat_fx`` / ``convert_fx`` / ``convert_to_reference_fx``, else a
``torch.fx`` symbolic trace of the eager model in which observers, fake quants, quant stubs and every module
holding qparams stay leaves (so eager ``prepare_qat`` / ``convert`` models trace as module calls).

A record quantizes the output of a graph node when the node is

* a call of the record's module (an FX observer ``activation_post_process_3``, an eager module whose
  ``activation_post_process`` hook quantizes its output, a converted quantized module with ``scale`` /
  ``zero_point``, a ``QuantStub`` / ``Quantize``), or
* a call that reads the record's buffers (``quantize_per_tensor(x, fc1_input_scale_0, ...)``,
  ``quantized.add(a, b, _scale_0, _zero_point_0)``).

Consumers are found by walking each op's inputs back through value-preserving ops (relu, reshape, flatten,
max-pool, dropout, dequantize, ``DeQuantStub``) and average pools / mean (which torch runs with their input's
qparams) to the record that quantized them; a ``cat`` with no qparams of its own shares its first input's (FX's
shared observer).
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

from interop.qparams import QParamTable

# ops whose quantized output keeps its input's qparams: value-preserving ones (the value stays on the same grid)
# and torch's other share-qparams ops (average pools and mean requantize to their input's grid)
_PRESERVING = frozenset(
    {
        "relu", "relu_", "flatten", "reshape", "view", "max_pool1d", "max_pool2d", "max_pool3d",
        "adaptive_max_pool1d", "adaptive_max_pool2d", "dequantize", "squeeze", "unsqueeze", "transpose",
        "permute", "contiguous", "dropout", "identity", "detach", "getitem", "t",
        "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
        "adaptive_avg_pool3d", "mean",
    }
)  # fmt: skip
_PRESERVING_MODULES = (
    "ReLU", "Identity", "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "Flatten", "Unflatten", "MaxPool1d",
    "MaxPool2d", "MaxPool3d", "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "DeQuantStub", "DeQuantize",
    "AvgPool1d", "AvgPool2d", "AvgPool3d", "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d",
)  # fmt: skip
_SHARED = frozenset({"cat", "concat", "concatenate"})
_QUANTIZERS = frozenset(
    {
        "quantize_per_tensor", "quantize_per_channel", "fused_moving_avg_obs_fake_quant",
        "fake_quantize_per_tensor_affine", "fake_quantize_per_channel_affine",
    }
)  # fmt: skip


def _fn_name(target: Any) -> str:
    name = getattr(target, "__name__", None) or str(target)
    return name.rsplit(".", 1)[-1]


def _is_observer_module(mod: Any) -> bool:
    from torch.ao.quantization import DeQuantStub, FakeQuantizeBase, QuantStub
    from torch.ao.quantization.observer import ObserverBase

    return isinstance(mod, ObserverBase | FakeQuantizeBase | QuantStub | DeQuantStub)


def _trace(model: Any) -> Any:
    import torch

    if isinstance(model, torch.fx.GraphModule):
        return model

    class _Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):  # noqa: D401 - torch API
            return (
                _is_observer_module(m)
                or hasattr(m, "activation_post_process")
                or hasattr(m, "weight_fake_quant")
                or type(m).__name__ in ("Quantize", "DeQuantize")
                or super().is_leaf_module(m, qualname)
            )

    graph = _Tracer().trace(model)
    return torch.fx.GraphModule(model, graph)


def annotate_flow(table: QParamTable, model: Any) -> QParamTable:
    """``table`` with every record's ``producer`` / ``consumers`` filled from the torch graph of ``model``.

    A model torch.fx cannot trace gives one warning and the table unchanged (links then use names and
    jquant's direct producers only)."""
    try:
        gm = _trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure: fall back to names
        warnings.warn(
            f"import_qparams: torch.fx cannot trace {type(model).__name__} ({type(err).__name__}: {err}); "
            "activation qparams are linked by name and direct producers only. Pass the FX GraphModule "
            "(prepare_fx / convert_fx result) or give overrides=",
            stacklevel=3,
        )
        return table
    flow = _Flow(gm, table)
    out: QParamTable = {}
    for module, roles in table.items():
        out[module] = {}
        for role, rec in roles.items():
            if role == "weight":
                op = flow.weight_op(module)
                rec = dataclasses.replace(rec, consumers=(op,) if op else ())
            else:
                rec = dataclasses.replace(
                    rec,
                    producer=flow.producer.get((module, role)),
                    consumers=tuple(flow.consumers.get((module, role), ())),
                )
            out[module][role] = rec
    return out


class _Flow:
    def __init__(self, gm: Any, table: QParamTable):
        import torch

        self.gm = gm
        self.modules = dict(gm.named_modules(remove_duplicate=False))  # FX shares one observer under several names
        self.fx_node = torch.fx.Node
        by_key = {
            k: (m, r) for m, roles in table.items() for r, rec in roles.items() if r != "weight" for k in rec.torch_keys
        }
        outputs = {m for m, roles in table.items() if "output" in roles}
        self.quantized_by: dict[Any, tuple[str, str]] = {}
        self.called = {n.target for n in gm.graph.nodes if n.op == "call_module"}
        for node in gm.graph.nodes:
            owner = str(node.target).removesuffix(".activation_post_process") if node.op == "call_module" else None
            if node.op == "call_module" and node.target in outputs:
                self.quantized_by[node] = (node.target, "output")
            elif owner in outputs and owner != node.target:  # FloatFunctional: add.activation_post_process(r)
                self.quantized_by[node] = (owner, "output")
            elif node.op in ("call_function", "call_method"):
                for arg in node.args:
                    if isinstance(arg, torch.fx.Node) and arg.op == "get_attr" and arg.target in by_key:
                        self.quantized_by[node] = by_key[arg.target]
                        break
        self.producer: dict[tuple[str, str], str] = {}
        for node, key in self.quantized_by.items():
            self.producer.setdefault(key, self._producer(node))
        self.consumers: dict[tuple[str, str], list[str]] = {}
        for node in gm.graph.nodes:
            if node.op not in ("call_module", "call_function", "call_method") or self._is_quantizer(node):
                continue
            if self._preserving(node) is not None:
                continue
            for arg in self._tensor_args(node):
                key = self.trace_back(arg)
                if key is not None:
                    names = self.consumers.setdefault(key, [])
                    if self.op_name(node) not in names:
                        names.append(self.op_name(node))

    # -- node kinds ----------------------------------------------------------------------------------------
    def op_name(self, node: Any) -> str:
        if node.op == "call_module":
            return str(node.target)
        if node.op == "placeholder":
            return f"input:{node.target}"
        return node.name

    def _is_quantizer(self, node: Any) -> bool:
        if node.op == "call_module":
            mod = self.modules.get(node.target)
            return mod is not None and (_is_observer_module(mod) or type(mod).__name__ == "Quantize")
        return node.op == "call_function" and _fn_name(node.target) in _QUANTIZERS

    def _preserving(self, node: Any) -> Any:
        """The input node of a value-preserving op, else None."""
        if node.op == "call_module":
            mod = self.modules.get(node.target)
            if mod is not None and type(mod).__name__ in _PRESERVING_MODULES and node.args:
                return node.args[0]
            return None
        if node.op in ("call_function", "call_method") and _fn_name(node.target) in _PRESERVING and node.args:
            first = node.args[0]
            return first if isinstance(first, self.fx_node) else None
        return None

    def _shared(self, node: Any) -> Any:
        if node.op == "call_function" and _fn_name(node.target) in _SHARED and node.args:
            first = node.args[0]
            if isinstance(first, list | tuple) and first and isinstance(first[0], self.fx_node):
                return first[0]
        return None

    def _tensor_args(self, node: Any) -> list:
        found = []
        for arg in [*node.args, *node.kwargs.values()]:
            items = arg if isinstance(arg, list | tuple) else (arg,)
            found += [a for a in items if isinstance(a, self.fx_node) and a.op != "get_attr"]
        return found

    # -- walks ---------------------------------------------------------------------------------------------
    def trace_back(self, node: Any) -> tuple[str, str] | None:
        """The record that quantized the value ``node`` holds (through value-preserving ops and cat)."""
        seen = set()
        while node is not None and node not in seen:
            seen.add(node)
            if node in self.quantized_by:
                return self.quantized_by[node]
            node = self._preserving(node) or self._shared(node)
        return None

    def _producer(self, node: Any) -> str:
        if not self._is_quantizer(node) or not node.args or not isinstance(node.args[0], self.fx_node):
            return self.op_name(node)
        src = node.args[0]
        seen = set()
        while src not in seen:
            seen.add(src)
            nxt = self._preserving(src)
            if nxt is None and self._is_quantizer(src) and src.args and isinstance(src.args[0], self.fx_node):
                nxt = src.args[0]
            if nxt is None:
                break
            src = nxt
        return self.op_name(src)

    def weight_op(self, module: str) -> str | None:
        """The called module that holds a weight record: itself, or the fused parent of ``<m>.0``."""
        if module in self.called:
            return module
        parent, _, last = module.rpartition(".")
        if last == "0" and parent in self.called:
            return parent
        return None
