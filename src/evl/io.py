"""Atomic file writes: a reader sees the old file or the new one, never half of one.

Every write goes to a temporary sibling (same folder, so the rename cannot cross file systems), is flushed
and fsynced, renamed onto the target, and the folder is fsynced so that the rename survives a power cut.
This module sits in the bottom layer: anything (lists, recipes, checkpoints, reports) may use it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text"]


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX only; other systems cannot open a directory)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write; on a clean exit it replaces ``path`` durably.

    The body writes the temporary file by any means (``torch.save``, ``save_file``, ...). Then the file is
    fsynced, renamed onto ``path`` and the directory fsynced. On an exception the temporary file is removed
    and ``path`` is untouched. Missing parent folders are created.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Hidden, unique per process and call, and recognisable: ``evl.engine.checkpoint`` finds the ones a
    # killed writer left behind by this pattern (``.{name}.{pid in hex}-{8 hex digits}.tmp``).
    tmp = path.with_name(f".{path.name}.{os.getpid():x}-{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename, fsync of the directory)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def atomic_write_text(
    path: str | os.PathLike[str], text: str, encoding: str = "utf-8", errors: str = "strict"
) -> Path:
    """Write ``text`` to ``path`` atomically; see :func:`atomic_write_bytes`.

    Line ends are written as they are in ``text`` (no ``\\r\\n`` translation on any platform). ``errors``
    is the encoder's error handler: ``"surrogateescape"`` writes back file names that were not valid
    UTF-8 byte for byte.
    """
    return atomic_write_bytes(path, text.encode(encoding, errors))
