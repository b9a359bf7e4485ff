"""Files and folders replaced in one step: a reader (or a run killed at any moment) sees the old version
or the new one, never a half-written one.

    with written_atomically(path) as tmp:      # write tmp; it is renamed over path when the block ends
        tmp.write_bytes(data)
    write_folder(run / "final", fill)          # fill(tmp_folder), then swapped in for run/final

A file is written next to its target and renamed over it (`os.replace`, one step on POSIX). A
folder is filled under `NAME.tmp` and then exchanged with `NAME` in one step by Linux's
renameat2(RENAME_EXCHANGE); where that is missing, the old folder is first renamed to `NAME.old`,
and a crash between the two renames is undone by `recover_folder` (the trainer calls it when it
starts). Written files are fsynced before the rename, so a power cut does not leave a renamed but
empty file either.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"


@contextlib.contextmanager
def written_atomically(path: Path) -> Iterator[Path]:
    """A temporary path next to `path` to write to, renamed to `path` (one step on POSIX) once written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_SUFFIX}")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_text_atomically(path: Path, text: str) -> None:
    """`path.write_text(text)` (UTF-8), in one step."""
    with written_atomically(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_folder(path: Path, fill: Callable[[Path], None]) -> None:
    """Make folder `path` anew: `fill(tmp)` writes the contents into an empty folder beside it, which then
    replaces `path` (and whatever it held) in one step. If `fill` fails, `path` is left as it was."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    shutil.rmtree(tmp, ignore_errors=True)  # left by a killed run
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        for file in tmp.rglob("*"):
            if file.is_file():
                _fsync(file)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, path)


def recover_folder(path: Path) -> None:
    """Undo a crash in the middle of `write_folder`'s fallback: `NAME.old` without `NAME` goes back to `NAME`.
    A leftover `NAME.tmp` is never used (it may be half written); it is removed when `NAME` is next written."""
    path = Path(path)
    old = path.with_name(path.name + OLD_SUFFIX)
    if old.is_dir() and not path.exists():
        os.rename(old, path)


def _swap_in(new: Path, path: Path) -> None:
    if not path.exists():
        os.rename(new, path)
    elif _exchange(new, path):
        shutil.rmtree(new)  # now the old folder
    else:
        old = path.with_name(path.name + OLD_SUFFIX)
        shutil.rmtree(old, ignore_errors=True)
        os.rename(path, old)
        os.rename(new, path)  # a crash just before this line: recover_folder puts `old` back
        shutil.rmtree(old)
    _fsync_dir(path.parent)


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2); False where the system or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # an old kernel or a file system without it
        return False
    raise OSError(code, os.strerror(code), str(a), None, str(b))


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (POSIX; Windows cannot open folders)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
