"""PyTorch <-> jquant interop: checkpoints, layouts, qparams and the jquant-convert CLI.

torch is optional: it is imported lazily by the functions that need it (``pip install jquant[torch]``).
"""

from interop.checkpoint import load_torch_checkpoint, save_torch_checkpoint
from interop.errors import CheckpointError, InteropError, MappingError, UnsafeCheckpointError
from interop.records import QuantizedTensor

__all__ = [
    "CheckpointError",
    "InteropError",
    "MappingError",
    "QuantizedTensor",
    "UnsafeCheckpointError",
    "load_torch_checkpoint",
    "save_torch_checkpoint",
]
