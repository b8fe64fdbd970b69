"""The content-addressed store: ``objects/<sha[:2]>/<sha256>``, read-only blobs, deduplicated.

A blob is written as a ``.lorahub-tmp-*`` file in ``objects/`` (or, when its hash is known before it
is written, in its own folder ``objects/<sha[:2]>/``), fsynced, and renamed to its final
name while the catalogue's write lock is held (the caller's transaction), so a crash leaves at most
an unreferenced blob or a temp file; :meth:`Store.sweep` (``gc``) removes both. A temp file's name
records its writer and creation time (:func:`lorahub.fsutil.make_temp`): ``gc`` never removes one
whose writer is still running, however old its mtime (``scan --link`` hard-links files that keep the
source's mtime). Standard library only.
"""

from __future__ import annotations

import _thread
import os
import shutil
import time
from pathlib import Path

from lorahub.fsutil import TMP_PREFIX, fsync_path, make_temp, open_temp, remove_dead_temps, temp_in_progress

OBJECTS = "objects"


def fsync_file(path: Path) -> None:
    """fsync a file's data (errors raise: a blob that may not be on disk must not be committed)."""
    fsync_path(path, strict=True)


def fsync_dir(folder: Path) -> None:
    fsync_path(folder)


# fsync_many's threads: made once per process, as a wave of fsyncs first needs them, then reused (making
# and starting up to 32 threads for each wave cost more CPU than the fsyncs, and made the caller wait for
# each new thread to start).
FSYNC_THREADS = 32
_fsync_pool = None
_fsync_pool_lock = _thread.allocate_lock()


def _fsync_threads():
    global _fsync_pool
    with _fsync_pool_lock:
        if _fsync_pool is None:
            from concurrent.futures import ThreadPoolExecutor

            _fsync_pool = ThreadPoolExecutor(FSYNC_THREADS, thread_name_prefix="lorahub-fsync")
        return _fsync_pool


def _forget_fsync_threads() -> None:
    """In a forked child: the parent's threads are not there (a new pool is made if needed)."""
    global _fsync_pool, _fsync_pool_lock
    _fsync_pool, _fsync_pool_lock = None, _thread.allocate_lock()


os.register_at_fork(after_in_child=_forget_fsync_threads)


def fsync_many(paths, fn=fsync_file) -> None:
    """Apply ``fn`` (an fsync) to every path, in parallel: parallel fsyncs share the device's queue (and
    the file system's journal commits), so a wave costs little more than one fsync. Errors raise."""
    paths = list(paths)
    if not paths:
        return
    if len(paths) == 1:
        fn(paths[0])
        return
    for _ in _fsync_threads().map(fn, paths):
        pass


class Store:
    """The blobs of one registry home (``<home>/objects``)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._folders: dict[str, Path] = {}   # fan-out folders this object made or found (they are never removed)

    def path(self, sha256: str) -> Path:
        """Where blob ``sha256`` lives (whether or not it is there)."""
        return self.root / sha256[:2] / sha256

    def temp(self) -> Path:
        """A new empty temp file inside the store (same file system as the blobs, so renames are atomic)."""
        return make_temp(self.root)

    def open_temp(self, *, read_only: bool = False, sha256: str | None = None):
        """(path, file opened for writing) of a new temp file in the store; ``read_only``: created
        with mode 0444 as blobs are (writable through the returned file only); ``sha256``: the
        content's hash when known, to create the file in the blob's own folder (its rename then
        stays in that folder)."""
        mode = 0o444 if read_only else 0o600
        try:
            path, fd = open_temp(self.make_folder(sha256) if sha256 else self.root, mode=mode)
        except FileNotFoundError:
            if not sha256:
                raise
            path, fd = open_temp(self._make_folder_again(sha256), mode=mode)
        return path, os.fdopen(fd, "wb")

    def write_temp(self, data: bytes, *, durable: bool = True, read_only: bool = False,
                   sha256: str | None = None) -> Path:
        """``data`` in a new temp file of the store (fsynced when ``durable``; ``read_only``: mode 0444,
        as blobs are; ``sha256``: see :meth:`open_temp`); nothing is left behind when the write fails."""
        tmp, f = self.open_temp(read_only=read_only, sha256=sha256)
        try:
            try:
                f.write(data)
                f.flush()
                if durable:
                    os.fsync(f.fileno())
            finally:
                f.close()
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def copy_temp(self, src: str | os.PathLike) -> Path:
        """A durable copy of ``src`` as a temp file of the store."""
        tmp = self.temp()
        try:
            shutil.copyfile(src, tmp)
            fsync_file(tmp)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def make_folder(self, sha256: str) -> Path:
        """The folder blob ``sha256`` goes in, created if it is not there yet (once per object)."""
        folder = self._folders.get(sha256[:2])
        if folder is None:
            folder = self.root / sha256[:2]
            try:
                os.mkdir(folder)
            except FileExistsError:
                pass
            self._folders[sha256[:2]] = folder
        return folder

    def _make_folder_again(self, sha256: str) -> Path:
        """:meth:`make_folder` for a folder this object made or found, removed since by hand."""
        self._folders.pop(sha256[:2], None)
        return self.make_folder(sha256)

    def place(self, tmp: Path, sha256: str, *, chmod: bool = True, durable: bool = True) -> Path:
        """Rename a finished temp file to blob ``sha256`` (call while holding the write lock).

        An existing file of that name is replaced, not trusted: after a crash it may be an
        unreferenced blob whose data never reached the disk.
        """
        dest = self.path(sha256)
        if chmod:
            os.chmod(tmp, 0o444)
        try:
            os.replace(tmp, dest)
        except FileNotFoundError:
            if not Path(tmp).exists():
                raise
            self._make_folder_again(sha256)
            os.replace(tmp, dest)
        if durable:
            fsync_dir(dest.parent)
        return dest

    def remove_dead_temps(self) -> list[Path]:
        """Remove the temp files, in ``objects/`` and its blob folders, whose writer is gone
        (:func:`lorahub.fsutil.remove_dead_temps`); returns them."""
        removed = remove_dead_temps(self.root)
        for sub in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if sub.is_dir():
                removed += remove_dead_temps(sub)
        return removed

    def check(self, sha256: str, size: int | None = None) -> str | None:
        """``"missing"``, ``"corrupt"`` (wrong size or SHA-256) or None when blob ``sha256`` is intact."""
        from lorahub.hashing import sha256_file

        p = self.path(sha256)
        if not p.is_file():
            return "missing"
        if (size is not None and p.stat().st_size != size) or sha256_file(p) != sha256:
            return "corrupt"
        return None

    def blobs(self):
        """Every blob file of the store (``objects/<xx>/<sha256>``), temp files left out."""
        for sub in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            if sub.is_dir() and not sub.name.startswith("."):
                for f in sorted(sub.iterdir()):
                    if not f.name.startswith(".") and f.is_file():
                        yield f

    def has_blobs(self) -> bool:
        """True when the store holds at least one blob."""
        return next(iter(self.blobs()), None) is not None

    def sweep(self, refs: set[str], home: Path, *, dry_run: bool = False, tmp_age_s: float = 300.0,
              blobs: bool = True) -> dict:
        """Remove blobs not in ``refs`` (unless ``blobs`` is False) and leftover temp files (in the
        store and beside the database in ``home``): a temp file whose writer still runs is kept
        whatever its age; others once their creation time is ``tmp_age_s`` old
        (:func:`lorahub.fsutil.temp_in_progress`). Call while holding the write lock, so no blob
        being added is taken for garbage. Returns ``{"blobs": [sha...], "temp_files": [path...], "bytes": n}``."""
        removed, tmps, freed = [], [], 0
        now = time.time()
        files = []  # temp files and blobs of the store, then interrupted writes beside the database
        for sub in sorted(self.root.iterdir()) if self.root.is_dir() else []:
            files += [sub] if sub.is_file() else sorted(sub.iterdir()) if sub.is_dir() else []
        files += [f for f in sorted(Path(home).glob(TMP_PREFIX + "*")) if f.is_file()]
        for f in files:
            try:
                st = f.lstat()
            except OSError:
                continue
            if f.name.startswith(TMP_PREFIX):
                if temp_in_progress(f, min_age_s=tmp_age_s, now=now):
                    continue
                tmps.append(str(f))
            elif blobs and f.name not in refs and f.parent.parent == self.root:
                removed.append(f.name)
            else:
                continue
            freed += st.st_size
            if not dry_run:
                f.unlink(missing_ok=True)
        return {"blobs": removed, "temp_files": tmps, "bytes": freed}
