"""PyTorch <-> jquant interop: checkpoints, layouts, qparams and the jquant-convert CLI.

torch is optional: it is imported lazily by the functions that need it (``pip install jquant[torch]``).
"""

from interop.checkpoint import load_torch_checkpoint, save_torch_checkpoint
from interop.errors import CheckpointError, InteropError, MappingError, UnsafeCheckpointError
from interop.mapping import MappingEntry, MappingReport, Rule, flax_to_torch, torch_to_flax
from interop.records import QuantizedTensor

__all__ = [
    "CheckpointError",
    "InteropError",
    "MappingError",
    "QuantizedTensor",
    "UnsafeCheckpointError",
    "MappingEntry",
    "MappingReport",
    "Rule",
    "flax_to_torch",
    "load_torch_checkpoint",
    "torch_to_flax",
    "save_torch_checkpoint",
]
