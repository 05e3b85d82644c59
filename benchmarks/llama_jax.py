"""A Llama-architecture decoder in plain ``jax.numpy`` with a fixed-size KV cache, loaded from a transformers
(torch) safetensors checkpoint through ``interop``. Used by ``benchmarks/llm_decode.py`` and its test.

Numerics follow transformers' ``LlamaForCausalLM`` (eager): RMSNorm in f32 then cast back before the weight,
rotate-half RoPE with f32 angles, GQA, softmax in f32. Parameters are a nested dict whose paths spell the
torch names (``model/layers/0/self_attn/q_proj/kernel`` <-> ``model.layers.0.self_attn.q_proj.weight``), so
``interop.torch_to_flax`` maps the checkpoint without rules (Linear weights transposed to ``(in, out)``).

The step function ``forward(dims, params, cache, tokens, pos)`` runs ``tokens`` (batch, S) at positions
``pos .. pos + S - 1``: S = prompt length for the prefill, 1 per decode step. The cache is one ``(k, v)`` pair
per layer, each ``(batch, max_len, kv_heads, head_dim)``, written with ``lax.dynamic_update_slice``; attention
reads the whole fixed-size cache under a causal mask, so one compiled step serves every position.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import interop


@dataclasses.dataclass(frozen=True)
class LlamaDims:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


TINYLLAMA = LlamaDims(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000)
# intermediate 768, not 704 (= 2.75 x 256 as in TinyLlama): int4 groups of 128 must divide every contraction
SMALL = LlamaDims(hidden=256, intermediate=768, layers=4, heads=8, kv_heads=2, vocab=1000)


def hf_config(dims: LlamaDims, max_positions: int = 2048):
    """The transformers ``LlamaConfig`` of these dimensions (untied lm_head, as TinyLlama)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=dims.hidden, intermediate_size=dims.intermediate, num_hidden_layers=dims.layers,
        num_attention_heads=dims.heads, num_key_value_heads=dims.kv_heads, vocab_size=dims.vocab,
        rope_theta=dims.rope_theta, rms_norm_eps=dims.rms_eps, max_position_embeddings=max_positions,
        tie_word_embeddings=False, hidden_act="silu", attention_bias=False, mlp_bias=False,
    )


def random_torch_model(dims: LlamaDims, seed: int = 0):
    """A randomly initialised ``LlamaForCausalLM`` (f32, eval mode; transformers' own init, fixed seed)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(hf_config(dims)).eval()


def param_template(dims: LlamaDims, dtype=jnp.float32) -> dict:
    """Shapes of the parameter tree (``jax.ShapeDtypeStruct`` leaves), in Flax layouts."""

    def leaf(*shape):
        return jax.ShapeDtypeStruct(shape, dtype)

    h, kv = dims.hidden, dims.kv_heads * dims.head_dim

    def layer():
        return {
            "self_attn": {"q_proj": {"kernel": leaf(h, h)}, "k_proj": {"kernel": leaf(h, kv)},
                          "v_proj": {"kernel": leaf(h, kv)}, "o_proj": {"kernel": leaf(h, h)}},
            "mlp": {"gate_proj": {"kernel": leaf(h, dims.intermediate)},
                    "up_proj": {"kernel": leaf(h, dims.intermediate)},
                    "down_proj": {"kernel": leaf(dims.intermediate, h)}},
            "input_layernorm": {"scale": leaf(h)},
            "post_attention_layernorm": {"scale": leaf(h)},
        }

    return {
        "model": {"embed_tokens": {"embedding": leaf(dims.vocab, h)},
                  "layers": [layer() for _ in range(dims.layers)],
                  "norm": {"scale": leaf(h)}},
        "lm_head": {"kernel": leaf(h, dims.vocab)},
    }


def load_params(path: str, dims: LlamaDims) -> dict:
    """JAX params from a transformers checkpoint (file or ``save_pretrained`` directory) via ``interop``.

    Every torch key must match a template leaf and vice versa (``strict``). Leaves are moved to JAX one at a
    time so that only one extra host copy of the model is alive at once."""
    state = interop.load_torch_checkpoint(path)
    tree = interop.torch_to_flax(state, param_template(dims))
    del state
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    del tree
    for i, leaf in enumerate(leaves):
        leaves[i] = jnp.asarray(leaf)
        del leaf
    return jax.tree_util.tree_unflatten(treedef, leaves)


def init_cache(dims: LlamaDims, batch: int, max_len: int, dtype=jnp.float32) -> list:
    shape = (batch, max_len, dims.kv_heads, dims.head_dim)
    return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(dims.layers)]


def rms_norm(x, scale, eps):
    xf = x.astype(jnp.float32)
    normed = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return scale * normed.astype(x.dtype)


def rope(x, positions, theta):
    """Rotate-half RoPE of ``x`` (batch, S, heads, head_dim) at ``positions`` (S,), angles in f32."""
    d = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    freqs = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    cos, sin = jnp.cos(emb).astype(x.dtype)[None, :, None], jnp.sin(emb).astype(x.dtype)[None, :, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + jnp.concatenate([-x2, x1], axis=-1) * sin


def attention(dims: LlamaDims, p, x, cache, pos):
    b, s, _ = x.shape
    hd, nkv = dims.head_dim, dims.kv_heads
    group = dims.heads // nkv
    positions = pos + jnp.arange(s)
    q = rope((x @ p["q_proj"]["kernel"]).reshape(b, s, dims.heads, hd), positions, dims.rope_theta)
    k = rope((x @ p["k_proj"]["kernel"]).reshape(b, s, nkv, hd), positions, dims.rope_theta)
    v = (x @ p["v_proj"]["kernel"]).reshape(b, s, nkv, hd)
    k_cache, v_cache = cache
    k_cache = lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype), (0, pos, 0, 0))
    v_cache = lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype), (0, pos, 0, 0))
    qg = q.reshape(b, s, nkv, group, hd)
    scores = jnp.einsum("bskgd,btkd->bkgst", qg, k_cache.astype(q.dtype)) * (hd ** -0.5)
    causal = jnp.arange(k_cache.shape[1])[None, :] <= positions[:, None]  # (S, T)
    scores = jnp.where(causal, scores.astype(jnp.float32), -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    out = jnp.einsum("bkgst,btkd->bskgd", probs, v_cache.astype(q.dtype)).reshape(b, s, dims.hidden)
    return out @ p["o_proj"]["kernel"], (k_cache, v_cache)


def mlp(p, x):
    return (jax.nn.silu(x @ p["gate_proj"]["kernel"]) * (x @ p["up_proj"]["kernel"])) @ p["down_proj"]["kernel"]


def forward(dims: LlamaDims, params, cache, tokens, pos):
    """Logits (batch, S, vocab) of ``tokens`` (batch, S) at positions ``pos..``, and the updated cache."""
    m = params["model"]
    x = m["embed_tokens"]["embedding"][tokens]
    new_cache = []
    for layer, layer_cache in zip(m["layers"], cache, strict=True):
        h, layer_cache = attention(dims, layer["self_attn"],
                                   rms_norm(x, layer["input_layernorm"]["scale"], dims.rms_eps), layer_cache, pos)
        x = x + h
        x = x + mlp(layer["mlp"], rms_norm(x, layer["post_attention_layernorm"]["scale"], dims.rms_eps))
        new_cache.append(layer_cache)
    x = rms_norm(x, m["norm"]["scale"], dims.rms_eps)
    return x @ params["lm_head"]["kernel"], new_cache


def step_fn(dims: LlamaDims):
    """``forward`` with the dimensions bound: ``(params, cache, tokens, pos) -> (logits, cache)``."""
    return partial(forward, dims)


def greedy_step(fn):
    """Jitted ``(params, cache, tokens, pos) -> (next token (batch, 1), cache, last logits (batch, vocab))`` of a
    step function (the cache argument is donated: it is updated in place)."""

    @partial(jax.jit, donate_argnums=1)
    def run(params, cache, tokens, pos):
        logits, cache = fn(params, cache, tokens, pos)
        last = logits[:, -1].astype(jnp.float32)
        return jnp.argmax(last, axis=-1).astype(jnp.int32)[:, None], cache, last

    return run


class Decoder:
    """Greedy decoding with one step function: ``prefill`` once (keeps the first token and its logits), then
    ``decode`` from the prefilled state (each ``decode`` works on a copy of the cache: it can be timed repeatedly)."""

    def __init__(self, fn, params, dims: LlamaDims, max_len: int, cache_dtype=jnp.float32):
        self.step = greedy_step(fn)
        self.params, self.dims, self.max_len, self.cache_dtype = params, dims, max_len, cache_dtype

    def prefill(self, prompt: np.ndarray) -> None:
        prompt = jnp.asarray(prompt, jnp.int32)
        cache = init_cache(self.dims, prompt.shape[0], self.max_len, self.cache_dtype)
        self.first, self.cache, self.first_logits = self.step(self.params, cache, prompt, jnp.int32(0))
        self.start = prompt.shape[1]

    def decode(self, n_new: int) -> jax.Array:
        """The first token (from the prefill) and ``n_new`` more greedy tokens: (batch, 1 + n_new)."""
        cache = jax.tree_util.tree_map(jnp.copy, self.cache)
        tok, out = self.first, [self.first]
        for i in range(n_new):
            tok, cache, _ = self.step(self.params, cache, tok, jnp.int32(self.start + i))
            out.append(tok)
        return jax.block_until_ready(jnp.concatenate(out, axis=1))
