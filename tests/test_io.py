"""Atomic file writes: all or nothing, durable, byte-exact."""

from __future__ import annotations

import re

import pytest

from evl.engine.checkpoint import _TEMP_RE
from evl.io import atomic_path, atomic_write_bytes, atomic_write_text


def test_atomic_write_keeps_old_content_on_failure(tmp_path):
    target = atomic_write_text(tmp_path / "notes.txt", "old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_writes_create_folders_and_replace_files(tmp_path):
    target = tmp_path / "a" / "b" / "data.bin"
    assert atomic_write_bytes(target, b"\x00\x01") == target
    assert atomic_write_bytes(str(target), b"\x02") == target
    assert target.read_bytes() == b"\x02"
    assert [p.name for p in target.parent.iterdir()] == ["data.bin"]


def test_text_is_written_byte_exact(tmp_path):
    # No newline translation, and surrogateescape writes back a file name that was not UTF-8.
    name = b"clip-\xff.mp4".decode("utf-8", errors="surrogateescape")
    target = atomic_write_text(tmp_path / "list.txt", f"{name} 0\r\nb 1\n", errors="surrogateescape")
    assert target.read_bytes() == b"clip-\xff.mp4 0\r\nb 1\n"
    with pytest.raises(UnicodeEncodeError):
        atomic_write_text(tmp_path / "strict.txt", name)
    assert not (tmp_path / "strict.txt").exists()


def test_temporary_name_is_hidden_and_known_to_the_checkpoint_cleaner(tmp_path):
    with atomic_path(tmp_path / "latest") as tmp:
        assert tmp.parent == tmp_path
        assert re.fullmatch(r"\.latest\.[0-9a-f]+-[0-9a-f]{8}\.tmp", tmp.name)
        assert _TEMP_RE.fullmatch(tmp.name)
        tmp.write_text("step-1\n")
    assert (tmp_path / "latest").read_text() == "step-1\n"
