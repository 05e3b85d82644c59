"""Correctness parts of benchmarks/llm_decode.py on a tiny Llama: the JAX forward (imported through interop from
a transformers safetensors checkpoint) against transformers' own model, greedy decoding with the KV cache, and
jquant.convert's int8 weight-only decoder against the same quantized function in eval mode."""

from __future__ import annotations

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks"))

from llama_jax import Decoder, LlamaDims, init_cache, load_params, random_torch_model, step_fn  # noqa: E402
from llm_decode import TorchDecoder  # noqa: E402

import jquant  # noqa: E402

TINY = LlamaDims(hidden=128, intermediate=256, layers=2, heads=4, kv_heads=2, vocab=256)
MAX_LEN = 32
N_NEW = 12


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model = random_torch_model(TINY, seed=0)
    path = tmp_path_factory.mktemp("llama")
    model.save_pretrained(path)
    prompt = np.random.default_rng(0).integers(0, TINY.vocab, (1, 8))
    return model, load_params(str(path), TINY), prompt


def test_jax_f32_logits_match_torch(llama):
    model, params, prompt = llama
    with torch.inference_mode():
        expected = model(input_ids=torch.as_tensor(prompt)).logits.numpy()
    logits, _ = jax.jit(step_fn(TINY))(params, init_cache(TINY, 1, MAX_LEN), jnp.asarray(prompt, jnp.int32),
                                       jnp.int32(0))
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=1e-4)


def test_greedy_decode_matches_torch(llama):
    model, params, prompt = llama
    reference = TorchDecoder(model)
    reference.prefill(prompt)
    decoder = Decoder(step_fn(TINY), params, TINY, MAX_LEN)
    decoder.prefill(prompt)
    np.testing.assert_allclose(np.asarray(decoder.first_logits), reference.first_logits, rtol=0, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(decoder.decode(N_NEW)), reference.decode(N_NEW))


def test_int8_weight_only_convert_matches_eval(llama):
    _, params, prompt = llama
    example = (params, init_cache(TINY, 1, MAX_LEN), jnp.asarray(prompt, jnp.int32), jnp.int32(0))
    qf = jquant.quantize(step_fn(TINY), jquant.presets.int8_weight_only())
    qstate = qf.init(*example)
    int_fn, int_params = jquant.convert(qf, qstate, *example)
    assert {s.kind for s in int_fn.report.sites} == {"weight_only", "float"}  # the embedding gather stays float

    def eval_fn(p, cache, tokens, pos):
        return qf.apply(qstate, p, cache, tokens, pos, mode="eval")[0]

    converted, fake_quant = Decoder(int_fn, int_params, TINY, MAX_LEN), Decoder(eval_fn, params, TINY, MAX_LEN)
    converted.prefill(prompt)
    fake_quant.prefill(prompt)
    np.testing.assert_allclose(np.asarray(converted.first_logits), np.asarray(fake_quant.first_logits),
                               rtol=0, atol=1e-4)
    np.testing.assert_array_equal(np.asarray(converted.decode(N_NEW)), np.asarray(fake_quant.decode(N_NEW)))
