"""PyTorch <-> jquant interop: checkpoints, layouts, qparams and the jquant-convert CLI.

torch is optional: it is imported lazily by the functions that need it (``pip install jquant[torch]``).
"""

from interop.checkpoint import load_torch_checkpoint, save_torch_checkpoint
from interop.errors import CheckpointError, InteropError, MappingError, UnsafeCheckpointError
from interop.mapping import MappingEntry, MappingReport, Rule, flax_to_torch, torch_to_flax
from interop.qparams import QParamRecord, QParamTable, read_torch_qparams, write_torch_qparams
from interop.records import QuantizedTensor

import_qparams = read_torch_qparams
export_qparams = write_torch_qparams

__all__ = [
    "CheckpointError",
    "InteropError",
    "MappingError",
    "QParamRecord",
    "QParamTable",
    "QuantizedTensor",
    "UnsafeCheckpointError",
    "MappingEntry",
    "MappingReport",
    "Rule",
    "export_qparams",
    "flax_to_torch",
    "import_qparams",
    "load_torch_checkpoint",
    "read_torch_qparams",
    "torch_to_flax",
    "write_torch_qparams",
    "save_torch_checkpoint",
]
