"""Reading and writing files that others may have prepared, safely.

Reads: only regular files, never more than a stated number of bytes, never blocking
(a FIFO or a device is refused at once, not read). Writes: never through a symbolic
link planted where planc writes (a link in a run folder must not let a run empty or
replace a file outside it), and atomic (temporary file, fsync, rename), so a reader
sees the old file or the new one, never half of one.
"""
from __future__ import annotations

import argparse
import json
import os
import stat
from typing import Callable, Sequence

from planc.errors import OutputFolderError

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


def _nearest_existing(path: str) -> str:
    """`path` or the nearest folder above it that exists (for saying what is in the way)."""
    path = os.path.normpath(path)
    while not os.path.lexists(path):
        parent = os.path.dirname(path)
        if parent in ("", path):
            return path
        path = parent
    return path


def folder_argument(text: str) -> str:
    """The argparse type of a command's `--out`: the path as given, refused when empty or
    blank (`--out "$UNSET"` must not fall back to a default folder or make one named " ")."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a folder, got an empty path")
    return text


def make_folder(path: str) -> None:
    """Create the folder `path` and its parents (one that exists is fine). OutputFolderError,
    naming what is in the way, when it cannot be: called before a command does its work,
    so that a bad --out never costs a benchmark or a training run."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        blocker = _nearest_existing(path)
        if blocker == os.path.normpath(path) and not os.path.isdir(blocker):
            raise OutputFolderError(f"{path}: exists and is not a folder") from None
        if os.path.lexists(blocker) and not os.path.isdir(blocker):
            raise OutputFolderError(f"{path}: cannot create the folder: {blocker} is not a folder") from None
        raise OutputFolderError(f"{path}: cannot create the folder ({err.strerror or err})") from None


def refuse_foreign_outputs(folder: str, files: Sequence[str], record: str, is_record: Callable[[dict], bool],
                           writer: str) -> None:
    """OutputFolderError unless every one of `files` already in `folder` is planc's to replace.
    They are written together with the JSON file `record` (which a writer writes first), so
    they are planc's when `record` is there and `is_record` accepts what it holds. Changes nothing."""
    present = [f for f in files if os.path.lexists(os.path.join(folder, f))]
    if not present:
        return
    try:
        data = json.loads(read_limited(os.path.join(folder, record), 256 * MIB))
        ours = isinstance(data, dict) and is_record(data)
    except (OSError, ValueError):        # missing, special, too big, not JSON (FileRefused is a ValueError)
        ours = False
    if not ours:
        raise OutputFolderError(f"{', '.join(os.path.join(folder, f) for f in present)}: not written by {writer}, "
                                "so not replaced; choose another --out, or move it away")
