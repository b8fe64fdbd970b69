"""The catalogue database: where a home is, connecting, the one write-transaction helper, migrations.

The schema is the numbered SQL files of ``registry/migrations/`` (``NNNN_name.sql``); the database's
``PRAGMA user_version`` says how many of them it has. Standard library only: every catalogue
command opens the database, and ``lorahub search`` must start fast.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import os
import re
import sqlite3
from pathlib import Path
from typing import Iterable, Iterator

from lorahub.errors import LorahubError
from lorahub.fsutil import NoSpace

DB_NAME = "lorahub.db"
# A preallocated file beside the database, given up when a disk is full so that commands that free
# space (``rm``, ``gc``) can still open and change the catalogue (see :func:`ensure_reserve`).
RESERVE = DB_NAME + "-reserve"
RESERVE_BYTES = 1024 * 1024
RESERVE_SPARE = 8 * 1024 * 1024
_SQLITE_FULL = 13
_SQLITE_IOERR_SHMSIZE = 4874  # the wal-index (-shm) could not be grown: the disk is full


def is_disk_full(exc: BaseException) -> bool:
    """True when a sqlite3 error means the disk (or quota) is full."""
    if not isinstance(exc, sqlite3.Error):
        return False
    # sqlite_errorcode: set by the sqlite3 module on errors SQLite reported (absent on its own errors)
    code = getattr(exc, "sqlite_errorcode", None) or 0
    return (code & 0xFF) == _SQLITE_FULL or code == _SQLITE_IOERR_SHMSIZE or "database or disk is full" in str(exc)


def db_folder(conn: sqlite3.Connection) -> Path | None:
    """The folder of the connection's main database file (None for an in-memory database)."""
    try:
        for row in conn.execute("PRAGMA database_list"):
            if row[1] == "main" and row[2]:
                return Path(row[2]).parent
    except sqlite3.Error:
        pass
    return None


def ensure_reserve(home: Path) -> bool:
    """Make sure the space reserve (``lorahub.db-reserve``, 1 MiB of allocated blocks) exists in
    ``home``; returns whether it does. It is made only while the disk has room to spare (8 MiB
    besides it), so it never takes a nearly full disk's last space from the user. Never raises."""
    from lorahub.fsutil import make_temp

    target = Path(home) / RESERVE
    if target.exists():
        return True
    tmp = None
    try:
        st = os.statvfs(home)
        if st.f_bavail * st.f_frsize < RESERVE_BYTES + RESERVE_SPARE:
            return False
        tmp = make_temp(home)
        with open(tmp, "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, RESERVE_BYTES)
            except (AttributeError, OSError) as exc:
                if isinstance(exc, OSError) and exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                f.write(b"\0" * RESERVE_BYTES)
                f.flush()
        os.replace(tmp, target)
        return True
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return False


def release_reserve(home: Path) -> bool:
    """Give the reserve's space back to the file system; True when there was one."""
    try:
        (Path(home) / RESERVE).unlink()
        return True
    except OSError:
        return False


def now_iso() -> str:
    """The current UTC time as the catalogue stores it (``2026-01-31T12:00:00Z``)."""
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def default_home() -> Path:
    """The registry home: ``$LORAHUB_HOME``, else ``~/.lorahub``."""
    env = os.environ.get("LORAHUB_HOME")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".lorahub"


def migrations() -> list[tuple[int, Path]]:
    """The numbered migration files, in order: ``[(1, .../0001_init.sql), (2, ...), ...]``. Numbers may
    have gaps; each file stands alone, and a database records the highest number it has applied."""
    from lorahub.resources import migrations_dir

    out = []
    for p in sorted(migrations_dir().glob("*.sql")):
        m = re.match(r"^(\d+)_", p.name)
        if m:
            out.append((int(m.group(1)), p))
    nums = [n for n, _ in out]
    if len(set(nums)) != len(nums) or (nums and nums[0] < 1):
        raise LorahubError(f"registry migrations are not numbered 1, 2, ... (gaps allowed): {nums}")
    return out


def _statements(sql: str) -> Iterable[str]:
    buf = ""
    for line in sql.splitlines(keepends=True):
        buf += line
        if sqlite3.complete_statement(buf):
            if buf.strip():
                yield buf
            buf = ""
    if buf.strip() and not all(l.strip().startswith("--") or not l.strip() for l in buf.splitlines()):
        raise LorahubError("registry migration ends with an incomplete SQL statement")


def schema_version(conn: sqlite3.Connection) -> int:
    return conn.execute("PRAGMA user_version").fetchone()[0]


def no_space(conn: sqlite3.Connection) -> NoSpace:
    """The error for a write that found the disk full (names the catalogue's folder)."""
    return NoSpace(db_folder(conn) or "the registry's disk")


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection, *, on_abort=None) -> Iterator[None]:
    """One short write transaction: ``BEGIN IMMEDIATE`` (the write lock, waiting up to the busy
    timeout), ``COMMIT`` on success, ``ROLLBACK`` on any error (``on_abort()`` is called first, still
    under the write lock, when the body or the commit fails). The only way lorahub writes.
    A full disk raises :class:`~lorahub.fsutil.NoSpace` (nothing was written)."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if is_disk_full(exc):
            raise no_space(conn) from None
        raise LorahubError(f"the registry database is busy or read-only ({exc})") from None
    try:
        yield
        conn.execute("COMMIT")
    except BaseException as exc:
        if on_abort is not None:
            on_abort()
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        if is_disk_full(exc):
            raise no_space(conn) from None
        raise


def insert(conn: sqlite3.Connection, table: str, row: dict, *, or_ignore: bool = False) -> None:
    """Insert ``row`` (column -> value) into ``table`` (``or_ignore``: skip it on a UNIQUE conflict)."""
    cols = ", ".join(f'"{c}"' for c in row)
    verb = "INSERT OR IGNORE" if or_ignore else "INSERT"
    conn.execute(f'{verb} INTO "{table}" ({cols}) VALUES ({", ".join("?" * len(row))})', list(row.values()))


def migrate(conn: sqlite3.Connection, *, target: int | None = None) -> int:
    """Apply the numbered migrations above the database's ``user_version`` (up to ``target``)."""
    migs = migrations()
    latest = migs[-1][0] if migs else 0
    target = latest if target is None else target
    version = schema_version(conn)
    if version > latest:
        raise LorahubError(
            f"the registry database has schema version {version}, newer than this lorahub supports "
            f"({latest}); upgrade lorahub to open it")
    if version >= target:
        return version
    with transaction(conn):
        version = schema_version(conn)  # another process may have migrated meanwhile
        for num, path in migs:
            if version < num <= target:
                for stmt in _statements(path.read_text(encoding="utf-8")):
                    conn.execute(stmt)
                conn.execute(f"PRAGMA user_version = {num}")
                version = num
    return version


def _wal(conn: sqlite3.Connection, timeout_s: float = 30.0) -> None:
    """Put the database in WAL mode. Two processes opening a new catalogue at once can get "database is
    locked" here without SQLite waiting (switching the journal mode takes the database exclusively, and
    SQLite returns at once where waiting could deadlock): retry, up to the busy timeout."""
    import time

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) and "busy" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def connect(db: Path) -> sqlite3.Connection:
    """A connection to the catalogue at ``db`` in autocommit mode (writes go through
    :func:`transaction`), WAL journal, rows as :class:`sqlite3.Row`, foreign keys on.
    A full disk raises :class:`~lorahub.fsutil.NoSpace`."""
    conn = None
    try:
        conn = sqlite3.connect(str(db), timeout=30.0, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 30000")
        _wal(conn)
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        # statement journals (one per savepoint: a scan gives each file of a batch its own) in memory,
        # not a temp file: they are never needed after a crash (the WAL is)
        conn.execute("PRAGMA temp_store = MEMORY")
    except sqlite3.DatabaseError as exc:
        if conn is not None:
            conn.close()
        if is_disk_full(exc):
            raise NoSpace(Path(db).parent) from None
        raise LorahubError(f"{db}: cannot open the registry database ({exc})") from None
    return conn


def connect_readonly(db: Path, *, rows: bool = False) -> sqlite3.Connection:
    """A read-only connection (``mode=ro``, ``query_only``): no statement can change the catalogue,
    and nothing is created. ``rows``: rows as :class:`sqlite3.Row`.

    On a full disk, where SQLite cannot create the shared-memory index of the WAL, the database is
    opened as an immutable file instead (when no write-ahead log holds unmerged changes), so the
    catalogue stays readable."""
    db = Path(db)
    if not db.is_file():
        raise LorahubError(f"{db.parent}: no lorahub registry here (no {DB_NAME})")
    uri = db.resolve().as_uri() + "?mode=ro"
    try:
        return _open_ro(uri, rows)
    except sqlite3.DatabaseError as exc:
        wal = db.with_name(db.name + "-wal")
        if is_disk_full(exc) and (not wal.exists() or wal.stat().st_size == 0):
            try:
                return _open_ro(uri + "&immutable=1", rows)
            except sqlite3.DatabaseError:
                pass
        if is_disk_full(exc):
            raise NoSpace(db.parent) from None
        raise LorahubError(f"{db}: cannot open the registry database ({exc})") from None


def _open_ro(uri: str, rows: bool) -> sqlite3.Connection:
    conn = sqlite3.connect(uri, uri=True, timeout=30.0, isolation_level=None, check_same_thread=False)
    try:
        if rows:
            conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA busy_timeout = 30000")
        conn.execute("PRAGMA query_only = ON")
        schema_version(conn)
    except BaseException:
        conn.close()
        raise
    return conn
