"""Paths the user names: say what is wrong with one (missing, a FIFO, a name too long) before it is opened.

`Path.is_file()` answers False for a FIFO, a device or an unreadable folder, and raises for a name too long;
these helpers stat once and turn every answer into an `InputError` that says which it was. Opening a FIFO
would block forever and a device file can be endless, so only regular files are ever read.
"""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

from .errors import InputError

NAME_MAX = 255    # bytes in one path component on Linux, macOS and Windows file systems
PATH_MAX = 4096   # bytes in a whole path on Linux

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def shown(path) -> str:
    """A path as text that can always be printed and encoded: undecodable bytes become U+FFFD."""
    text = os.fsdecode(path) if isinstance(path, (bytes, os.PathLike)) else str(path)
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def check_length(path, what: str) -> None:
    """Refuse a path with a component longer than NAME_MAX bytes or a total longer than PATH_MAX."""
    raw = os.fsencode(path)
    longest = max(raw.split(b"/"), key=len, default=b"")
    if len(longest) > NAME_MAX:
        raise InputError(f"{what} {shown(path)[:80]}...: a name in this path is {len(longest)} bytes long, more "
                         f"than the {NAME_MAX} a file system allows; use a shorter name")
    if len(raw) > PATH_MAX:
        raise InputError(f"{what} {shown(path)[:80]}...: the path is {len(raw)} bytes long, more than the "
                         f"{PATH_MAX} allowed; use a shorter path")


def os_problem(e: OSError) -> str:
    """A short lower-case reason for an OSError ('permission denied', 'file name too long')."""
    if e.errno == errno.ENAMETOOLONG:
        return f"a name in the path is longer than {NAME_MAX} bytes"
    return (e.strerror or type(e).__name__).lower()


def kind(path, what: str) -> str:
    """'file', 'dir' or 'missing' for `path` (symlinks followed); anything else is refused here."""
    check_length(path, what)
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return "missing"
    except OSError as e:
        raise InputError(f"{what} {shown(path)}: {os_problem(e)}; check the path and its permissions") from None
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISDIR(st.st_mode):
        return "dir"
    name = next((label for test, label in _KINDS if test(st.st_mode)), "not a regular file")
    raise InputError(f"{what} {shown(path)} is {name}, not a file; pass the path of the file itself")


def regular_file(path, what: str = "file") -> int:
    """The size of the regular file at `path`; an InputError naming the problem otherwise."""
    found = kind(path, what)
    if found == "missing":
        raise InputError(f"{shown(path)}: no such file; check the path")
    if found == "dir":
        raise InputError(f"{shown(path)} is a folder; pass a file")
    return os.stat(path).st_size


def read_bytes(path, limit: int, what: str) -> bytes:
    """The bytes of a regular file of at most `limit` bytes."""
    size = regular_file(path, what)
    if size > limit:
        raise InputError(f"{shown(path)}: {size} bytes is too large for {what} (at most {limit}); "
                         "check that it is the right file")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise InputError(f"{shown(path)}: cannot read it ({os_problem(e)})") from None
    if len(data) > limit:
        raise InputError(f"{shown(path)}: grew past {limit} bytes while being read; is it being written?")
    return data


def as_path(value, what: str) -> Path:
    """A str/PathLike argument as a Path; anything else is an InputError naming the argument."""
    if isinstance(value, bytes):
        value = os.fsdecode(value)
    if not isinstance(value, (str, os.PathLike)):
        raise InputError(f"{what} must be a path (str or pathlib.Path), got {type(value).__name__}")
    if not os.fspath(value):
        raise InputError(f"{what} is empty; pass a path")
    path = Path(value)
    if "\0" in str(path):
        raise InputError(f"{what} {shown(path)!r} contains a NUL character; pass a real path")
    return path
