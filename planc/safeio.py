"""Reading and writing files that others may have prepared, safely.

Reads: only regular files, never more than a stated number of bytes, never blocking
(a FIFO or a device is refused at once, not read). Writes: never through a symbolic
link planted where planc writes (a link in a run folder must not let a run empty or
replace a file outside it), and atomic (temporary file, fsync, rename), so a reader
sees the old file or the new one, never half of one.
"""
from __future__ import annotations

import os
import stat

KIB, MIB = 1024, 1024 * 1024

_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


class FileRefused(ValueError):
    """A file planc will not read: not a regular file, or over the size limit.
    The message says which, without the path (callers place it)."""


def _size(n: int) -> str:
    return f"{n // MIB} MiB" if n % MIB == 0 else f"{n // KIB} KiB" if n % KIB == 0 else f"{n} bytes"


def read_limited(path: str, limit: int) -> bytes:
    """The bytes of regular file `path`, at most `limit` of them. FileRefused for a
    special file or a file over the limit; OSError as usual for a missing one."""
    # O_NONBLOCK: opening a FIFO with no writer would otherwise wait forever
    fd = os.open(path, os.O_RDONLY | _NONBLOCK | getattr(os, "O_NOCTTY", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
            raise FileRefused(f"not a regular file ({kind})")
        if st.st_size > limit:
            raise FileRefused(f"{st.st_size} bytes, over the {_size(limit)} limit")
        chunks, left = [], limit + 1           # one more than allowed: a file that grew is seen
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        data = b"".join(chunks)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise FileRefused(f"over the {_size(limit)} limit")
    return data


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _create_exclusive(path: str, flags: int = 0) -> int:
    """A new file at `path` (a stale one, or a link, is removed first: never followed)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW | flags, 0o644)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Replace `path` with `data` atomically. A symbolic link at `path` is replaced by
    the file, not followed (rename acts on the link itself)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    fd = _create_exclusive(tmp)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    os.replace(tmp, path)
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def create_empty(path: str) -> None:
    """An empty regular file at `path`, whatever was there (a link is removed, not followed)."""
    os.close(_create_exclusive(path))


def append_text(path: str, text: str) -> None:
    """Append to the regular file `path`, creating it; refuses to follow a link (OSError)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o644)
    with os.fdopen(fd, "a", encoding="utf-8") as f:
        f.write(text)
