"""Crash-safe file writing: temp file in the target's folder, fsync, rename, fsync the folder.

A reader never sees a partial file under its final name; a crash leaves at most a ``.lorahub-tmp-*``
file that ``lorahub gc`` removes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterator

from lorahub.errors import LorahubError

TMP_PREFIX = ".lorahub-tmp-"


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
        return f"{path}: no space left on device"
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
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=dest.suffix, dir=folder)
        os.close(fd)
    except OSError as exc:
        raise LorahubError(os_error_message(exc, dest)) from None
    tmp_path = Path(tmp)
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
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise LorahubError(os_error_message(exc, dest)) from None
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
