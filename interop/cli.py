"""``jquant-convert``: torch checkpoint -> JAX checkpoint (safetensors, flax msgpack, orbax) and back.

Examples::

    jquant-convert model.safetensors params.msgpack            # torch -> JAX
    jquant-convert pytorch_model.bin.index.json out_dir --format orbax
    jquant-convert model.pt params.safetensors --dry-run       # print the mapping table only
    jquant-convert params.msgpack model.safetensors --to-torch # JAX -> torch (.safetensors or .pt)

Layouts: a 2-d ``weight`` is a Linear (transposed into a Dense ``kernel``) unless its module is named like an
embedding (``embed``, ``emb``, ``wte``, ``wpe``: kept as ``nn.Embed``'s ``embedding``); rank >= 3 is a Conv.
Override with ``--layout 'lm_head\\.weight$=linear'`` or ``--layout 'up\\.weight$=conv_transpose'``. Every
layout that is not the identity is printed (stderr). ``--rename REGEX=REPLACEMENT`` renames torch keys before
the Flax path is derived. Exits non-zero with a one-line error on failure; the destination is written
atomically (never half-written; temporary files are removed on errors, SIGINT and SIGTERM), through symlinks,
never over the source nor over a device/FIFO, with the umask's mode.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from interop.atomic import Terminated, terminate_raises
from interop.checkpoint import INDEX_FILES, SINGLE_FILES, load_torch_checkpoint, save_torch_checkpoint, shard_files
from interop.errors import CheckpointError, InteropError, MappingError
from interop.flat_mapping import layout_decisions, torch_to_tree, tree_to_torch
from interop.jax_checkpoint import FORMATS, load_jax_checkpoint, save_jax_checkpoint
from interop.layouts import LAYOUTS
from interop.mapping import Rule


def _pair(text: str, what: str) -> tuple[str, str]:
    pattern, sep, value = text.rpartition("=")
    if not sep or not pattern:
        raise argparse.ArgumentTypeError(f"{what}: expected REGEX=VALUE, got {text!r}")
    return pattern, value


_EPILOG = """\
what the JAX checkpoint holds (the conversion record makes --to-torch exact):
  .msgpack      {'variables': {'params': ..., 'batch_stats': ...},
                 'jquant': {'mapping': <JSON table>, 'extras': {torch-only buffers}}}
                load it with flax.serialization.msgpack_restore(open(p, 'rb').read())['variables']
  .safetensors  tensors under 'params/layers_0/kernel'-style paths, torch-only buffers under
                '__torch_extra__/<torch name>', the mapping JSON in the metadata key 'jquant.mapping'
  orbax dir     PyTreeCheckpointer tree {'variables': ..., 'extras': ...} plus jquant_mapping.json
names: torch 'layers.0.weight' -> Flax 'params/layers_0/kernel' (linen style); --to-torch without a stored
mapping turns 'Block_0' back into 'Block.0'. Every non-identity layout decision is printed on stderr.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="jquant-convert",
        description="Convert a torch checkpoint to a JAX (Flax) checkpoint, or back with --to-torch.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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


def _source_files(src: str, to_torch: bool) -> list[str]:
    """Every file the conversion reads (a directory's checkpoint file, an index's shards)."""
    if to_torch:
        return [src]
    path = src
    if os.path.isdir(src):
        found = [os.path.join(src, n) for n in INDEX_FILES + SINGLE_FILES if os.path.exists(os.path.join(src, n))]
        if not found:
            return [src]
        path = found[0]
    files = [src, path]
    if path.endswith(".index.json"):
        files += list(shard_files(path))
    return files


def _check_not_source(args: argparse.Namespace) -> None:
    """Refuse a destination that is (a link to, a hard link of, or a folder holding) a source file."""
    dst = os.path.realpath(args.dst)
    for src in _source_files(args.src, args.to_torch):
        real = os.path.realpath(src)
        same = real == dst
        if not same and os.path.exists(src) and os.path.exists(dst):
            same = os.path.samefile(src, dst)
        if same or (os.path.isdir(dst) and real.startswith(dst.rstrip(os.sep) + os.sep)):
            via = "" if src == args.src else f" (read for {args.src})"
            raise CheckpointError(f"{args.dst}: the destination is the source {src}{via}; write to another path")


def _say_decisions(lines: list[str]) -> None:
    if lines:
        print(f"layout decisions ({len(lines)}):", file=sys.stderr)
        for line in lines:
            print(f"  {line}", file=sys.stderr)


def _run(args: argparse.Namespace) -> None:
    show_progress = sys.stderr.isatty() if args.progress is None else args.progress
    if not args.dry_run:
        _check_not_source(args)
    if args.to_torch:
        tree, entries, extras = load_jax_checkpoint(args.src, fmt=args.format)
        state, report = tree_to_torch(tree, entries, extras, rules=_rules(args), source=args.src)
        if args.dry_run:
            print(report.table())
            return
        stored = {e.flax_path for e in entries or []}
        if stored:
            print(f"restored {len(stored)} torch names and layouts from the stored jquant mapping", file=sys.stderr)
        _say_decisions(layout_decisions([e for e in report.entries if e.flax_path not in stored], _rules(args), True))
        save_torch_checkpoint(state, args.dst)
        print(f"wrote {len(state)} tensors to {args.dst}", file=sys.stderr)
        return
    state = load_torch_checkpoint(args.src, progress=show_progress)
    try:
        tree, report, extras = torch_to_tree(state, _rules(args))
    except MappingError as err:
        raise MappingError(f"{args.src}: {err}") from err
    if args.dry_run:
        print(report.table())
        return
    _say_decisions(layout_decisions(report.entries, _rules(args)))
    fmt = save_jax_checkpoint(tree, args.dst, fmt=args.format, entries=report.entries, extras=extras)
    extra = f" (+{len(extras)} torch-only buffers kept as extras)" if extras else ""
    print(f"wrote {len(report.entries)} tensors{extra} to {args.dst} ({fmt})", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (0 ok, 1 conversion error, 2 usage error)."""
    args = _parser().parse_args(argv)
    try:
        with terminate_raises():
            _run(args)
    except (InteropError, ValueError, TypeError, OSError, ImportError) as err:
        print(f"jquant-convert: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"jquant-convert: interrupted; {args.dst} was not written", file=sys.stderr)
        return 130
    except Terminated:
        print(f"jquant-convert: terminated; {args.dst} was not written", file=sys.stderr)
        return 143
    except Exception as err:  # a bug or an input nobody foresaw: still one line, with what to do
        if os.environ.get("JQUANT_DEBUG"):
            raise
        print(
            f"jquant-convert: error: converting {args.src}: {type(err).__name__}: {_one_line(err)} "
            "(rerun with JQUANT_DEBUG=1 for the traceback and report it)",
            file=sys.stderr,
        )
        return 1
    return 0


def _one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(err).__name__
    return lines[0] + " " + " ".join(lines[1:4]) + (" ..." if len(lines) > 4 else "")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
