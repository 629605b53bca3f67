"""Atomic file writes: a temp file in the target directory, then ``os.replace``.

A failure at any point leaves no partial file behind and never clobbers the existing target.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "atomic_write_bytes", "atomic_write_text", "check_writable", "check_writable_dir"]


def _create_temp(target: Path) -> Path:
    """An empty new file next to ``target``, created with mode 0666 minus the umask (as ``open`` would
    create ``target`` itself; ``tempfile.mkstemp`` would give 0600, and reading the umask with
    ``os.umask`` changes it for every thread for a moment)."""
    directory = target.parent or Path(".")
    for _ in range(100):
        tmp = directory / f".{target.name}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file next to {str(target)!r}; remove its stale .tmp files.")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yields a temp path next to ``path``; on success it replaces ``path``, on error it is removed.

    The file written has the mode an existing ``path`` had; a new one gets 0666 minus the umask,
    as ``open(path, "w")`` would give it.

    Example:
        >>> with atomic_path("out.json") as tmp:          # doctest: +SKIP
        ...     tmp.write_text("{}")
    """
    target = Path(path)
    if target.parent and not target.parent.exists():
        raise FileNotFoundError(
            f"output directory does not exist: {str(target.parent)!r}. Create it first or choose another path."
        )
    tmp_path = _create_temp(target)
    try:
        yield tmp_path
        try:  # an existing file keeps its mode (a private 0600 file stays private)
            os.chmod(tmp_path, stat.S_IMODE(os.stat(target).st_mode))
        except FileNotFoundError:
            pass  # a new file: the mode the umask leaves of 0666, as open() would give it
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
