"""LLM decode, batch 1: a Llama model with TinyLlama-1.1B's dimensions, JAX / jquant vs torch / torchao.

The model is a transformers ``LlamaForCausalLM`` with random weights (fixed seed; no weights are downloaded),
saved as safetensors to a temporary directory and imported into JAX with ``interop``
(``benchmarks/llama_jax.py``: the plain ``jax.numpy`` forward with a fixed-size KV cache). Greedy decoding: the
prompt is prefilled once, then each variant decodes N tokens one step at a time (a jitted step per token for
JAX; ``model(..., cache=...)`` per token for torch); prefill is not timed.

Rows: JAX f32 / bf16; jquant int8 and int4 (group 128) weight-only (``jquant.quantize`` of the f32 step
function with ``presets.int8_weight_only()`` / ``int4_weight_only()``, then ``jquant.convert``); torch f32 /
bf16; torchao ``Int8WeightOnlyConfig`` / ``Int4WeightOnlyConfig`` on the same checkpoint (a variant that does
not run on this CPU prints its error in its row). Timing: ``bench_common.round_robin_ms`` in rounds: A JAX f32
and the jquant variants, then one round per other variant (B: JAX bf16, C-F: torch, one model in memory at a
time), each with JAX f32 in it, so every ratio is against JAX f32 measured in the same round. Batch-1 decode
reads every weight once per token: the table gives the weight bytes per token, the bandwidth that implies, and
the time those bytes take at the machine's read bandwidth (an f32 GEMV over 1 GiB timed in round A).
First-token agreement: each variant's greedy first token (and how many of the generated tokens agree, and the
SQNR of its first-token logits) vs torch f32 on the same prompt; JAX f32 must give torch f32's first token
(asserted).

    python benchmarks/llm_decode.py [--small] [--new-tokens N] [--reps R]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import resource
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import cpu_name, round_robin_ms  # first: sets OMP_WAIT_POLICY
from llama_jax import SMALL, TINYLLAMA, Decoder, LlamaDims, init_cache, load_params, random_torch_model, step_fn

import jquant
from jquant.kernels import backend, tree_nbytes

PROMPT_LEN = 8
READ_PROBE = "read 1 GiB (f32 GEMV)"
SEED = 0


# -- torch side ------------------------------------------------------------------------------------------------


class TorchDecoder:
    """Greedy decoding with a transformers model: ``prefill`` once, ``decode`` from a copy of the prefilled cache."""

    def __init__(self, model):
        self.model = model

    def prefill(self, prompt: np.ndarray) -> None:
        import torch

        with torch.inference_mode():
            out = self.model(input_ids=torch.as_tensor(prompt, dtype=torch.long), use_cache=True)
        self.first = out.logits[:, -1].argmax(-1, keepdim=True)
        self.first_logits = out.logits[:, -1].float().numpy()
        self.cache = out.cache

    def decode(self, n_new: int) -> np.ndarray:
        import torch

        cache, tok, out = copy.deepcopy(self.cache), self.first, [self.first]
        with torch.inference_mode():
            for _ in range(n_new):
                tok = self.model(input_ids=tok, cache=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
                out.append(tok)
        return torch.cat(out, dim=1).numpy()


def torch_weight_bytes(model) -> int:
    """Bytes of every parameter but the embedding (a tensor subclass counts its inner tensors: torchao)."""
    total = 0
    for name, t in model.state_dict().items():
        if "embed_tokens" in name:
            continue
        if hasattr(t, "__tensor_flatten__") and type(t).__name__ != "Tensor":
            total += sum(getattr(t, inner).nbytes for inner in t.__tensor_flatten__()[0])
        else:
            total += t.nbytes
    return total


def load_torch(path: str, dtype_name: str = "float32"):
    import torch
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype_name)).eval()


def torchao_variant(path: str, bits: int) -> tuple:
    """(model, "") quantized by torchao weight-only int8 / int4, or (None, why) where it does not run here."""
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    if bits == 8:
        model = load_torch(path)
        quantize_(model, Int8WeightOnlyConfig())
        return model, ""
    errors = []
    # int4 keeps bf16 activations; each packing format has its own kernel: try them, keep every reason
    for fmt in ("plain", "tile_packed_to_4d", "plain_int32"):
        model = load_torch(path, "bfloat16")
        try:
            quantize_(model, Int4WeightOnlyConfig(group_size=128, int4_packing_format=fmt))
            TorchDecoder(model).prefill(np.zeros((1, 2), np.int64))
            return model, ""
        except Exception as err:  # noqa: BLE001 - the row reports why torchao int4 does not run here
            errors.append(f"{fmt}: {type(err).__name__}: {str(err).splitlines()[0][:90]}")
        del model
        gc.collect()
    return None, "does not run on this CPU (" + "; ".join(errors) + ")"


# -- JAX side ----------------------------------------------------------------------------------------------------


def jquant_decoder(params, dims: LlamaDims, max_len: int, prompt: np.ndarray, preset):
    """Decoder of the ``jquant.convert``-ed weight-only step function, its int params and conversion report."""
    fn = step_fn(dims)
    example = (params, init_cache(dims, 1, max_len), jnp.asarray(prompt, jnp.int32), jnp.int32(0))
    qf = jquant.quantize(fn, preset)
    qstate = qf.init(*example)
    int_fn, int_params = jquant.convert(qf, qstate, *example)
    return Decoder(int_fn, int_params, dims, max_len), int_params, int_fn.report


class ReadProbe:
    """The machine's streaming read bandwidth, timed in round A beside the decoders (same load): an f32 GEMV
    ``(1, 8192) x (8192, 32768)`` reads 1 GiB of weights, as a decode step reads its weights."""

    nbytes = 1 << 30

    def __init__(self):
        self.w = jnp.ones((8192, 32768), jnp.float32)
        self.v = jnp.ones((1, 8192), jnp.float32)
        self.gemv = jax.jit(jnp.matmul)

    def decode(self, n_new: int) -> None:
        self.gemv(self.v, self.w).block_until_ready()


# -- the benchmark ---------------------------------------------------------------------------------------------


class Row:
    """One table row: weight bytes read per token, the greedy tokens and first-token logits, the timings."""

    def __init__(self, name: str, round_: str, weight_bytes: int, note: str = ""):
        self.name, self.round, self.weight_bytes, self.note = name, round_, weight_bytes, note
        self.tokens = self.logits = self.ms = self.base_ms = None

    def record(self, decoder, prompt: np.ndarray, n_new: int) -> Row:
        decoder.prefill(prompt)
        self.tokens, self.logits = np.asarray(decoder.decode(n_new)), np.asarray(decoder.first_logits)
        return self


def agreement(row: Row, reference: Row) -> tuple[str, str, str]:
    """First token equal (yes / no), agreeing greedy prefix, SQNR (dB) of the first-token logits vs the reference."""
    if row.tokens is None:
        return "-", "-", "-"
    tokens, ref = row.tokens[0], reference.tokens[0]
    same = int(np.argmin(tokens == ref)) if not np.all(tokens == ref) else len(tokens)
    noise = np.sum((row.logits - reference.logits) ** 2)
    sqnr = "exact" if noise == 0 else f"{10 * np.log10(np.sum(reference.logits ** 2) / noise):.1f}"
    return ("yes" if tokens[0] == ref[0] else "no"), f"{same}/{len(tokens)}", sqnr


def time_round(decoders: dict, rows: dict, round_: str, n_new: int, reps: int, warmup: int) -> float | None:
    """Round-robin timing of ``decoders`` (JAX f32 among them): ms/token and the same-round JAX f32 ms/token.
    JAX f32 gets one row per round ("JAX f32 (round B)" after the first). Returns the read probe's GB/s."""
    fns = {name: (lambda d=d: d.decode(n_new)) for name, d in decoders.items()}
    ms = {name: float(np.median(t)) / n_new for name, t in round_robin_ms(fns, reps, warmup).items()}
    probe = ms.pop(READ_PROBE, None)
    base = rows["JAX f32"]
    if round_ != base.round:
        again = rows[f"JAX f32 (round {round_})"] = Row(f"JAX f32 (round {round_})", round_, base.weight_bytes)
        again.tokens, again.logits = base.tokens, base.logits
    for name in ms:
        row = rows[name if name != "JAX f32" or round_ == base.round else f"JAX f32 (round {round_})"]
        row.ms, row.base_ms = ms[name], ms["JAX f32"]
    return None if probe is None else ReadProbe.nbytes / (probe * n_new * 1e-3) / 1e9


def available_bytes() -> int:
    with open("/proc/meminfo") as fh:
        for line in fh:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 1 << 62


def wait_for_memory(needed: int, what: str, timeout_s: float = 300.0) -> str:
    """"" when ``needed`` bytes are available (polls up to ``timeout_s`` on a shared machine), else why not."""
    deadline = time.monotonic() + timeout_s
    while available_bytes() < needed:
        if time.monotonic() > deadline:
            return (f"skipped: {what} needs ~{needed / 2**30:.1f} GiB, {available_bytes() / 2**30:.1f} GiB available "
                    "(shared machine)")
        time.sleep(10)
    return ""


def run(dims: LlamaDims, n_new: int, reps: int, warmup: int, small: bool) -> None:
    import torch

    torch.set_num_threads(2)
    max_len = -(-(PROMPT_LEN + n_new + 1) // 16) * 16
    prompt = np.random.default_rng(SEED).integers(0, dims.vocab, (1, PROMPT_LEN))
    rows: dict[str, Row] = {}
    started = time.perf_counter()

    def log(what: str) -> None:
        print(f"[{time.perf_counter() - started:.0f} s] {what}", flush=True)

    margin = 1 << 30
    with tempfile.TemporaryDirectory() as tmp:
        model = random_torch_model(dims, SEED)
        model.save_pretrained(tmp)
        reference = Row("torch f32 (reference)", "-", 0).record(TorchDecoder(model), prompt, n_new)
        f32_bytes = torch_weight_bytes(model)
        del model
        gc.collect()
        log("checkpoint written, torch f32 reference decoded")

        # round A: JAX variants. The integer conversions come first, with nothing else held: jquant.convert holds
        # the float weights three times (the caller's, a zero-filled capture state and the captured copy).
        params = load_params(tmp, dims)
        embed_bytes = tree_nbytes(params["model"]["embed_tokens"])
        decoders = {"JAX f32": Decoder(step_fn(dims), params, dims, max_len)}
        rows["JAX f32"] = Row("JAX f32", "A", tree_nbytes(params) - embed_bytes)
        reports, saved = {}, {}
        for name, preset in (("jquant int8 weight-only", jquant.presets.int8_weight_only()),
                             ("jquant int4 weight-only (group 128)", jquant.presets.int4_weight_only(128))):
            why = wait_for_memory(2 * tree_nbytes(params) + margin, "jquant.convert")
            if why:
                rows[name] = Row(name, "A", 0, note=why)
                continue
            start = time.perf_counter()
            decoders[name], int_params, report_ = jquant_decoder(params, dims, max_len, prompt, preset)
            reports[name] = (report_, time.perf_counter() - start)
            rows[name] = Row(name, "A", tree_nbytes(int_params) - embed_bytes)
            saved[name] = f"{tmp}/{len(saved)}.int.safetensors"  # on disk while the next conversion runs
            jquant.save_int_params(saved[name], int_params)
            decoders[name].params = int_params = None
            gc.collect()
            log(f"{name}: quantize + convert {reports[name][1]:.0f} s")
        for name, path in saved.items():
            decoders[name].params = jax.tree_util.tree_map(jnp.asarray, jquant.load_int_params(path))
        for name, decoder in decoders.items():
            rows[name].record(decoder, prompt, n_new)
        first_ok = agreement(rows["JAX f32"], reference)[0]
        assert first_ok == "yes", "JAX f32's greedy first token differs from torch f32's"
        log("round A (JAX variants) ...")
        decoders[READ_PROBE] = ReadProbe()
        bandwidth = time_round(decoders, rows, "A", n_new, reps, warmup)
        del decoders[READ_PROBE]
        f32_decoder = decoders["JAX f32"]  # params stay alive through it (for JAX bf16 below)
        del decoders
        gc.collect()

        # one round per other variant (JAX bf16, then one torch model held at a time), each with JAX f32 again
        def jax_bf16():
            bf16 = jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16), params)
            return Decoder(step_fn(dims), bf16, dims, max_len, jnp.bfloat16), rows["JAX f32"].weight_bytes // 2, ""

        def torch_decoder(model, why=""):
            return (None, 0, why) if model is None else (TorchDecoder(model), torch_weight_bytes(model), "")

        variants = (("JAX bf16", f32_bytes, jax_bf16),  # XLA:CPU computes bf16 dots on f32 copies of the weights
                    ("torch f32", f32_bytes, lambda: torch_decoder(load_torch(tmp))),
                    ("torch bf16", f32_bytes // 2, lambda: torch_decoder(load_torch(tmp, "bfloat16"))),
                    ("torchao int8 weight-only", f32_bytes, lambda: torch_decoder(*torchao_variant(tmp, 8))),
                    ("torchao int4 weight-only (group 128)", f32_bytes // 2,
                     lambda: torch_decoder(*torchao_variant(tmp, 4))))
        for round_, (name, needed, make) in zip("BCDEF", variants, strict=True):
            why = wait_for_memory(needed + margin, f"{name}")
            decoder, weight_bytes, why = (None, 0, why) if why else make()
            if decoder is None:
                rows[name] = Row(name, round_, 0, note=why)
                continue
            rows[name] = Row(name, round_, weight_bytes).record(decoder, prompt, n_new)
            log(f"round {round_} ({name}) ...")
            with torch.inference_mode():
                time_round({"JAX f32": f32_decoder, name: decoder}, rows, round_, n_new, reps, warmup)
            del decoder
            gc.collect()

    report(dims, rows, reference, bandwidth, n_new, reps, small, reports, time.perf_counter() - started)


def report(dims, rows, reference, bandwidth, n_new, reps, small, reports, seconds) -> None:
    import torch
    import torchao
    import transformers

    size = "small config" if small else "TinyLlama-1.1B dims"
    print(f"\n## LLM decode ({size}: hidden {dims.hidden}, intermediate {dims.intermediate}, {dims.layers} layers, "
          f"{dims.heads} heads / {dims.kv_heads} kv heads, vocab {dims.vocab}; random init, seed {SEED})\n")
    print(f"- machine: {cpu_name()}, {jax.local_device_count()} JAX CPU device, torch threads "
          f"{torch.get_num_threads()}; date {datetime.date.today().isoformat()}")
    print(f"- jax {jax.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"torchao {torchao.__version__}; jquant kernel backend: `{backend()}`")
    print(f"- batch 1, prompt {PROMPT_LEN} tokens (prefill not timed), {n_new} decode steps per timed call, "
          f"{reps} round-robin repetitions (median); ratios vs JAX f32 timed in the same round")
    print(f"- physical limit: batch-1 decode is memory bound (every weight read once per token; the embedding is a "
          f"gather of one row and is not counted; the KV cache adds < 1%). Read bandwidth measured here: "
          f"{bandwidth:.1f} GB/s (an XLA f32 GEMV reading 1 GiB, timed in round A beside the decoders); "
          "'ms/token at read GB/s' = weight bytes / that bandwidth"
          + (" (the small config's weights fit in cache: it does not apply)" if small else ""))
    print()
    print("| variant | round | ms/token | tokens/s | x JAX f32 (same round) | weight bytes/token | implied GB/s "
          "| ms/token at read GB/s | first token = torch f32 | greedy tokens = torch f32 | first logits SQNR dB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows.values():
        first, same, sqnr = agreement(row, reference)
        if row.ms is None:
            print(f"| {row.name} | {row.round} | - | - | - | - | - | - | - | - | {row.note} |")
            continue
        gbs = row.weight_bytes / (row.ms * 1e-3) / 1e9
        at_bandwidth = row.weight_bytes / (bandwidth * 1e9) * 1e3
        print(f"| {row.name} | {row.round} | {row.ms:.2f} | {1e3 / row.ms:.1f} | {row.base_ms / row.ms:.2f}x "
              f"| {row.weight_bytes / 1e6:.1f} MB | {gbs:.1f} | {at_bandwidth:.2f} | {first} | {same} | {sqnr} |")
    print(f"\nreference (torch f32 greedy): {reference.tokens[0].tolist()}")
    for name, (rep, seconds_convert) in reports.items():
        kinds = {}
        for site in rep.sites:
            kinds[site.kernel] = kinds.get(site.kernel, 0) + 1
        print(f"{name}: {rep.float_bytes / 1e6:.1f} MB -> {rep.int_bytes / 1e6:.1f} MB ({rep.ratio:.2f}x smaller), "
              f"sites by kernel {kinds}; quantize + convert {seconds_convert:.1f} s")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak RSS {peak:.1f} GiB; total {seconds:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="tiny config (hidden 256, 4 layers, vocab 1000)")
    parser.add_argument("--new-tokens", type=int, default=None, help="decode steps per timed call")
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    dims = SMALL if args.small else TINYLLAMA
    n_new = args.new_tokens or (16 if args.small else 8)
    reps = args.reps or (5 if args.small else 3)
    run(dims, n_new, reps, warmup=2 if args.small else 1, small=args.small)


if __name__ == "__main__":
    main()
