"""Crash-safe file writing: temp file in the target's folder, fsync, rename, fsync the folder.

A reader never sees a partial file under its final name; a crash leaves at most a ``.lorahub-tmp-*``
file: ``lorahub gc`` removes those of the registry home, and the next write into the same folder
removes those beside outputs (:func:`remove_dead_temps`).

A temp file's name says who is writing it and since when (:func:`make_temp`)::

    .lorahub-tmp-<host id>.<pid>.<process start>.<created, unix seconds hex>.<random>[suffix]

so ``gc`` tells a write in progress from a leftover by its writer (a live process on this machine) and
by the creation time in the name, not by the file's modification time (a hard-linked temp file keeps
the source's old mtime).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lorahub.errors import LorahubError

TMP_PREFIX = ".lorahub-tmp-"
_TMP_NAME = re.compile(r"^" + re.escape(TMP_PREFIX) + r"([0-9a-f]{8})\.(\d+)\.(\d+)\.([0-9a-f]+)\.[0-9a-f]+")


class NoSpace(LorahubError):
    """The disk (or quota) holding ``path`` is full: nothing was written."""

    def __init__(self, path: os.PathLike | str, message: str | None = None):
        super().__init__(message or f"no space left on {path}")
        self.path = Path(path)

    def __reduce__(self):  # from a worker process of a scan, with its message
        return type(self), (self.path, str(self))


def os_error(exc: OSError, path: os.PathLike | str) -> LorahubError:
    """The one-line error for an OSError on ``path`` (:class:`NoSpace` when the disk or quota is full)."""
    if exc.errno == errno.ENOSPC:
        return NoSpace(path)
    if exc.errno == errno.EDQUOT:
        return NoSpace(path, f"disk quota exceeded on {path}")
    return LorahubError(os_error_message(exc, path))


# ------------------------------------------------------------------------------- temp files
def host_id() -> str:
    """8 hex digits naming this machine in temp-file names."""
    return hashlib.sha256(os.uname().nodename.encode("utf-8", "replace")).hexdigest()[:8]


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), None when unknown or gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return int(data.rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


_WRITER: dict[int, str] = {}


def _writer_tag() -> str:
    pid = os.getpid()
    tag = _WRITER.get(pid)
    if tag is None:  # computed once per process (a forked child gets its own)
        tag = _WRITER[pid] = f"{host_id()}.{pid}.{process_start(pid) or 0}"
    return tag


def temp_name(suffix: str = "") -> str:
    """A fresh temp-file name carrying this process and the current time (see the module docstring)."""
    return f"{TMP_PREFIX}{_writer_tag()}.{int(time.time()):x}.{secrets.token_hex(4)}{suffix}"


def make_temp(folder: os.PathLike | str, suffix: str = "") -> Path:
    """Create a new empty temp file (mode 0600) in ``folder``; return its path."""
    p, fd = open_temp(folder, suffix)
    os.close(fd)
    return p


def open_temp(folder: os.PathLike | str, suffix: str = "", mode: int = 0o600) -> tuple[Path, int]:
    """Create a new empty temp file in ``folder`` with permission bits ``mode`` (a 0444 file can still
    be written through the returned descriptor); return (path, writable file descriptor)."""
    for _ in range(100):
        p = Path(folder) / temp_name(suffix)
        try:
            fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        except FileExistsError:
            continue
        return p, fd
    raise FileExistsError(errno.EEXIST, "cannot create a unique temp file", str(folder))  # pragma: no cover


@dataclass(frozen=True)
class TempWriter:
    """Who created a temp file (parsed from its name)."""

    host: str
    pid: int
    start: int          # the process's start time (clock ticks since boot); 0 when unknown
    created: float      # unix seconds


def temp_writer(name: str) -> TempWriter | None:
    """The writer a temp-file name records, None for a name not made by :func:`temp_name`."""
    m = _TMP_NAME.match(name)
    if m is None:
        return None
    return TempWriter(m.group(1), int(m.group(2)), int(m.group(3)), float(int(m.group(4), 16)))


def writer_alive(w: TempWriter) -> bool:
    """True when the process that created a temp file of this machine is still running."""
    if w.pid <= 0:
        return False
    try:
        os.kill(w.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # exists, owned by another user
    except OSError:
        return False
    if w.start:
        now = process_start(w.pid)
        if now is not None and now != w.start:
            return False  # the pid was reused by another process
    return True


def remove_dead_temps(folder: os.PathLike | str) -> list[Path]:
    """Remove the temp files in ``folder`` whose writer, a process of this machine, is gone (what a
    killed write left beside its output); returns them. Other files are never touched."""
    removed = []
    host = host_id()
    try:
        names = [n for n in os.listdir(folder) if n.startswith(TMP_PREFIX)]
    except OSError:
        return removed
    for name in names:
        w = temp_writer(name)
        if w is None or w.host != host or writer_alive(w):
            continue
        p = Path(folder) / name
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def temp_in_progress(path: os.PathLike | str, *, min_age_s: float, now: float | None = None) -> bool:
    """True when the temp file ``path`` may still be written (so ``gc`` must keep it).

    Its writer on this machine still running: in progress, whatever its age. Its writer gone: a
    leftover once its name's creation time is ``min_age_s`` old. Another machine's temp file: a
    leftover once both its creation time and its mtime are that old. A name without a writer
    (older lorahub): judged by its mtime.
    """
    p = Path(path)
    now = time.time() if now is None else now
    limit = now - min_age_s
    try:
        mtime = p.lstat().st_mtime
    except OSError:
        return False
    w = temp_writer(p.name)
    if w is None:
        return mtime > limit
    if w.host == host_id():
        return writer_alive(w) or w.created > limit
    return w.created > limit or mtime > limit


class WouldOverwrite(LorahubError):
    """Writing ``path`` would replace different data; the caller may retry with ``force=True``."""

    def __init__(self, message: str, path: os.PathLike | str):
        super().__init__(message)
        self.path = Path(path)


def fsync_path(path: os.PathLike | str, *, strict: bool = False) -> None:
    """fsync a file or folder by path. Folders (and, unless ``strict``, files) ignore fsync errors."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        if strict:
            raise
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    fsync_path(folder)


def os_error_message(exc: OSError, path: os.PathLike | str) -> str:
    if exc.errno == errno.ENOSPC:
        return f"no space left on {path}"
    if exc.errno == errno.EDQUOT:
        return f"disk quota exceeded on {path}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"{path}: permission denied"
    if exc.errno == errno.EROFS:
        return f"{path}: read-only file system"
    return f"{path}: {exc.strerror or exc}"


@contextlib.contextmanager
def atomic_path(dest: os.PathLike | str, *, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; on success fsync it and rename it onto ``dest``.

    Use for writers that want a path (safetensors' ``save_file``, PIL's ``save``). On any error the
    temporary file is removed and ``dest`` is untouched.
    """
    dest = Path(dest)
    folder = dest.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp_path = make_temp(folder, dest.suffix)
    except OSError as exc:
        raise os_error(exc, dest) from None
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        if mode is None:  # mkstemp makes 0600 files; give outputs the usual umask-based mode
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o666 & ~umask
        os.chmod(tmp_path, mode)
        os.replace(tmp_path, dest)
        _fsync_dir(folder)
        remove_dead_temps(folder)  # what killed writes left here earlier
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise os_error(exc, dest) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise


def atomic_write_bytes(dest: os.PathLike | str, data: bytes, *, mode: int | None = None) -> Path:
    with atomic_path(dest, mode=mode) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return Path(dest)


def atomic_write_text(dest: os.PathLike | str, text: str, *, mode: int | None = None) -> Path:
    return atomic_write_bytes(dest, text.encode("utf-8"), mode=mode)


def save_safetensors(tensors: dict, dest: os.PathLike | str, metadata: dict[str, str] | None = None) -> Path:
    """Write torch tensors to ``dest`` atomically (contiguous copies, string metadata)."""
    from safetensors.torch import save_file

    clean = {k: v.detach().contiguous() for k, v in tensors.items()}
    with atomic_path(dest) as tmp:
        save_file(clean, str(tmp), metadata=metadata or None)
    return Path(dest)


def is_within(path: os.PathLike | str, root: os.PathLike | str) -> bool:
    """True when ``path`` (resolved, links followed) lies inside ``root``."""
    try:
        Path(path).resolve().relative_to(Path(root).resolve())
        return True
    except ValueError:
        return False
