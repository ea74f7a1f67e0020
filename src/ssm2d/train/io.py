"""Atomic file writes: a temporary file in the same folder, fsync, then rename over the target."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["remove_stale_temporaries", "write_bytes_atomic", "write_text_atomic"]

_TMP_SUFFIX = ".tmp"


def _temporary_name(path: Path) -> Path:
    """The hidden temporary beside `path` that `write_bytes_atomic` renames onto it."""
    return path.parent / f".{path.name}.{secrets.token_hex(4)}{_TMP_SUFFIX}"


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` so that `path` holds either its old content or all of `data`.

    The rename is atomic on POSIX, so a process killed at any moment leaves no partial file (at
    most a hidden `.NAME.*.tmp` beside it, which `remove_stale_temporaries` removes). Parent
    folders are created; the file gets the usual mode (0666 less the umask, as `open` gives).

    Raises:
        OSError: the folder or file cannot be written (read-only, full disk, ...); its
            `filename` is always set to `path`.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            tmp = _temporary_name(path)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
                break
            except FileExistsError:
                continue
        try:
            try:
                _write_all(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as err:
        if err.filename is None and err.errno is not None:  # os.write and os.fsync do not name the file
            raise type(err)(err.errno, err.strerror, str(path)) from err
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """`write_bytes_atomic` of UTF-8 text."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def remove_stale_temporaries(folder: str | Path, names: tuple[str, ...]) -> list[Path]:
    """Remove the temporaries that a killed `write_bytes_atomic` left beside the files `names` of
    `folder`; returns the paths removed. Call it only when no other process writes there."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    removed = []
    for name in names:
        for tmp in folder.glob(f".{name}.*{_TMP_SUFFIX}"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed
