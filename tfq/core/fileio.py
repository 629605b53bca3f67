"""Atomic file writes: a temp file in the target directory, then ``os.replace``.

A failure at any point leaves no partial file behind and never clobbers the existing target.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "check_writable", "check_writable_dir"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temp path next to ``path``; on success it replaces ``path``, on error it is removed.

    Example:
        >>> with atomic_path("out.json") as tmp:          # doctest: +SKIP
        ...     tmp.write_text("{}")
    """
    target = Path(path)
    if target.parent and not target.parent.exists():
        raise FileNotFoundError(
            f"output directory does not exist: {str(target.parent)!r}. Create it first or choose another path."
        )
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent or ".")
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Writes ``data`` to ``path`` atomically and returns the path."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Writes ``text`` (UTF-8) to ``path`` atomically and returns the path."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _probe_directory(directory: Path, what: str, path) -> None:
    """Creates and removes a temporary file in ``directory`` (``os.access`` is wrong for root and ACLs)."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".tfq-write-check.", dir=directory)
        os.close(fd)
        os.unlink(tmp)
    except OSError as err:
        raise ValueError(f"{what}={str(path)!r} cannot be written ({err.strerror or type(err).__name__} in "
                         f"{str(directory)!r}). Choose a writable location.") from None


def check_writable(path: str | os.PathLike, what: str = "output") -> Path:
    """Checks, before any work, that a file can be written at ``path`` (nothing is left behind).

    Raises:
        FileNotFoundError: the directory does not exist.
        ValueError: ``path`` is a directory, its parent is not one, or the directory is not writable.

    Example:
        >>> check_writable("/tmp/model.tflite")  # doctest: +SKIP
        PosixPath('/tmp/model.tflite')
    """
    target = Path(path)
    parent = target.parent
    if target.is_dir():
        raise ValueError(f"{what}={str(path)!r} is a directory; give a file path (e.g. {str(target / 'model.tflite')!r}).")
    if not parent.exists():
        raise FileNotFoundError(
            f"output directory does not exist: {str(parent)!r}. Create it first or choose another path."
        )
    if not parent.is_dir():
        raise ValueError(f"{what}={str(path)!r} cannot be written: {str(parent)!r} is a file, not a directory.")
    _probe_directory(parent, what, path)
    return target


def check_writable_dir(path: str | os.PathLike, what: str = "output_dir") -> Path:
    """Checks that a directory exists and is writable at ``path``, or can be created there.

    Raises:
        ValueError: ``path`` (or an ancestor) is a file, or the directory (or its nearest existing
            ancestor) is not writable.
    """
    target = Path(path)
    existing = target
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{what}={str(path)!r} cannot be created: {str(existing)!r} is a file, not a directory.")
    _probe_directory(existing, what, path)
    return target
