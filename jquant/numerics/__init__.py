"""Pure quantization numerics: qtypes, qschemes, qparams, (fake-)quantize. Depends on jax only."""
