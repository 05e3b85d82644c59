"""PyTorch <-> jquant interop: checkpoints, layouts, qparams and the jquant-convert CLI.

torch is optional: it is imported lazily by the functions that need it (``pip install jquant[torch]``).

* checkpoints: :func:`load_torch_checkpoint`, :func:`save_torch_checkpoint`, :class:`QuantizedTensor`, and
  :func:`state_dict_to_numpy` (a live torch state_dict as the dict a loaded file gives);
* weights: :func:`torch_to_flax`, :func:`flax_to_torch`, :class:`Rule`, :class:`MappingReport`;
* qparams: :func:`import_qparams`, :func:`export_qparams` (tables of :class:`QParamRecord`, or jquant
  qstates through the link table of :func:`link_sites` / :func:`print_links`); :func:`validate_record` checks a
  record built by hand; :func:`write_gpt_fast` writes gpt-fast's weight-only layout with its options
  (``export_qparams(layout="gpt_fast")`` with the defaults);
* the torch QAT qconfig matching jquant's int8 presets: :func:`torch_qat_qconfig`;
* CLI: ``jquant-convert`` (:mod:`interop.cli`).
"""

from interop.checkpoint import load_torch_checkpoint, save_torch_checkpoint, state_dict_to_numpy
from interop.errors import CheckpointError, InteropError, MappingError, UnsafeCheckpointError
from interop.mapping import MappingEntry, MappingReport, Rule, flax_to_torch, torch_to_flax
from interop.qimport import export_qparams, format_qparam_table, import_qparams
from interop.qparams import (
    QParamRecord,
    QParamTable,
    read_torch_qparams,
    validate_record,
    write_gpt_fast,
    write_torch_qparams,
)
from interop.qsites import (
    SiteLink,
    format_links,
    link_sites,
    print_links,
    qparams_to_qstate,
    qstate_to_qparams,
    spec_from_record,
    unlinked_records,
)
from interop.records import QuantizedTensor
from interop.torch_qconfig import torch_qat_qconfig

__all__ = [
    "CheckpointError",
    "InteropError",
    "MappingEntry",
    "MappingError",
    "MappingReport",
    "QParamRecord",
    "QParamTable",
    "QuantizedTensor",
    "Rule",
    "SiteLink",
    "UnsafeCheckpointError",
    "export_qparams",
    "flax_to_torch",
    "format_links",
    "format_qparam_table",
    "import_qparams",
    "link_sites",
    "load_torch_checkpoint",
    "print_links",
    "qparams_to_qstate",
    "qstate_to_qparams",
    "read_torch_qparams",
    "save_torch_checkpoint",
    "spec_from_record",
    "state_dict_to_numpy",
    "torch_qat_qconfig",
    "torch_to_flax",
    "unlinked_records",
    "validate_record",
    "write_gpt_fast",
    "write_torch_qparams",
]
