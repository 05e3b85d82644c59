"""Ready-made configs for the common recipes: tuples of ``Rule``, and ``torch_x86`` (a ``Quantizer``).

Every rule-list preset quantizes ``dot_general`` and ``conv_general_dilated`` sites and accepts ``exclude``: regular
expressions of site names to keep in float (they become leading all-None rules, so they win).
Weights always use symmetric per-output-channel qparams (zero point 0), which integer kernels need.
"""

from __future__ import annotations

from collections.abc import Sequence

from jquant.transform.patterns import AVERAGE_SUMS
from jquant.transform.quantizer import VALUE_PRESERVING, Candidate, RuleQuantizer
from jquant.transform.specs import FixedQParamsSpec, QuantizationSpec, Rule


def _excluded(exclude: Sequence[str]) -> tuple[Rule, ...]:
    if isinstance(exclude, str):
        exclude = (exclude,)
    return tuple(Rule(pattern=p) for p in exclude)


def int8_weight_spec(observer: str = "per_channel_minmax", fake_quant: str = "ste") -> QuantizationSpec:
    """Symmetric per-output-channel int8 weights over the full qint8 range -128..127 (as torch's qint8)."""
    return QuantizationSpec("int8", "per_channel_symmetric", observer=observer, fake_quant=fake_quant)


def int8_static(activation_dtype: str = "int8", exclude: Sequence[str] = ()) -> tuple[Rule, ...]:
    """Static W8A8: per-channel symmetric int8 weights, per-tensor affine activations from calibration."""
    act = QuantizationSpec(activation_dtype, "per_tensor_affine", observer="minmax")
    return _excluded(exclude) + (Rule(weight=int8_weight_spec(), inputs=act),)


def int8_dynamic(exclude: Sequence[str] = ()) -> tuple[Rule, ...]:
    """Dynamic W8A8: activation qparams computed per call from the tensor itself (no calibration needed)."""
    act = QuantizationSpec("int8", "per_tensor_affine", observer="minmax", is_dynamic=True)
    return _excluded(exclude) + (Rule(weight=int8_weight_spec(), inputs=act),)


def int8_weight_only(exclude: Sequence[str] = ()) -> tuple[Rule, ...]:
    """Weight-only int8: activations stay float."""
    return _excluded(exclude) + (Rule(weight=int8_weight_spec()),)


def int4_weight_only(group_size: int = 128, exclude: Sequence[str] = ()) -> tuple[Rule, ...]:
    """Weight-only int4, symmetric, one scale per ``group_size`` weights along the contraction dim (layers whose
    contraction size ``group_size`` does not divide fall back to int8 per-channel weights, with a warning)."""
    weight = QuantizationSpec("int4", "per_channel_symmetric", observer="per_channel_minmax", block_size=group_size)
    # A layer whose contraction the group size does not divide keeps int8 per-channel weights (one warning).
    return _excluded(exclude) + (Rule(weight=weight, weight_fallback=int8_weight_spec()),)


def qat_int8(lsq: bool = False, activation_dtype: str = "int8", exclude: Sequence[str] = ()) -> tuple[Rule, ...]:
    """QAT W8A8: moving-average activation observers (as torch's QAT defaults); ``lsq=True`` learns the qparams.

    With LSQ, run ``mode="calibrate"`` first to initialise the scales, then train them with
    ``jquant.transform.learnable_params`` / ``merge_learnable``.
    """
    fake_quant = "lsq" if lsq else "ste"
    act = QuantizationSpec(activation_dtype, "per_tensor_affine", observer="moving_average", fake_quant=fake_quant)
    return _excluded(exclude) + (Rule(weight=int8_weight_spec(fake_quant=fake_quant), inputs=act),)


def fp8(dtype: str = "float8_e4m3fn", exclude: Sequence[str] = ()) -> tuple[Rule, ...]:
    """Float8 weights (per channel) and activations (per tensor), scale = absmax / finfo.max."""
    weight = QuantizationSpec(dtype, "per_channel_symmetric", observer="per_channel_minmax")
    act = QuantizationSpec(dtype, "per_tensor_symmetric", observer="minmax")
    return _excluded(exclude) + (Rule(weight=weight, inputs=act),)



# jax.nn activations that trace as one named jit call: one float op each, as the torch module they stand for
# (GELU, which traces inline, is recognised by its pattern: jquant.transform.patterns.composite_internals).
JAX_NN_COMPOSITES = frozenset({
    "silu", "hard_silu", "hard_sigmoid", "hard_tanh", "elu", "celu", "selu", "softplus", "log_sigmoid",
    "log_softmax", "mish", "glu", "leaky_relu", "sparse_plus", "squareplus", "standardize", "soft_sign",
})


class TorchX86Quantizer(RuleQuantizer):
    """``torch_x86()``'s rules with torch's notion of an add: a quantized add joins two activations. An add of a
    constant or a weight (``x + 3`` inside an activation, LayerNorm's ``var + eps`` and ``y * gamma + beta``)
    stays float, as it is inside the torch module it belongs to."""

    def annotate(self, site: Candidate) -> Rule | None:
        if site.primitive == "add" and (len(site.roles) != 2 or "weight" in site.roles or any(site.constants)):
            return None
        return super().annotate(site)


def torch_x86(qat: bool = False, exclude: Sequence[str] = (), fixed_softmax: bool = False) -> TorchX86Quantizer:
    """torch FX's x86 backend: ``get_default_qconfig_mapping("x86")`` (``qat=True``:
    ``get_default_qat_qconfig_mapping("x86")``) with its fusions and qparam sharing, as ``prepare_fx`` places them.

    - weights: per-output-channel symmetric qint8 (-128..127) on the BatchNorm-folded kernel
      (``PerChannelMinMaxObserver``; QAT: ``MovingAveragePerChannelMinMaxObserver``);
    - activations: quint8 per tensor, qparams from the 0..127 range (``reduce_range=True``) while fake quant
      clamps to 0..255 as torch's reference model does (``HistogramObserver``; QAT: ``MovingAverageMinMaxObserver``,
      the observer of ``FusedMovingAvgObsFakeQuantize``, whose own QAT-time qparams differ slightly, see NUMERICS);
    - conv / dense + inference BatchNorm folded before observing; conv / dense + bias + ReLU and add + ReLU are
      one site observed after the ReLU; the graph input is observed by its first consumer;
    - add of two activations: quantized add with its own output observer, inputs keep their producers' qparams
      (an add of a constant or a weight stays float);
    - inside ``jax.nn.gelu`` and jax.nn's other composite activations (``JAX_NN_COMPOSITES``) nothing is quantized:
      each is one float op, as its torch module;
    - concatenate: inputs and output share the first input's observer;
    - max-pool, average pool / mean (a ``reduce_window_sum`` / ``reduce_sum`` divided by a constant count, as
      ``nn.avg_pool`` and ``jnp.mean`` trace), reshape / flatten, transpose, squeeze / expand_dims: the output
      shares its input's observer (which also sees the output); a chain of layout ops counts as one op (NHWC
      flatten = transpose + reshape); converted, an average runs on the integers and rounds as torch's quantized
      ``avg_pool2d`` / ``mean`` (``adaptive_avg_pool2d`` rounds the raw sum: it can differ by one step at ties);
    - sigmoid (logistic) output: fixed qparams 1/256, zero point 0; tanh: 2/256, zero point 128; their consumers
      use those qparams (no observer of their own), as in torch;
    - softmax: runs in float, its output observed by its consumer's input observer, as torch does for
      ``torch.softmax`` / ``F.softmax`` (a HistogramObserver); ``fixed_softmax=True`` mirrors an ``nn.Softmax``
      module instead, which torch's mapping gives fixed qparams 1/256, zero point 0.
    - a standalone ReLU (after a max-pool, a cat...), ReLU6 or clamp (``jax.nn.relu6``, ``jnp.clip``: torch's
      ``nn.ReLU6`` / ``nn.Hardtanh`` / ``clamp``) shares its input's observer, as ``nn.ReLU`` / ``F.relu`` do
      (``torch.relu``, which FX observes on its own, looks the same in a jaxpr); converted, it is the same max / min
      on the integers with the bounds quantized.
    Not mirrored: biases stay float.
    """
    if qat:
        act = QuantizationSpec("uint8", observer="moving_average", observer_kwargs={"reduce_range": True})
        weight = QuantizationSpec("int8", "per_channel_symmetric", observer="moving_average_per_channel")
    else:
        act = QuantizationSpec("uint8", observer="histogram", observer_kwargs={"reduce_range": True})
        weight = int8_weight_spec()
    backend = (
        Rule(primitives=("dot_general", "conv_general_dilated"), weight=weight, inputs=act, output=act),
        Rule(primitives=("add",), inputs=act, output=act),
        Rule(primitives=("concatenate",), inputs=act, output=act),
        Rule(primitives=("logistic",), output=FixedQParamsSpec(1 / 256, 0, "uint8")),
        Rule(primitives=("tanh",), output=FixedQParamsSpec(2 / 256, 128, "uint8")),
    )
    if fixed_softmax:
        backend += (Rule(primitives=("softmax",), output=FixedQParamsSpec(1 / 256, 0, "uint8")),)
    return TorchX86Quantizer(
        _excluded(exclude) + backend, fold_batchnorm=True, fuse=True,
        share_through=VALUE_PRESERVING | frozenset(AVERAGE_SUMS),
        share_concatenate=True, opaque_calls=JAX_NN_COMPOSITES, optional=backend,
    )
