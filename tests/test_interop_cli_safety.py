"""jquant-convert never replaces what it must not: device nodes / FIFOs are refused, symlinks are written
through, the source is never the destination, the umask is respected, temporary files vanish on SIGTERM /
SIGINT and concurrent writers get a clear error (issue #12, item 1)."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from interop.atomic import ConcurrentWriteError, atomic_path
from interop.cli import main


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"fc.weight": np.arange(6, dtype=np.float32).reshape(2, 3), "fc.bias": np.ones(2, np.float32)},
              str(path))
    return path


def _leftovers(folder):
    return sorted(p for p in os.listdir(folder) if ".tmp-" in p)


def test_fifo_destination_is_refused_and_left_alone(tmp_path, src, capsys):
    fifo = tmp_path / "out.safetensors"
    os.mkfifo(fifo)
    assert main([str(src), str(fifo)]) == 1
    err = capsys.readouterr().err
    assert f"{fifo}: refusing to replace a FIFO (named pipe)" in err
    assert os.path.exists(fifo) and not os.path.isfile(fifo)  # still the FIFO
    assert _leftovers(tmp_path) == []


def test_symlink_to_fifo_is_refused(tmp_path, src, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "out.msgpack"
    link.symlink_to(fifo)
    assert main([str(src), str(link)]) == 1
    assert "refusing to replace a FIFO" in capsys.readouterr().err
    assert os.path.islink(link)


def test_writes_through_symlinks(tmp_path, src):
    real = tmp_path / "real" / "params.safetensors"
    real.parent.mkdir()
    real.write_bytes(b"old")
    link = tmp_path / "params.safetensors"
    link.symlink_to(real)
    assert main([str(src), str(link)]) == 0
    assert os.path.islink(link) and os.readlink(link) == str(real)
    assert set(load_file(str(real))) == {"params/fc/kernel", "params/fc/bias"}
    assert _leftovers(tmp_path) == [] and _leftovers(real.parent) == []


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
def test_destination_equal_to_source_is_refused(tmp_path, src, how, capsys):
    before = src.read_bytes()
    dst = src
    if how == "symlink":
        dst = tmp_path / "alias.safetensors"
        dst.symlink_to(src)
    elif how == "hardlink":
        dst = tmp_path / "hard.safetensors"
        os.link(src, dst)
    assert main([str(src), str(dst), "--format", "safetensors"]) == 1
    assert f"{dst}: the destination is the source {src}" in capsys.readouterr().err
    assert src.read_bytes() == before


def test_to_torch_destination_equal_to_source_is_refused(tmp_path, src, capsys):
    jax_ckpt = tmp_path / "params.safetensors"
    assert main([str(src), str(jax_ckpt)]) == 0
    assert main([str(jax_ckpt), str(jax_ckpt), "--to-torch"]) == 1
    assert "the destination is the source" in capsys.readouterr().err


def test_new_file_mode_follows_the_umask(tmp_path, src):
    old = os.umask(0o027)
    try:
        assert main([str(src), str(tmp_path / "a.msgpack")]) == 0
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "a.msgpack").st_mode & 0o777) == 0o640
    existing = tmp_path / "b.msgpack"
    existing.write_bytes(b"x")
    os.chmod(existing, 0o604)
    assert main([str(src), str(existing)]) == 0
    assert (os.stat(existing).st_mode & 0o777) == 0o604  # a replaced file keeps its mode


def test_concurrent_writer_gets_a_clear_error_and_no_leftovers(tmp_path, src, capsys):
    dst = tmp_path / "out.msgpack"
    with atomic_path(dst) as tmp:  # another writer is mid-way through writing dst
        with open(tmp, "wb") as fh:
            fh.write(b"first")
        assert main([str(src), str(dst)]) == 1
        assert "another process is writing this destination right now" in capsys.readouterr().err
        with pytest.raises(ConcurrentWriteError, match="out.msgpack: another process"), atomic_path(dst):
            pass
    assert dst.read_bytes() == b"first"
    assert _leftovers(tmp_path) == []
    # a temporary file left by a killed writer (no lock held) does not block the next one
    (tmp_path / ".out.msgpack.tmp-stale").write_bytes(b"")
    assert main([str(src), str(dst)]) == 0


def test_orbax_concurrent_writer_leaves_no_directories(tmp_path, src):
    dst = tmp_path / "ckpt"
    with atomic_path(dst, directory=True) as tmp:
        os.makedirs(tmp)
        with pytest.raises(ConcurrentWriteError), atomic_path(dst, directory=True):
            pass
    assert _leftovers(tmp_path) == [] and os.path.isdir(dst)


BLOCKING_WRITER = textwrap.dedent(
    """
    import signal, sys
    import interop.jax_checkpoint as jc
    from interop.cli import main

    def blocked(path, *args, **kwargs):
        open(path, "wb").write(b"partial")
        print("WRITING", flush=True)
        signal.pause()  # wait for the test's signal

    jc.write_safetensors = blocked
    sys.exit(main([sys.argv[1], sys.argv[2]]))
    """
)


@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_removes_temporary_files(tmp_path, src, sig, code):
    dst = tmp_path / "out.safetensors"
    proc = subprocess.Popen(
        [sys.executable, "-c", BLOCKING_WRITER, str(src), str(dst)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    try:
        assert proc.stdout.readline().strip() == "WRITING", proc.stderr.read()
        assert len(_leftovers(tmp_path)) == 1  # the temporary file exists while writing
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == code, err
    assert "was not written" in err
    assert _leftovers(tmp_path) == [] and not dst.exists()
