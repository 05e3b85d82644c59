"""``jquant-convert``: torch checkpoint -> JAX checkpoint (safetensors, flax msgpack, orbax) and back.

Examples::

    jquant-convert model.safetensors params.msgpack            # torch -> JAX
    jquant-convert pytorch_model.bin.index.json out_dir --format orbax
    jquant-convert model.pt params.safetensors --dry-run       # print the mapping table only
    jquant-convert params.msgpack model.safetensors --to-torch # JAX -> torch (.safetensors or .pt)

Embeddings and transposed convolutions cannot be told from Linear/Conv by rank: mark them with
``--layout 'embed\\.weight$=embedding'`` or ``--layout 'up\\.weight$=conv_transpose'``. ``--rename
REGEX=REPLACEMENT`` renames torch keys before the Flax path is derived. Exits non-zero with an error
report on failure; the destination is written atomically (never half-written).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from interop.checkpoint import load_torch_checkpoint, save_torch_checkpoint
from interop.errors import InteropError
from interop.flat_mapping import torch_to_tree, tree_to_torch
from interop.jax_checkpoint import FORMATS, load_jax_checkpoint, save_jax_checkpoint
from interop.layouts import LAYOUTS
from interop.mapping import Rule


def _pair(text: str, what: str) -> tuple[str, str]:
    pattern, sep, value = text.rpartition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"{what}: expected REGEX=VALUE, got {text!r}")
    return pattern, value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jquant-convert",
        description="Convert a torch checkpoint to a JAX (Flax) checkpoint, or back with --to-torch.",
    )
    p.add_argument("src", help="source checkpoint (torch: .safetensors/.pt/.bin/index json/dir; JAX with --to-torch)")
    p.add_argument("dst", help="destination (JAX: .safetensors/.msgpack/orbax dir; torch: .safetensors/.pt)")
    p.add_argument("--format", choices=FORMATS, help="JAX checkpoint format (default: from the suffix, else orbax)")
    p.add_argument("--to-torch", action="store_true", help="convert a JAX checkpoint back to torch")
    p.add_argument("--dry-run", action="store_true", help="print the mapping table; write nothing")
    p.add_argument(
        "--layout",
        action="append",
        default=[],
        type=lambda s: _pair(s, "--layout"),
        metavar="REGEX=LAYOUT",
        help=f"force a layout for matching torch names ({', '.join(LAYOUTS)})",
    )
    p.add_argument(
        "--rename",
        action="append",
        default=[],
        type=lambda s: _pair(s, "--rename"),
        metavar="REGEX=REPL",
        help="rename torch keys (re.sub) before deriving the Flax path",
    )
    progress = p.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_true", default=None, help="show progress")
    progress.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress")
    return p


def _rules(args: argparse.Namespace) -> list[Rule]:
    rules = [Rule(pattern, layout=layout) for pattern, layout in args.layout]
    return rules + [Rule(pattern, rename=repl) for pattern, repl in args.rename]


def _run(args: argparse.Namespace) -> None:
    show_progress = sys.stderr.isatty() if args.progress is None else args.progress
    if args.to_torch:
        tree, entries, extras = load_jax_checkpoint(args.src, fmt=args.format)
        state, report = tree_to_torch(tree, entries, extras)
        if args.dry_run:
            print(report.table())
            return
        save_torch_checkpoint(state, args.dst)
        print(f"wrote {len(state)} tensors to {args.dst}", file=sys.stderr)
        return
    state = load_torch_checkpoint(args.src, progress=show_progress)
    tree, report, extras = torch_to_tree(state, _rules(args))
    if args.dry_run:
        print(report.table())
        return
    fmt = save_jax_checkpoint(tree, args.dst, fmt=args.format, entries=report.entries, extras=extras)
    print(f"wrote {len(report.entries)} tensors to {args.dst} ({fmt})", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 1 conversion error, 2 usage error)."""
    args = _parser().parse_args(argv)
    try:
        _run(args)
    except (InteropError, ValueError, TypeError, OSError, ImportError) as err:
        print(f"jquant-convert: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
