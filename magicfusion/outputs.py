"""Writing a run's images: all of them or none, never over a file that appeared meanwhile, nothing left behind.

1. Before any work, `check_writable` refuses outputs that exist (a dangling symlink is an entry that exists),
   sit in a missing or read-only folder, or have names too long for the file system.
2. After sampling, `save_all` writes every image to its own temporary file beside its target, created by
   `mkstemp` (a unique name, so no foreign file or folder can occupy it, and always 26 bytes long, so it fits
   wherever the final name fits).
3. Only when every image is written are they published, each with `os.link(temporary, final)`, which fails
   instead of replacing an entry that appeared since step 1 (two runs with the same --out: the second one
   fails and writes nothing). With --overwrite an existing entry is replaced, and kept under a temporary name
   until all outputs are in, so that a failure can put it back.
4. Any failure, and SIGINT/SIGTERM (held off while links are made or undone), removes what was published and
   every temporary: the outputs of a run appear together or not at all.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import signal
import threading
import stat
import tempfile
from pathlib import Path

from PIL.PngImagePlugin import PngInfo

from .errors import InputError
from .paths import PATH_MAX, check_length, kind, os_problem, shown

TEMP_PREFIX, TEMP_SUFFIX = ".magicfusion-", ".tmp"   # mkstemp puts 8 random characters between them
TEMP_LENGTH = len(TEMP_PREFIX) + 8 + len(TEMP_SUFFIX)
_NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV, errno.EMLINK}  # FAT, some network FS


class Terminated(BaseException):
    """SIGTERM, raised like KeyboardInterrupt so that every `finally` runs (not an Exception: nothing may
    catch it as an error)."""


def raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def held_signals():
    """SIGINT and SIGTERM wait (they are delivered on exit) while outputs are linked in or taken back. The handlers
    are swapped for ones that only record the signal: a thread mask would not do, since another thread (a torch
    worker) can take the signal and Python then runs its handler on the main thread anyway."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    old = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in pending:
            handler = old[s]
            if callable(handler):
                handler(s, None)
            elif handler != signal.SIG_IGN:
                signal.raise_signal(s)


def check_writable(paths: list, overwrite: bool) -> None:
    """Each output can be made: short enough names, an existing writable folder, nothing there (or --overwrite)."""
    for p in paths:
        check_length(p, "--out")
        if len(os.fsencode(p.parent)) + 1 + TEMP_LENGTH > PATH_MAX:
            raise InputError(f"--out {shown(p)[:80]}...: the folder's path is too long to hold a temporary file "
                             "beside the output; use a shorter path")
        found = kind(p, "--out")  # refuses a FIFO or device, and says why a stat failed
        if found == "dir":
            raise InputError(f"{shown(p)} is a folder; --out must name a file")
        if os.path.lexists(p) and not overwrite:
            what = "already exists" if found == "file" else "already exists (a symlink to nowhere)"
            raise InputError(f"{shown(p)} {what}; pass --overwrite to replace it or choose another --out")
        parent = p.parent
        if kind(parent, "--out folder") != "dir":
            raise InputError(f"cannot write {shown(p)}: folder {shown(parent)} does not exist; create it or choose "
                             "another --out")
        if not os.access(parent, os.W_OK):
            raise InputError(f"cannot write {shown(p)}: folder {shown(parent)} is not writable; choose another --out")


def check_folder(out: Path) -> None:
    """A folder that does not exist yet can be made: its nearest existing ancestor is a writable folder."""
    check_length(out, "--out")
    existing = next(p for p in (out, *out.parents) if os.path.lexists(p))
    if not existing.is_dir():
        raise InputError(f"cannot make folder {shown(out)}: {shown(existing)} is a file (or a broken symlink); "
                         "choose another --out")
    if not os.access(existing, os.W_OK):
        raise InputError(f"cannot make folder {shown(out)}: {shown(existing)} is not writable; choose another --out")


def make_folder(out: Path) -> list:
    """mkdir -p `out`; returns the folders it made, deepest first, for `remove_folders` to take back."""
    made = [p for p in (out, *out.parents) if not os.path.lexists(p)]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        remove_folders(made)
        raise InputError(f"cannot make folder {shown(out)}: {os_problem(e)}; choose another --out") from None
    return made


def remove_folders(made: list) -> None:
    for folder in made:  # deepest first; a folder something else wrote into stays
        with contextlib.suppress(OSError):
            os.rmdir(folder)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_temp(path: Path, image, params: str | None, mode: int, temps: list) -> None:
    """Write one PNG to a new temporary file beside `path`, listed in `temps` from the moment it exists."""
    with held_signals():  # a signal cannot fall between creating the file and listing it for removal
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=TEMP_SUFFIX, dir=path.parent)
        temps.append(tmp)
        f = os.fdopen(fd, "wb")
    with f:
        os.fchmod(fd, mode)  # mkstemp makes 0600 files; an image is as readable as any file the user writes
        info = PngInfo()
        if params:
            info.add_text("parameters", shown(params))  # undecodable bytes of a file name become U+FFFD
        image.save(f, format="PNG", pnginfo=info)


def _publish(tmp: str, path: Path, overwrite: bool) -> tuple:
    """Give `tmp`'s file the name `path` -> (path, (dev, inode) of our file, backup of what it replaced)."""
    st = os.stat(tmp)
    ours = (st.st_dev, st.st_ino)
    try:
        os.link(tmp, path)  # fails if anything is at `path`, a dangling symlink included
        return path, ours, None
    except FileExistsError:
        if not overwrite:
            raise
    except OSError as e:
        if e.errno not in _NO_LINKS:
            raise
        return path, _copy_exclusive(tmp, path, overwrite), None
    old = os.lstat(path)
    if stat.S_ISDIR(old.st_mode):
        raise IsADirectoryError(errno.EISDIR, "is a folder", str(path))
    backup = path.with_name(f"{TEMP_PREFIX}{secrets.token_hex(4)}.old")
    try:
        os.link(path, backup, follow_symlinks=False)  # the replaced entry, kept until every output is in
    except OSError as e:
        if e.errno not in _NO_LINKS:
            raise
        os.replace(tmp, path)  # no hard links here: replaced, but not restorable
        return path, ours, None
    try:
        os.replace(tmp, path)
    except BaseException:
        os.unlink(backup)
        raise
    return path, ours, backup


def _copy_exclusive(tmp: str, path: Path, overwrite: bool) -> tuple:
    """Where hard links are not supported: create `path` exclusively (O_EXCL) and copy the bytes in."""
    flags = os.O_WRONLY | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | (os.O_TRUNC if overwrite else os.O_EXCL)
    fd = os.open(path, flags, 0o666)
    with os.fdopen(fd, "wb") as dst, open(tmp, "rb") as src:
        st = os.fstat(fd)
        shutil.copyfileobj(src, dst)
    return st.st_dev, st.st_ino


def _take_back(path: Path, ours: tuple, backup) -> None:
    with contextlib.suppress(OSError):
        if backup is not None:
            os.replace(backup, path)
            return
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == ours:  # only our own file, never one that took its place
            os.unlink(path)


def save_all(items: list, overwrite: bool = False) -> None:
    """[(path, image, parameters)] -> PNGs, all of them or none (see the module docstring)."""
    mode = 0o666 & ~_umask()
    temps, published, done, current = [], [], False, None
    try:
        for path, image, params in items:
            current = path
            _write_temp(path, image, params, mode, temps)
        with held_signals():
            for (path, _, _), tmp in zip(items, temps):
                current = path
                published.append(_publish(tmp, path, overwrite))
            done = True
    except FileExistsError:
        raise InputError(f"{shown(current)} appeared while this run was working (another run writing the same "
                         "--out?); nothing was written: pass --overwrite to replace it or choose another --out") \
            from None
    except OSError as e:
        raise InputError(f"cannot write {shown(current)}: {os_problem(e)}; nothing was written, choose another "
                         "--out") from None
    finally:
        with held_signals():
            if not done:
                for entry in reversed(published):
                    _take_back(*entry)
            for tmp in temps:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            for _, _, backup in published if done else ():
                if backup is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(backup)

