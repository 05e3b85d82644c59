"""``import_qparams`` / ``export_qparams``: torch checkpoints <-> qparam tables <-> jquant qstates."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from interop.qparams import QParamRecord, QParamTable, read_torch_qparams, write_gpt_fast, write_torch_qparams
from interop.qsites import SiteLink, link_sites, qparams_to_qstate, qstate_to_qparams
from jquant.text_table import format_table


def import_qparams(
    source: str | os.PathLike | Mapping[str, Any],
    *,
    model: Any = None,
    metadata: Mapping[str, str] | None = None,
    qstate: Mapping[str, Any] | None = None,
    sites: Iterable[Any] | None = None,
    links: Sequence[SiteLink] | None = None,
    overrides: Mapping[tuple[str, str], tuple[str, str]] | None = None,
    strict: bool = True,
) -> Any:
    """Read a torch checkpoint's qparams.

    Without ``qstate``: returns the :data:`QParamTable` ``{torch module: {role: QParamRecord}}``.
    With ``qstate`` and ``sites`` (``qf.init(...)`` and ``qf.sites`` of ``jquant.quantize``): returns a
    copy of ``qstate`` filled from the table through the link table (``links``, default
    :func:`interop.link_sites` with ``overrides``); see :func:`interop.qparams_to_qstate`.
    """
    table = read_torch_qparams(source, model=model, metadata=metadata)
    if qstate is None:
        if sites is not None or links is not None:
            raise ValueError("import_qparams: sites/links need qstate (the qf.init(...) result) too")
        return table
    if sites is None:
        raise ValueError("import_qparams: qstate needs sites (qf.sites) to place the qparams")
    sites = list(sites)
    if links is None:
        links = link_sites(table, sites, qstate=qstate, overrides=overrides)
    return qparams_to_qstate(table, qstate, sites, links=links, strict=strict)


def _is_table(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(
        isinstance(roles, Mapping) and all(isinstance(r, QParamRecord) for r in roles.values())
        for roles in obj.values()
    )


def export_qparams(
    source: QParamTable | Mapping[str, Any],
    template: Any,
    *,
    sites: Iterable[Any] | None = None,
    links: Sequence[SiteLink] | None = None,
    strict: bool = True,
    layout: str = "torch",
) -> dict[str, Any]:
    """A torch state_dict with qparams written into ``template`` (a ``prepare_qat`` / FX reference
    module or its state_dict); it loads with ``load_state_dict(strict=True)``.

    ``source`` is a QParamTable, or a jquant qstate together with ``sites`` and ``links`` (the link
    table used to import it, or one built with :func:`interop.link_sites`).

    ``layout="gpt_fast"`` writes gpt-fast's weight-only layout instead (``template``: the float state_dict or
    module; see :func:`interop.qparams.write_gpt_fast`): int8 ``weight`` + ``scales``, int4 CPU-packed
    ``weight`` + ``scales_and_zeros``.
    """
    if layout not in ("torch", "gpt_fast"):
        raise ValueError(f"export_qparams: layout {layout!r} is not 'torch' or 'gpt_fast'")
    if _is_table(source):
        table = source
    else:
        if sites is None or links is None:
            raise ValueError("export_qparams: a qstate needs sites (qf.sites) and links (interop.link_sites)")
        table = qstate_to_qparams(source, list(sites), links)
    if layout == "gpt_fast":
        return write_gpt_fast(table, template)
    return write_torch_qparams(table, template, strict=strict)


def format_qparam_table(table: QParamTable) -> str:
    """One line per record: torch module, role, dtype, qscheme, range, axis, scale shape, source."""
    rows = []
    for module, roles in table.items():
        for role, rec in roles.items():
            rows.append(
                (
                    module or "<root>",
                    role,
                    rec.dtype,
                    rec.qscheme,
                    f"{rec.quant_min}..{rec.quant_max}",
                    str(rec.axis),
                    str(tuple(rec.scale.shape)),
                    rec.source,
                )
            )
    return format_table(("torch module", "role", "dtype", "qscheme", "range", "axis", "scale", "source"), rows)
