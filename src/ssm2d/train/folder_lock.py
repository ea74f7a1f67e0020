"""One writer per output folder: an advisory lock that two `ssm2d train` or `ssm2d study`
processes pointed at the same folder cannot both hold.

Without it, a second process started on a folder in use (a study launched twice, a run resumed
while it still trains) trains the same runs again, overwrites the other's checkpoints and, at
its start, removes the temporaries the other is about to rename.

The lock is a POSIX record lock (`fcntl.lockf`) on `FOLDER/.lock`. The kernel releases it when
its process ends, however it ends, so a killed run leaves no stale lock behind; and a forked
child (a DataLoader worker) does not inherit it, so a run killed while its workers wind down can
be resumed at once (an `flock` lock would live on in them). POSIX locks do not exclude the
process that holds them, so this module also refuses a folder that this process already holds.
The file holds the owner's process id, for the error message. Where `fcntl` does not exist
(Windows), or the file system refuses locks (some network file systems: ENOLCK, EOPNOTSUPP),
nothing is locked; the latter is logged once per folder.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from .config import ConfigError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = ["LOCK_NAME", "folder_lock"]

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
_held: set[Path] = set()  # the folders this process holds
_unlockable: set[Path] = set()  # folders whose file system refused a lock (reported once)


def _in_use(argument: str, folder: Path, owner: str) -> ConfigError:
    return ConfigError(
        f"{argument}: {folder} is in use by another ssm2d process (pid {owner}); wait for it to end, "
        "or stop it, or choose another folder"
    )


@contextlib.contextmanager
def folder_lock(folder: str | Path, argument: str) -> Iterator[None]:
    """Hold `folder`'s lock for the block (the folder is created).

    Args:
        folder: the output folder.
        argument: how the folder was given (e.g. "--output"), for the error message.

    Raises:
        ConfigError: another process, or another block of this one, holds it; names the pid.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = folder.resolve()
    if key in _held:  # checked before opening: closing a second descriptor would drop the lock
        raise ConfigError(
            f"{argument}: {folder} is already in use by this process (pid {os.getpid()}), by a run or study "
            "that has not ended; choose another folder"
        )
    if fcntl is None:
        yield
        return
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EAGAIN):
                owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
                raise _in_use(argument, folder, owner) from None
            # a file system without locks: write unguarded, as without fcntl
            if key not in _unlockable:
                _unlockable.add(key)
                log.warning("%s: cannot lock %s (%s); nothing keeps a second process out of it", argument, folder, err)
            yield
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _held.add(key)
        try:
            yield
        finally:
            _held.discard(key)
    finally:
        os.close(fd)  # releases the lock
